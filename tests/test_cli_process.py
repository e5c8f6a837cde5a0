"""Process behaviour of the `plora` script (issue 10, item 3): Ctrl-C and SIGTERM stop every command with
one line and the shell's status for that signal (130, 143), never 0, and leave what SIGKILL would leave,
so that `--resume` finishes the work; a system error exits 2 like any other error."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_helpers import one_line_error, run_plora
from train_helpers import adapter_tensors, cli_args, subprocess_env

from parallel.errors import Rejects
from parallel.layout import PackingOptions
from pipeline.shards import JOURNAL_NAME, open_shards
from pipeline.tokenize import TokenizeJob, tokenize_to_shards
from trainer.checkpoint import final_checkpoint, lora_dir, read_trainer_state

STOPS = [(signal.SIGINT, 130, "plora: interrupted"), (signal.SIGTERM, 143, "plora: terminated")]
STOP_IDS = ["SIGINT", "SIGTERM"]
ROWS_PER_SHARD = 4
TRAIN_NAME = "hf_parallel_lora"
TRAIN_FLAGS = ["--epochs", "2", "--batch-size", "2", "--save-interval", "2", "--log-interval", "1"]


@pytest.fixture(scope="module")
def records(tmp_path_factory: pytest.TempPathFactory, sample_dir: Path) -> Path:
    """A few hundred texts: many small shards, so that a run can be stopped between two of them."""
    paragraphs = [p for p in (sample_dir / "sample_text.txt").read_text(encoding="utf-8").split("\n\n") if p]
    path = tmp_path_factory.mktemp("process") / "records.jsonl"
    lines = [json.dumps({"text": f"{i}. {paragraphs[i % len(paragraphs)]}"}) + "\n" for i in range(400)]
    path.write_text("".join(lines), encoding="utf-8")
    return path


@pytest.fixture(scope="module")
def whole_shards(tmp_path_factory: pytest.TempPathFactory, records: Path, tiny_model_dir: Path) -> Path:
    out = tmp_path_factory.mktemp("whole") / "shards"
    job = TokenizeJob(
        (records,), tiny_model_dir, out, packing=PackingOptions(branches=2), rows_per_shard=ROWS_PER_SHARD
    )
    tokenize_to_shards(job, Rejects(), progress=False)
    return out


def _stop_when(run: subprocess.Popen[str], ready: object, signum: int, what: str) -> tuple[str, str]:
    """Send ``signum`` once ``ready()`` holds (mid-run); return the run's stdout and stderr."""
    deadline = time.monotonic() + 180
    while not ready() and run.poll() is None and time.monotonic() < deadline:  # type: ignore[operator]
        time.sleep(0.005)
    assert run.poll() is None, f"{what} ended before it could be stopped; give it more work"
    run.send_signal(signum)
    return run.communicate(timeout=120)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status", "line"), STOPS, ids=STOP_IDS)
