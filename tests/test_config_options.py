"""One source for options (issue 8 item 3) and ``--config FILE`` (issue 9 item 3).

`plora train` and `plora eval` are built from the fields of TrainConfig and EvalOptions: every field is
an option, eval shares train's definition where it is the same option, and a YAML or TOML file sets any
of them, with the command line overriding it. Parsing is tested in-process (Typer's CliRunner); one
subprocess checks the one-line error, and the README's own example runs a short real training.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml
from cli_helpers import one_line_error, run_plora
from typer.testing import CliRunner

import cli.main  # noqa: F401 - registers every command on the app
from cli.app import app
from parallel.errors import PloraError
from trainer.config import EvalOptions, TrainConfig, cli_flag, cli_opt
from trainer.configfile import CONFIG_FILE, spellings
from trainer.metrics import logs_dir

COMMANDS = typer.main.get_command(app).commands  # type: ignore[attr-defined]
README = Path(__file__).resolve().parents[1] / "README.md"
# Fields whose valid values are a short list: another member of it (the rest follow from their type).
CHOICES = {"attn": "sdpa", "mask": "columnar", "dtype": "float32", "schedule": "linear", "device": "cpu"}


def _invoke(*args: object) -> Any:
    """`plora ARGS` in-process; a PloraError (what main turns into one line) is raised here."""
    result = CliRunner().invoke(app, [str(a) for a in args], catch_exceptions=True)
    if isinstance(result.exception, PloraError):
        raise result.exception
    assert result.exit_code == 0, result.output
    return result


def _other_value(f: dataclasses.Field, hint: Any) -> Any:
    """A valid value of the field that is not its default."""
    if f.name in CHOICES:
        return CHOICES[f.name]
    base = next((a for a in typing.get_args(hint) if a is not type(None)), hint)
    default = None if f.default is dataclasses.MISSING else f.default
    if typing.get_origin(base) is list:
        return [2, 3]
    if base is bool:
        return not default
    if base is int:
        return (default or 0) + 3
    if base is float:
        return default / 2 if default else 0.25
    return f"x-{f.name}"


def _flags(f: dataclasses.Field, value: Any) -> list[str]:
    """The command-line words that give ``f`` the value ``value``."""
    name = cli_flag(f).split("/")[0]
    if isinstance(value, bool):
        return [name if value else "--no-" + name[2:]]
    return [name, ",".join(map(str, value)) if isinstance(value, list) else str(value)]


def _non_defaults(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: _other_value(f, hints[f.name]) for f in dataclasses.fields(cls)}


def _printed(command: str, *args: object) -> dict[str, Any]:
    return yaml.safe_load(_invoke(command, *args, "--print-config").stdout)


@pytest.mark.parametrize(("command", "cls"), [("train", TrainConfig), ("eval", EvalOptions)])
def test_every_field_is_an_option_and_print_config_reads_back(
    command: str, cls: type, tmp_path: Path
) -> None:
    values = _non_defaults(cls)
    args = [word for f in dataclasses.fields(cls) for word in _flags(f, values[f.name])]
    printed = _printed(command, *args)
    assert printed == values  # each flag reached its field, and nothing else is in the config
    config = tmp_path / "effective.yaml"
    config.write_text(_invoke(command, *args, "--print-config").stdout)
    assert _printed(command, "--config", config) == values
    params = {p.name for p in COMMANDS[command].params}
    assert {f.name for f in dataclasses.fields(cls)} <= params


def test_eval_shares_the_train_definition_of_the_same_option() -> None:
    train = {f.name: f for f in dataclasses.fields(TrainConfig)}
    evals = dataclasses.fields(EvalOptions)
    shared = [f.name for f in evals if f.name in train and cli_opt(f) is cli_opt(train[f.name])]
    same_thing = {"shards", "base_model", "tokenizer_path", "device", "attn", "trust_remote_code", "progress"}
    assert same_thing <= set(shared)
    params = {c: {p.name: p for p in COMMANDS[c].params} for c in ("train", "eval", "generate")}
    for name in shared:
        assert params["eval"][name].opts == params["train"][name].opts, name
        assert params["eval"][name].help == params["train"][name].help, name
    for name in ("device", "trust_remote_code"):  # generate loads models the same way
        assert params["generate"][name].help == params["train"][name].help


def test_a_config_file_sets_options_and_flags_override_it(tmp_path: Path) -> None:
    config = tmp_path / "run.yaml"
    # A field name, a dashed option name, the guide's spelling and an alias; 1e-4 is text to PyYAML.
    config.write_text(
        "shards: s\nbase-model: m\nlora_rank: 4\nlr: 1e-4\npair_indices: [2, 4]\nprogress: false\n"
    )
    printed = _printed("train", "--config", config)
    assert (printed["shards"], printed["base_model"], printed["lora_rank"]) == ("s", "m", 4)
    assert printed["learning_rate"] == 1e-4 and printed["pair_indices"] == [2, 4] and not printed["progress"]
    overridden = _printed("train", "--lora_rank", "6", "--config", config, "--progress", "--pair-indices=1")
    assert overridden["lora_rank"] == 6 and overridden["progress"] and overridden["pair_indices"] == [1]
    assert overridden["learning_rate"] == 1e-4  # what the command line leaves alone comes from the file
    toml = tmp_path / "run.toml"
    toml.write_text('shards = "s"\nbase_model = "m"\nmask = "columnar"\nsplit = "val"\njson = true\n')
    assert {k: _printed("eval", "--config", toml)[k] for k in ("mask", "split", "as_json")} == {
        "mask": "columnar",
        "split": "val",
        "as_json": True,
    }
    toml.write_text('shards = "s"\nbase_model = "m"\nuse_wandb = true\n')  # a train option
    with pytest.raises(PloraError, match=r"run\.toml: unknown key 'use_wandb'$"):
        _invoke("eval", "--config", toml)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("lerning_rate: 0.1\n", "run.yaml: unknown key 'lerning_rate' (did you mean 'learning_rate'?)"),
        ("lora_rank: 8.5\n", "run.yaml: key 'lora_rank' must be an integer, got 8.5"),
        ("overwrite: yes please\n", "run.yaml: key 'overwrite' must be true or false, got 'yes please'"),
        ("learning_rate: fast\n", "run.yaml: key 'learning_rate' must be a number, got 'fast'"),
        ("pair_indices: [1, x]\n", "run.yaml: key 'pair_indices' must be a list of integers, got [1, 'x']"),
        ("lr: 0.1\nlearning_rate: 0.2\n", "run.yaml: 'lr' and 'learning_rate' both set learning_rate"),
        ("- lora_rank\n", "run.yaml: expected a mapping of option names to values, got list"),
        ("lora_rank: [\n", "run.yaml: not valid YAML (line 2: "),
    ],
)
def test_a_bad_config_file_names_the_file_and_the_key(
    text: str, message: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    Path("run.yaml").write_text(text)
    with pytest.raises(PloraError, match=f"^{re.escape(message)}"):
        _invoke("train", "--shards", "s", "--base-model", "m", "--config", "run.yaml", "--print-config")


def test_a_bad_config_is_one_line_from_the_real_command(plora_bin: Path, tmp_path: Path) -> None:
    (tmp_path / "run.yaml").write_text("shards: s\nbase_model: m\nlerning_rate: 0.1\n")
    done = run_plora(plora_bin, "train", "--config", "run.yaml", cwd=tmp_path)
    line = one_line_error(done)
    assert line == "plora: error: run.yaml: unknown key 'lerning_rate' (did you mean 'learning_rate'?)"


def test_every_spelling_of_an_option_is_a_config_key() -> None:
    (lr,) = [f for f in dataclasses.fields(TrainConfig) if f.name == "learning_rate"]
    assert spellings(lr) == ["learning_rate", "learning-rate", "lr"]
    (patch,) = [f for f in dataclasses.fields(TrainConfig) if f.name == "patch_rope"]
    assert spellings(patch) == ["patch_rope", "patch-rope"]  # never the "off" half


def _readme_example() -> str:
    text = README.read_text(encoding="utf-8")
    (block,) = re.findall(r"```yaml\n# run\.yaml.*?\n(.*?)```", text, flags=re.S)
    return block


def test_the_readme_config_example_prints_and_trains(
    train_shards: Path, tiny_model_dir: Path, tmp_path: Path
) -> None:
    config = tmp_path / "run.yaml"
    config.write_text(_readme_example())
    example = yaml.safe_load(config.read_text())
    out = tmp_path / "out"
    # The example names a real model; here the tiny one takes its place, on CPU, for two small steps.
    here = ["--shards", train_shards, "--base-model", tiny_model_dir, "--out-dir", out, "--device", "cpu"]
    small = ["--dtype", "float32", "--batch-size", "4", "--max-steps", "2", "--no-progress"]
    args = ["train", "--config", config, *here, *small]
    printed = _printed(*args)
    for key, value in example.items():
        if f"--{key.replace('_', '-')}" not in args:
            assert printed[key] == value, key
    _invoke(*args, "--overwrite")
    saved = logs_dir(out, printed["lora_name"]) / CONFIG_FILE
    # The run directory keeps its config, without what belonged to that one invocation (--overwrite would
    # replace the run when the file is used again).
    run_config = {k: v for k, v in printed.items() if k not in ("overwrite", "resume")}
    assert yaml.safe_load(saved.read_text()) == run_config
    again = _printed("train", "--config", saved, "--resume", "latest")
    assert again == {**run_config, "overwrite": False, "resume": "latest"}
