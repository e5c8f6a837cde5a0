"""Benchmark: plora's trainer against its peers on the same job, each peer a subprocess with its own
interpreter, the runs alternating, medians of ``--pairs`` rounds (issue 11, goals 2 and 3).

Every run trains the same random-weight Qwen2 (bench.train's ``small`` shape, 4.5M parameters, with the
tiny model's tokenizer) on Alpaca records (``--alpaca``), LoRA rank 8, float32, on the CPU, ``--threads``
threads (OMP_NUM_THREADS), for ``--steps`` optimizer steps. A run reports the time at the end of
every step and the real (non-padding) tokens of its batch; the first ``--warmup`` steps are left out.
Step time is the median step; real tokens/s is the real tokens of the measured steps over their time.
Each ratio is plora's figure over the peer's, taken in every round, then the median of the rounds.

1. The origin trainer (``--origin DIR``: a checkout of Fzkuji/parallelmind, HEAD 122d1dc;
   ``bench/peer_origin.py`` runs its ``src/training/train_hf_lora.py`` with the issue's one-file shim and
   float32): ``--records`` (480) records as its ``parallel_sft`` conversations, 4 branches a row, 4 rows
   a step. Its only mode is columnar (every branch sees the other branches' earlier columns). plora
   trains the same records tokenized 4 branches a row, 4 rows a step, in its isolated mode (a branch
   sees only the trunk and itself) with ``--attn prefix`` and with ``--attn sdpa`` (dense masked SDPA);
   LoRA on the layers the origin adapts (its square linear layers: q_proj and o_proj of this shape).
2. TRL's SFTTrainer (``--trl-python``: an interpreter with trl, e.g. a separate venv;
   ``bench/peer_trl.py``): ``--trl-records`` (800) texts, packing "bfd", padding-free, ``--trl-batch``
   sequences of ``--trl-max-length`` tokens a step, LoRA on all linear layers. plora trains the same
   records (4 branches a row, ``--attn prefix``, all linear layers) at the batch size whose real tokens
   per step match TRL's (the median of its runs so far; TRL runs first in a round).

A peer that is not given is skipped with a note. Absolute figures on a shared machine mean little.

    python -m bench.peers --origin ../parallelmind --trl-python /work/venvs/trl/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.train import REPO, build_model
from parallel.errors import Rejects
from parallel.layout import PackingOptions
from pipeline.convert import ConvertOptions
from pipeline.shards import open_shards
from pipeline.tinymodel import ensure_tiny_model
from pipeline.tokenize import TokenizeJob, tokenize_to_shards

BRANCHES, ROWS = 4, 4  # the origin job: 4 branches a row, 4 rows a step
ORIGIN = "origin (columnar)"  # the names of the peers' rows
TRL = "TRL SFTTrainer (bfd, padding-free)"
ORIGIN_LORA_TARGETS = "q_proj,o_proj"  # the origin's apply_lora adapts the square nn.Linear layers only


@dataclass
class Run:
    """One run's measured steps."""

    step_s: float  # median step time
    tokens_per_step: float  # mean real tokens of a measured step
    rate: float  # real tokens/s over the measured steps


def measure(times: list[float], tokens: list[int], warmup: int) -> Run:
    """Step i lasts from the end of step i-1 to its own end; the first ``warmup`` steps are left out."""
    durations = [b - a for a, b in zip(times, times[1:], strict=False)][warmup:]
    counts = tokens[1:][warmup:]
    if not durations or len(counts) != len(durations):
        raise RuntimeError(f"too few steps measured: {len(times)} step ends, {len(tokens)} batches")
    return Run(statistics.median(durations), statistics.mean(counts), sum(counts) / sum(durations))


def peer_env(threads: int) -> dict[str, str]:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads))
    env.update(TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    return env


def run_quietly(cmd: list[str], env: dict[str, str], log: Path) -> None:
    with log.open("w") as out:
        done = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=REPO, check=False)
    if done.returncode:
        tail = log.read_text(errors="replace")[-2000:]
        raise RuntimeError(f"{cmd[:3]} failed ({done.returncode}); the end of {log}:\n{tail}")


def alpaca_text(record: dict[str, Any]) -> tuple[str, str]:
    """An Alpaca record as (prompt, answer)."""
    prompt = str(record["instruction"]).strip()
    if str(record.get("input", "")).strip():
        prompt += "\n\n" + str(record["input"]).strip()
    return prompt, str(record["output"]).strip()