def test_stopped_tokenize_says_so_and_resumes_to_identical_shards(
    signum: int,
    status: int,
    line: str,
    plora_bin: Path,
    records: Path,
    tiny_model_dir: Path,
    whole_shards: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "shards"
    args = ["tokenize", records, "--tokenizer", tiny_model_dir, "--out", out, "--branches", "2"]
    args += ["--rows-per-shard", ROWS_PER_SHARD, "--no-progress"]
    command = [str(a) for a in (plora_bin, *args)]
    run = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _, stderr = _stop_when(run, lambda: (out / "shard-00003.arrow").exists(), signum, "tokenize")

    assert run.returncode == status, stderr
    assert stderr == line + "\n"
    # What SIGKILL leaves: whole shards and the journal, no manifest that would pass as complete.
    assert not (out / "manifest.json").exists() and (out / JOURNAL_NAME).exists()
    resumed = run_plora(plora_bin, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed after" in resumed.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        p.name: p.read_bytes() for p in whole_shards.iterdir()
    }
    open_shards(out)


@pytest.mark.slow
def test_ctrl_c_in_a_terminal_stops_tokenize_workers_quietly(
    plora_bin: Path, records: Path, tiny_model_dir: Path, whole_shards: Path, tmp_path: Path
) -> None:
    """A terminal sends Ctrl-C to the whole process group: pool workers must leave it to the parent
    (no traceback from each, no parent waiting forever for a dead worker's batch)."""
    out = tmp_path / "shards"
    args = ["tokenize", records, "--tokenizer", tiny_model_dir, "--out", out, "--branches", "2"]
    args += ["--rows-per-shard", ROWS_PER_SHARD, "--no-progress"]
    command = [str(a) for a in (plora_bin, *args, "--num-proc", "2")]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    run = subprocess.Popen(command, start_new_session=True, **pipes)  # its own group, as in a terminal
    deadline = time.monotonic() + 180
    while not (out / "shard-00001.arrow").exists() and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert run.poll() is None, "tokenize ended before it could be stopped; give it more work"
    os.killpg(run.pid, signal.SIGINT)
    _, stderr = run.communicate(timeout=60)

    assert (run.returncode, stderr) == (130, "plora: interrupted\n")
    resumed = run_plora(plora_bin, *args, "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert {p.name: p.read_bytes() for p in out.iterdir()} == {
        p.name: p.read_bytes() for p in whole_shards.iterdir()
    }


@pytest.fixture(scope="module")
def uninterrupted(
    tmp_path_factory: pytest.TempPathFactory, plora_bin: Path, train_shards: Path, tiny_model_dir: Path
) -> Path:
    """The final adapter of the stopped runs' training, run without a stop."""
    out = tmp_path_factory.mktemp("uninterrupted") / "out"
    run = run_plora(
        plora_bin, *cli_args(train_shards, tiny_model_dir, out, *TRAIN_FLAGS), env=subprocess_env()
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return final_checkpoint(out, TRAIN_NAME)


def _start_train(plora_bin: Path, args: list[str]) -> subprocess.Popen[str]:
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    return subprocess.Popen([str(plora_bin), *args], env=subprocess_env(), **pipes)


def _step_checkpoints(out: Path) -> list[Path]:
    return sorted(lora_dir(out).glob(f"{TRAIN_NAME}_step*"))


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "status", "line"), STOPS, ids=STOP_IDS)
def test_stopped_train_saves_says_how_to_resume_and_resumes_to_the_same_adapter(
    signum: int,
    status: int,
    line: str,
    plora_bin: Path,
    train_shards: Path,
    tiny_model_dir: Path,
    uninterrupted: Path,
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    args = cli_args(train_shards, tiny_model_dir, out, *TRAIN_FLAGS)
    run = _start_train(plora_bin, args)
    _, stderr = _stop_when(run, lambda: len(_step_checkpoints(out)) >= 2, signum, "train")

    # The step under way finished and was saved (between --save-interval steps, too): one line says so.
    assert run.returncode == status, stderr[-3000:]
    assert "Traceback" not in stderr, stderr[-3000:]
    last = max(int(p.name.rsplit("step", 1)[1]) for p in _step_checkpoints(out))
    saved = lora_dir(out) / f"{TRAIN_NAME}_step{last}"
    said = f"{line} at step {last}: saved {saved}; to continue, run the same command with --resume latest"
    assert stderr.endswith("\n" + said + "\n"), stderr[-3000:]
    assert not final_checkpoint(out, TRAIN_NAME).exists()
    assert not [p for p in lora_dir(out).iterdir() if p.name.startswith(".")]  # temporaries cleaned up
    resumed = run_plora(plora_bin, *args, "--resume", "latest", env=subprocess_env(), timeout=300)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming at step {last}" in resumed.stderr.replace("\n", " ")
    adapter = "adapter_model.safetensors"
    assert (final_checkpoint(out, TRAIN_NAME) / adapter).read_bytes() == (
        uninterrupted / adapter
    ).read_bytes()


def _catches(pid: int, signum: int) -> bool:
    """Whether the process has a handler for ``signum`` (SigCgt in /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line.split()[1] for line in status.splitlines() if line.startswith("SigCgt:")), 16)
    return bool(caught >> (signum - 1) & 1)


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="reads signal masks from /proc")
def test_a_second_signal_ends_train_at_once_leaving_whole_checkpoints(
    plora_bin: Path, train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    out = tmp_path / "out"
    run = _start_train(plora_bin, cli_args(train_shards, tiny_model_dir, out, *TRAIN_FLAGS))
    deadline = time.monotonic() + 180
    while len(_step_checkpoints(out)) < 2 and run.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert run.poll() is None, "train ended before it could be stopped; give it more work"
    run.send_signal(signal.SIGTERM)
    while _catches(run.pid, signal.SIGTERM) and run.poll() is None:  # until the first one is handled
        time.sleep(0.001)
    run.send_signal(signal.SIGTERM)
    _, stderr = run.communicate(timeout=120)

    assert run.returncode == -signal.SIGTERM, stderr[-3000:]  # the default action: no line, no save
    assert not final_checkpoint(out, TRAIN_NAME).exists()
    for checkpoint in _step_checkpoints(out):  # a save under way stays a hidden temporary
        step = read_trainer_state(checkpoint).step
        assert checkpoint.name == f"{TRAIN_NAME}_step{step}"
        assert adapter_tensors(checkpoint)  # reads back whole


def test_system_error_exits_2_naming_the_users_path(plora_bin: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory\n")
    line = one_line_error(run_plora(plora_bin, "tiny-model", "--out", blocker / "model"))
    assert str(blocker) in line and ".tmp" not in line
