"""Runs the origin trainer (Fzkuji/parallelmind ``src/training/train_hf_lora.py``) for bench.peers.

Nothing of the origin is copied here: its checkout is given by path. This driver only applies what
the issue names to make it run on a CPU, without editing the checkout:
- the one-file shim: ``scripts.convert_sft_to_parallel`` re-exports ``src.utils.convert_sft_to_parallel``;
- dtype float32 instead of its hard-coded bfloat16;
and records, for every optimizer step, the wall and CPU time when its gradients are clipped (once a step) and
the real (non-padding) tokens of its batch, then stops after ``steps`` steps.

    python -P bench/peer_origin.py RESULT_JSON ORIGIN_DIR STEPS -- <train_hf_lora.py arguments>
"""

import json
import os
import sys
import time
import types
from pathlib import Path

import torch

HARD_CODED_DTYPE = 'args.dtype = "bfloat16"'


def main() -> None:
    result, origin, steps = Path(sys.argv[1]), Path(sys.argv[2]).resolve(), int(sys.argv[3])
    script = origin / "src" / "training" / "train_hf_lora.py"
    source = script.read_text(encoding="utf-8")
    if HARD_CODED_DTYPE not in source:
        sys.exit(f"peer_origin: {script} has no line {HARD_CODED_DTYPE!r} (expected HEAD 122d1dc)")
    sys.path.insert(0, str(origin))
    import src.utils.convert_sft_to_parallel as convert  # needs the origin on sys.path
    from src.data.parallel_collator import ParallelPretrainCollator

    shim = types.ModuleType("scripts")
    shim.convert_sft_to_parallel = convert  # type: ignore[attr-defined]
    sys.modules.update({"scripts": shim, "scripts.convert_sft_to_parallel": convert})

    times: list[float] = []
    cpu: list[float] = []
    tokens: list[int] = []
    collate = ParallelPretrainCollator.__call__

    def counting_collate(self, batch):  # type: ignore[no-untyped-def]
        out = collate(self, batch)
        tokens.append(int(out["attention_mask"].sum()))
        return out

    clip = torch.nn.utils.clip_grad_norm_

    def timed_clip(*args, **kwargs):  # type: ignore[no-untyped-def]
        norm = clip(*args, **kwargs)
        times.append(time.perf_counter())
        cpu.append(time.process_time())
        if len(times) == steps:
            result.write_text(json.dumps({"times": times, "cpu": cpu, "tokens": tokens[:steps]}))
            os._exit(0)  # the origin has no max-steps: stop here, before its epoch ends
        return norm

    ParallelPretrainCollator.__call__ = counting_collate  # type: ignore[method-assign]
    torch.nn.utils.clip_grad_norm_ = timed_clip
    sys.argv = [str(script), *sys.argv[5:]]
    code = compile(source.replace(HARD_CODED_DTYPE, 'args.dtype = "float32"'), str(script), "exec")
    exec(code, {"__name__": "__main__", "__file__": str(script)})
    sys.exit(f"peer_origin: the origin finished after {len(times)} steps, fewer than {steps}")


if __name__ == "__main__":
    main()
