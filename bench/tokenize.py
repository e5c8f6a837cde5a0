"""plora tokenize vs raw ``tokenizer(batch)`` on the same texts, in one run.

Each measurement runs in a fresh child process (so peak memory is its own) and the two ways
alternate for ``--repeats`` rounds; the report gives the median tokens/s of each, their ratio
(goal: plora >= 0.8 of raw, i.e. layout, packing and writing cost at most a quarter) and each
child's peak RSS. Times exclude interpreter start, imports and tokenizer loading, which both
ways pay alike.

    python -m bench.tokenize                      # Tiny Shakespeare from ../shared/data, else data/
    python -m bench.tokenize --copies 8 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare.txt"
BATCH = 1000


def corpus_texts(copies: int) -> tuple[list[str], str]:
    """Blank-line-separated blocks of the corpus, repeated ``copies`` times."""
    source = SHAKESPEARE if SHAKESPEARE.exists() else REPO / "data" / "sample_text.txt"
    blocks = [b.strip() for b in source.read_text(encoding="utf-8").split("\n\n") if b.strip()]
    return blocks * copies, source.name


def run_raw(texts_path: Path, tokenizer_dir: Path) -> dict[str, float]:
    from parallel.tokenizer import load_tokenizer

    texts = [json.loads(line)["text"] for line in texts_path.read_text(encoding="utf-8").splitlines()]
    tokenizer = load_tokenizer(tokenizer_dir)
    started, cpu = time.perf_counter(), time.process_time()
    tokens = 0
    for i in range(0, len(texts), BATCH):
        encoded = tokenizer(texts[i : i + BATCH], add_special_tokens=False)["input_ids"]
        tokens += sum(len(ids) for ids in encoded)
    return {"tokens": tokens, "seconds": time.perf_counter() - started, "cpu": time.process_time() - cpu}


def run_plora(texts_path: Path, tokenizer_dir: Path) -> dict[str, float]:
    from parallel.errors import Rejects
    from parallel.layout import PackingOptions
    from parallel.tokenizer import load_tokenizer
    from pipeline.tokenize import TokenizeJob, tokenize_to_shards

    load_tokenizer(tokenizer_dir)  # warm the same caches the raw run warms before its clock starts
    with tempfile.TemporaryDirectory() as out:
        job = TokenizeJob(
            inputs=(texts_path,), tokenizer=tokenizer_dir, out=Path(out) / "shards", packing=PackingOptions()
        )
        started, cpu = time.perf_counter(), time.process_time()
        summary = tokenize_to_shards(job, Rejects(), progress=False)
        seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    return {"tokens": summary.tokens, "seconds": seconds, "cpu": cpu}


def child(way: str, texts_path: Path, tokenizer_dir: Path) -> None:
    result = (run_raw if way == "raw" else run_plora)(texts_path, tokenizer_dir)
    result["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps(result))


def measure(way: str, texts_path: Path, tokenizer_dir: Path) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "TOKENIZERS_PARALLELISM": "true"}
    cmd = [sys.executable, "-m", "bench.tokenize", "--child", way, str(texts_path), str(tokenizer_dir)]
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env, cwd=REPO).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--copies", type=int, default=4, help="repeat the corpus this many times")
    parser.add_argument("--repeats", type=int, default=3, help="alternating rounds per way")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer dir (default: the tiny model's)")
    parser.add_argument("--child", nargs=3, metavar=("WAY", "TEXTS", "TOKENIZER"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        way, texts, tok = args.child
        child(way, Path(texts), Path(tok))
        return

    from pipeline.tinymodel import ensure_tiny_model

    tokenizer_dir = args.tokenizer or ensure_tiny_model()
    texts, source = corpus_texts(args.copies)
    with tempfile.TemporaryDirectory() as tmp:
        texts_path = Path(tmp) / "texts.jsonl"
        texts_path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts), encoding="utf-8")
        runs: dict[str, list[dict[str, float]]] = {"raw": [], "plora": []}
        for _ in range(args.repeats):
            for way in runs:
                runs[way].append(measure(way, texts_path, tokenizer_dir))

    def rate(way: str, clock: str) -> float:
        return statistics.median(r["tokens"] / r[clock] for r in runs[way])

    raw, plora = rate("raw", "seconds"), rate("plora", "seconds")
    raw_cpu, plora_cpu = rate("raw", "cpu"), rate("plora", "cpu")
    cpu = platform.processor() or platform.machine()
    print(f"bench.tokenize: {os.cpu_count()} CPUs ({cpu}), python {platform.python_version()}")
    print(
        f"texts: {len(texts):,} blocks of {source} x{args.copies}; tokenizer {tokenizer_dir.name}; "
        f"median of {args.repeats} alternating runs, each in a fresh process"
    )
    print(f"{'way':<28}{'tokens':>12}{'tokens/s wall':>16}{'tokens/s CPU':>15}{'peak RSS MB':>13}")
    for way, label in (("raw", "raw tokenizer(batch)"), ("plora", "plora tokenize -> shards")):
        r = runs[way]
        print(
            f"{label:<28}{int(r[0]['tokens']):>12,}{rate(way, 'seconds'):>16,.0f}{rate(way, 'cpu'):>15,.0f}"
            f"{max(x['peak_rss_mb'] for x in r):>13,.0f}"
        )
    print(f"ratio plora/raw: {plora / raw:.2f} wall, {plora_cpu / raw_cpu:.2f} CPU (goal >= 0.80)")


if __name__ == "__main__":
    main()