def write_inputs(records: list[dict[str, Any]], work: Path, name: str) -> dict[str, Path]:
    """The same records as plora reads them (Alpaca JSON), as the origin's SFT conversations and as
    TRL's plain texts."""
    paths = {k: work / f"{name}.{k}" for k in ("alpaca.json", "conversations.jsonl", "texts.jsonl")}
    paths["alpaca.json"].write_text(json.dumps(records))
    with paths["conversations.jsonl"].open("w") as conv, paths["texts.jsonl"].open("w") as texts:
        for record in records:
            prompt, answer = alpaca_text(record)
            turns = [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]
            conv.write(json.dumps({"conversations": turns}) + "\n")
            texts.write(json.dumps({"text": f"{prompt}\n{answer}"}) + "\n")
    return paths


def plora_shards(records: Path, model: Path, out: Path) -> tuple[Path, float]:
    """Shards of ``records`` packed BRANCHES a row, and the mean real tokens of a row."""
    packing = PackingOptions(branches=BRANCHES)
    job = TokenizeJob(inputs=(records,), tokenizer=model, out=out, packing=packing, convert=ConvertOptions())
    tokenize_to_shards(job, Rejects("raise"), progress=False)
    return out, float(open_shards(out).metadata()["num_tokens"].mean())


def driver_run(driver: str, python: str, args: list[str], out: Path, a: argparse.Namespace) -> Run:
    """Run ``bench/<driver>`` (``-P``: bench/ not on sys.path, where tokenize.py would hide the standard
    library's) and measure the step ends it records, on ``--clock``."""
    result = out.with_suffix(".json")
    cmd = [python, "-P", str(REPO / "bench" / driver), str(result), *args]
    run_quietly(cmd, peer_env(a.threads), out.with_suffix(".log"))
    got = json.loads(result.read_text())
    return measure(got["cpu" if a.clock == "cpu" else "times"], got["tokens"], a.warmup)


def plora_run(
    shards: Path, model: Path, out: Path, *, attn: str, batch: int, targets: str, a: argparse.Namespace
) -> Run:
    args = ["--", "--shards", str(shards), "--base-model", str(model), "--out-dir", str(out), "--overwrite"]
    args += ["--attn", attn, "--batch-size", str(batch), "--lora-rank", "8", "--lora-targets", targets]
    args += ["--dtype", "float32", "--max-steps", str(a.steps), "--save-interval", str(10 * a.steps)]
    args += ["--save-every-minutes", "0", "--no-progress", "--device", "cpu"]
    return driver_run("peer_plora.py", sys.executable, args, out, a)


def origin_run(origin: Path, model: Path, conversations: Path, out: Path, a: argparse.Namespace) -> Run:
    args = [str(origin), str(a.steps), "--", "--base_model", str(model), "--out_dir", str(out)]
    args += ["--data_mode", "parallel_sft", "--data_path", str(conversations)]
    args += ["--parallel_cache_dir", str(out.parent / "origin-cache"), "--batch_by_samples"]
    args += ["--batch_size", str(ROWS), "--branches_per_sample", str(BRANCHES), "--lora_rank", "8"]
    args += ["--device", "cpu", "--num_workers", "0", "--log_interval", "1000", "--save_interval", "100000"]
    return driver_run("peer_origin.py", a.origin_python, [*args, "--epochs", "1"], out, a)


def trl_run(model: Path, texts: Path, out: Path, a: argparse.Namespace) -> Run:
    args = [str(model), str(texts), str(a.steps), str(a.trl_batch), str(a.trl_max_length), str(out)]
    return driver_run("peer_trl.py", a.trl_python, args, out, a)


def ratios(runs: dict[str, list[Run]], mine: str, peer: str) -> tuple[float, float]:
    """Median over rounds of plora's step time and real tokens/s over the peer's."""
    pairs = list(zip(runs[mine], runs[peer], strict=True))
    return (
        statistics.median(m.step_s / p.step_s for m, p in pairs),
        statistics.median(m.rate / p.rate for m, p in pairs),
    )


