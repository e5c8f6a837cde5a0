"""Runs `plora train` for bench.peers, recording for every optimizer step the wall and CPU time when it
ends and the real (non-padding) tokens of its batch, as bench/peer_origin.py and bench/peer_trl.py do
for the peers.

    python -P bench/peer_plora.py RESULT_JSON -- <plora train arguments>
"""

import atexit
import json
import sys
import time
from pathlib import Path
from typing import Any

from cli.main import main as plora_main
from trainer.metrics import MetricsLog


def main() -> None:
    result = Path(sys.argv[1])
    steps: dict[str, list[Any]] = {"times": [], "cpu": [], "tokens": []}
    log_step = MetricsLog.step

    def timed_step(self: MetricsLog, done: int, **stats: Any) -> None:
        steps["times"].append(time.perf_counter())
        steps["cpu"].append(time.process_time())
        steps["tokens"].append(stats["tokens"])
        log_step(self, done, **stats)

    MetricsLog.step = timed_step  # type: ignore[method-assign]
    atexit.register(lambda: result.write_text(json.dumps(steps)))  # plora's main ends in sys.exit
    sys.argv = ["plora", "train", *sys.argv[3:]]
    plora_main()


if __name__ == "__main__":
    main()