def print_table(runs: dict[str, list[Run]], peers: dict[str, tuple[str, float]]) -> None:
    print(f"{'way':<52} {'step':>8} {'real tok/step':>14} {'real tok/s':>11}")
    for name, rs in runs.items():
        step = statistics.median(r.step_s for r in rs)
        tokens = statistics.median(r.tokens_per_step for r in rs)
        rate = statistics.median(r.rate for r in rs)
        print(f"{name:<52} {step * 1000:>6.0f}ms {tokens:>14,.0f} {rate:>11,.0f}")
    for mine, (peer, goal) in peers.items():
        step, rate = ratios(runs, mine, peer)
        verdict = "reached" if rate >= goal else "not reached"
        print(f"{mine} / {peer}: step time {step:.2f}, real tokens/s {rate:.2f} (goal >= {goal}: {verdict})")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--origin", type=Path, help="a checkout of Fzkuji/parallelmind (HEAD 122d1dc)")
    p.add_argument("--origin-python", default=sys.executable, help="the interpreter for the origin")
    p.add_argument("--trl-python", help="an interpreter with trl (its own venv)")
    p.add_argument("--alpaca", type=Path, default=REPO.parent / "shared" / "data" / "alpaca_2k.json")
    p.add_argument("--records", type=int, default=480, help="records of the origin job")
    p.add_argument("--trl-records", type=int, default=800, help="texts of the TRL job")
    p.add_argument("--trl-batch", type=int, default=4, help="TRL's packed sequences a step")
    p.add_argument("--trl-max-length", type=int, default=1024, help="TRL's packed sequence length")
    p.add_argument("--pairs", type=int, default=3, help="rounds; every way runs once a round")
    p.add_argument("--steps", type=int, default=12, help="optimizer steps a run")
    p.add_argument("--warmup", type=int, default=2, help="steps left out of each run's figures")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of every run")
    p.add_argument("--clock", choices=("cpu", "wall"), default="cpu", help="cpu: each run's process CPU time")
    p.add_argument("--work", type=Path, help="keep models, data and logs here (default: a temp dir)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    a = parse_args(argv)
    print(f"bench.peers: {os.cpu_count()} CPUs ({platform.machine()}), python {platform.python_version()}")
    for flag, given in (("--origin", a.origin), ("--trl-python", a.trl_python)):
        if not given:
            print(f"note: {flag} not given: that peer is skipped")
    if not (a.origin or a.trl_python):
        return
    with tempfile.TemporaryDirectory(prefix="plora-peers-") as tmp:
        work = a.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        model = build_model(work / "model", ensure_tiny_model(), "small", "float32")
        records = json.loads(a.alpaca.read_text())
        ways: dict[str, Any] = {}
        peers: dict[str, tuple[str, float]] = {}
        if a.origin:
            data = write_inputs(records[: a.records], work, "origin-job")
            shards, _ = plora_shards(data["alpaca.json"], model, work / "origin-job-shards")
            ways[ORIGIN] = lambda out: origin_run(a.origin, model, data["conversations.jsonl"], out, a)
            for attn in ("prefix", "sdpa"):
                ways[f"plora isolated --attn {attn} (origin job)"] = lambda out, attn=attn: plora_run(
                    shards, model, out, attn=attn, batch=ROWS, targets=ORIGIN_LORA_TARGETS, a=a
                )
                peers[f"plora isolated --attn {attn} (origin job)"] = (ORIGIN, 1.3)
        if a.trl_python:
            data_t = write_inputs(records[: a.trl_records], work, "trl-job")
            trl_shards, row_tokens = plora_shards(data_t["alpaca.json"], model, work / "trl-job-shards")
            ways[TRL] = lambda out: trl_run(model, data_t["texts.jsonl"], out, a)
            ways["plora isolated --attn prefix (TRL job)"] = lambda out: plora_run(
                trl_shards,
                model,
                out,
                attn="prefix",
                batch=equal_batch(runs, row_tokens),
                targets="all-linear",
                a=a,
            )
            peers["plora isolated --attn prefix (TRL job)"] = (TRL, 1.4)
        runs: dict[str, list[Run]] = {name: [] for name in ways}
        for round_ in range(a.pairs):
            for i, (name, way) in enumerate(ways.items()):
                runs[name].append(way(work / f"run{round_}-{i}"))
                print(f"round {round_ + 1}/{a.pairs}: {name}: {runs[name][-1]}", flush=True)
        print_table(runs, peers)


def equal_batch(runs: dict[str, list[Run]], row_tokens: float) -> int:
    """plora's rows a step for TRL's real tokens a step (TRL runs first in each round)."""
    trl = runs[TRL]
    return max(1, round(statistics.median(r.tokens_per_step for r in trl) / row_tokens))


if __name__ == "__main__":
    main()
