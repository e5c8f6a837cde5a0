"""`plora generate`: several branches in one sequence, streamed; `plora export`: a self-contained model."""

from __future__ import annotations

import contextlib
import functools
import json
import sys
import warnings
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.live import Live
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from cli import options
from cli.app import app
from parallel.errors import InputError, PloraError
from parallel.layout import DEFAULT_ROPE_2D_RATIO, DEFAULT_STRIDE

DEVICES = ("auto", "cpu", "cuda")


def read_branches_file(path: Path) -> list[str]:
    """Branch prompts: a ``.json`` array of strings, or one prompt per non-blank line of a text file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise PloraError(f"--branches-file {path}: no such file") from None
    except (OSError, UnicodeDecodeError) as err:
        raise PloraError(f"--branches-file {path}: cannot read it ({err})") from None
    if path.suffix.lower() != ".json":
        prompts = [line for line in text.splitlines() if line.strip()]
        if not prompts:
            raise InputError(str(path), None, "no branch prompts (expected one prompt per line)")
        return prompts
    try:
        items = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(str(path), err.lineno, f"not valid JSON ({err.msg})") from None
    if not isinstance(items, list) or not items or not all(isinstance(i, str) for i in items):
        raise InputError(str(path), None, "expected a non-empty JSON array of branch prompt strings")
    return items


def _device(device: str) -> str:
    import torch  # noqa: PLC0415 - slow import

    if device not in DEVICES and not device.startswith("cuda:"):
        raise PloraError(f"--device must be one of {', '.join(DEVICES)} or cuda:N, got {device!r}")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise PloraError(f"--device {device}: CUDA is not available here")
    return device


def _dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "bfloat16" if device.startswith("cuda") else "float32"
    return dtype


def _check_request(
    *,
    temperature: float,
    top_p: float,
    top_k: int,
    seed: int | None,
    mask: str | None,
    max_new_tokens: int,
    attn: str,
    device: str,
    dtype: str,
    bare_rope: tuple[float, int] | None,
) -> None:
    """Every setting that needs no model, refused before one loads (that takes seconds)."""
    from parallel.decoder import check_decoding  # noqa: PLC0415
    from parallel.forward import check_attn_device, check_attn_mask, resolve_attn  # noqa: PLC0415 - slow imports
    from parallel.loading import check_dtype  # noqa: PLC0415
    from parallel.sampling import SamplingOptions  # noqa: PLC0415

    SamplingOptions(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    check_decoding(mask=mask, align=None, max_new_tokens=max_new_tokens)
    resolve_attn(attn, device)
    check_attn_device(attn, device)
    if mask is not None:  # else the adapter's; a forward refuses a columnar one
        check_attn_mask(attn, mask)
    check_dtype(dtype)
    if bare_rope is not None:  # an adapter brings its own
        ratio, stride = bare_rope
        if not 0.0 <= ratio <= 1.0:
            raise PloraError(f"--rope-2d-ratio must lie in [0, 1], got {ratio}")
        if stride < 0:
            raise PloraError(f"--stride must be >= 0, got {stride}")


class BranchStream:
    """The branches' texts as they grow: token ids per branch, decoded text, and new text to emit."""

    def __init__(self, tokenizer: Any, count: int) -> None:
        self.tokenizer = tokenizer
        self.ids: list[list[int]] = [[] for _ in range(count)]
        self.texts = [""] * count
        self.emitted = [""] * count

    def add(self, branch: int, token: int) -> str:
        """Record a token; return the text that became final with it (held back while a character is
        incomplete, which byte-level tokens can leave)."""
        self.ids[branch].append(token)
        text = self.tokenizer.decode(self.ids[branch], skip_special_tokens=True)
        self.texts[branch] = text
        done = self.emitted[branch]
        if text.endswith("\ufffd") or not text.startswith(done):
            return ""
        self.emitted[branch] = text
        return text[len(done) :]


def _table(prompts: list[str], stream: BranchStream, finished: dict[int, str]) -> Table:
    table = Table(show_lines=False, expand=True, pad_edge=False)
    for k in range(len(prompts)):
        state = f" ({finished[k]})" if k in finished else ""
        table.add_column(f"branch {k + 1}{state}", ratio=1, overflow="fold")
    cells = []
    for k, prompt in enumerate(prompts):
        cell = Text(prompt, style="dim")
        cell.append(stream.texts[k])
        cells.append(cell)
    table.add_row(*cells)
    return table


def _warn(err: Console, message: Warning | str, category: type[Warning]) -> None:
    """Our own warnings as one line on stderr; others (transformers, peft) stay silent here."""
    from parallel.generation import IdenticalBranchesWarning  # noqa: PLC0415 - slow import (torch)

    if issubclass(category, IdenticalBranchesWarning):
        err.print(f"plora: warning: {escape(str(message))}", soft_wrap=True)


@app.command("generate")
def generate_command(
    adapter: Path | None = typer.Option(
        None, "--adapter", help="Adapter directory (plora train) or exported model (plora export)."
    ),
    base_model: str | None = options.ADAPTER_BASE_MODEL,
    prompt: str | None = typer.Option(None, "--prompt", help="The trunk every branch continues."),
    chat: bool = typer.Option(False, "--chat", help="Wrap --prompt in the tokenizer's chat template."),
    lead: str = typer.Option(
        "", "--lead", help="With --chat: the answer's opening before its items, as in split-lists records."
    ),
    branch: list[str] | None = typer.Option(None, "--branch", help="A branch prompt (repeatable)."),
    branches_file: Path | None = typer.Option(
        None, "--branches-file", help="Branch prompts: one per line, or a .json array of strings."
    ),
    num_branches: int | None = typer.Option(
        None, "--num-branches", help="N branches that all start from the trunk."
    ),
    marker: str = typer.Option(
        "",
        "--marker",
        help="With --num-branches: each branch starts with this text, {k} its number from 1 "
        "('{k}.' numbers a list as split-lists records do; '-' bullets it).",
    ),
    distinct: bool = typer.Option(
        False,
        "--distinct",
        help="With --num-branches: no two branches generate the same tokens; where one would repeat "
        "another's, it takes its next best token (sampling: draws from the rest).",
    ),
    max_new_tokens: int = typer.Option(128, "--max-new-tokens", help="Token budget of each branch."),
    temperature: float = typer.Option(0.0, "--temperature", help="0 = greedy."),
    top_p: float = typer.Option(1.0, "--top-p", help="Nucleus sampling (1 = off)."),
    top_k: int = typer.Option(0, "--top-k", help="Keep the k most likely tokens (0 = off)."),
    seed: int | None = typer.Option(None, "--seed", help="Makes sampling reproducible."),
    stop: list[str] | None = typer.Option(None, "--stop", help="A branch stops at this text (repeatable)."),
    mask: str | None = typer.Option(None, "--mask", help="isolated | columnar (default: the adapter's)."),
    as_json: bool = typer.Option(False, "--json", help="JSON lines: one per token, then a summary."),
    device: str = options.DEVICE,
    dtype: str = typer.Option(
        "auto", "--dtype", help="auto (bfloat16 on CUDA, float32 on CPU) | float32 | bfloat16 | float16."
    ),
    attn: str = typer.Option("sdpa", "--attn", help="sdpa | eager | flex | auto | prefix."),
    trust_remote_code: bool = options.TRUST_REMOTE_CODE,
    rope_2d_ratio: float = typer.Option(
        DEFAULT_ROPE_2D_RATIO, "--rope-2d-ratio", help="Bare base model only (an adapter brings its own)."
    ),
    stride: int = typer.Option(DEFAULT_STRIDE, "--stride", help="Bare base model only."),
) -> None:
    """Generate several branches in one sequence with one KV cache, streamed side by side."""
    from parallel.generation import (  # noqa: PLC0415 - torch
        IdenticalBranchesWarning,
        branch_prompts,
        check_alike_branches,
        check_lead,
        generate,
    )
    from parallel.loading import load_parallel_model  # noqa: PLC0415 - slow imports

    texts = list(branch or [])
    if branches_file is not None:
        texts += read_branches_file(branches_file)
    check_alike_branches(marker=marker, distinct=distinct, num_branches=num_branches)  # before loading
    prompts = branch_prompts(prompt, texts or None, num_branches, marker)
    check_lead(lead, prompt=prompt, chat=chat)
    if adapter is None and base_model is None:
        raise PloraError("give --adapter DIR (or an exported model), or --base-model DIR for the bare base")
    where = _device(device)
    _check_request(
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        mask=mask,
        max_new_tokens=max_new_tokens,
        attn=attn,
        device=where,
        dtype=_dtype(dtype, where),
        bare_rope=(rope_2d_ratio, stride) if adapter is None else None,
    )
    err = Console(stderr=True)
    with err.status("loading the model", spinner="dots") if not as_json else contextlib.nullcontext():
        loaded = load_parallel_model(
            base_model,
            adapter,
            dtype=_dtype(dtype, where),
            device=where,
            attn=attn,
            trust_remote_code=trust_remote_code,
            ratio=rope_2d_ratio,
            stride=stride,
            mask=mask,
        )
    model, tokenizer, _ = loaded
    run = functools.partial(
        generate,
        model,
        tokenizer,
        prompt,
        texts or None,
        num_branches=num_branches,
        chat=chat,
        lead=lead,
        marker=marker,
        max_new_tokens=max_new_tokens,
        temperature=temperature,
        top_p=top_p,
        top_k=top_k,
        seed=seed,
        distinct=distinct,
        stop=stop or (),
        mask=mask,
    )
    stream = BranchStream(tokenizer, len(prompts))
    finished: dict[int, str] = {}
    out = Console()

    def on_json_step(step: Any) -> None:
        for k, token in step.tokens.items():
            text = stream.add(k, token)
            line = {"type": "token", "step": step.step, "branch": k, "token_id": token, "text": text}
            sys.stdout.write(json.dumps(line, ensure_ascii=False, allow_nan=False) + "\n")
        sys.stdout.flush()

    with warnings.catch_warnings():
        warnings.simplefilter("always", IdenticalBranchesWarning)
        warnings.showwarning = lambda message, category, *args, **kwargs: _warn(err, message, category)
        if as_json:
            result = run(on_step=on_json_step)
        else:
            if prompt is not None:
                out.print(Text("trunk: ", style="bold") + Text(prompt))
            with Live(_table(prompts, stream, finished), console=out, refresh_per_second=8) as live:

                def on_step(step: Any) -> None:
                    for k, token in step.tokens.items():
                        stream.add(k, token)
                    live.update(_table(prompts, stream, finished))

                result = run(on_step=on_step)
                finished.update({k: b.finish_reason for k, b in enumerate(result.branches)})
                stream.texts = result.texts  # final texts: EOS dropped, cut at the stop string
                live.update(_table(prompts, stream, finished))
            if not out.is_terminal:
                out.line()  # Live leaves its last frame without a newline when not on a terminal
    decode = result.decode
    if as_json:
        summary = {
            "type": "summary",
            "branches": [
                {
                    "branch": k,
                    "prompt": b.prompt,
                    "text": b.text,
                    "token_ids": b.token_ids,
                    "tokens": len(b.token_ids),
                    "finish_reason": b.finish_reason,
                }
                for k, b in enumerate(result.branches)
            ],
            "prompt_tokens": decode.prompt_tokens,
            "generated_tokens": decode.generated_tokens,
            "kv_cache_tokens": decode.cache_tokens,
            "steps": decode.steps,
            "seconds": round(decode.seconds, 4),
            # Infinity (no time measured) is not JSON
            "tokens_per_second": round(decode.tokens_per_second, 2) if decode.seconds > 0 else None,
        }
        sys.stdout.write(json.dumps(summary, ensure_ascii=False, allow_nan=False) + "\n")
        return
    counts = ", ".join(
        f"{k + 1}: {len(b.token_ids)} ({b.finish_reason})" for k, b in enumerate(result.branches)
    )
    out.print(
        f"[bold]{decode.generated_tokens}[/] tokens in {decode.seconds:.2f}s = "
        f"[bold]{decode.tokens_per_second:.1f} tokens/s[/] over {len(result.branches)} branches "
        f"({decode.prompt_tokens} prompt tokens, {decode.cache_tokens} in the one KV cache)"
    )
    out.print(f"tokens per branch: {counts}")


@app.command("export")
def export_command(
    adapter: Path = typer.Option(..., "--adapter", help="Adapter directory written by plora train."),
    out: Path = typer.Option(..., "--out", help="Directory to write the self-contained model to."),
    merge: bool = typer.Option(False, "--merge", help="Fold the LoRA weights into the base weights."),
    base_model: str | None = options.ADAPTER_BASE_MODEL,
    dtype: str = typer.Option("float32", "--dtype", help="float32 | bfloat16 | float16 weights."),
    trust_remote_code: bool = options.TRUST_REMOTE_CODE,
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace a non-empty --out (only once the new model is whole)."
    ),
) -> None:
    """Write a model directory (weights, tokenizer, plora.json) that loads without the base model."""
    from parallel.loading import export_model  # noqa: PLC0415 - slow imports

    err = Console(stderr=True)
    with err.status(f"exporting {adapter}", spinner="dots"):
        path = export_model(
            adapter,
            out,
            merge=merge,
            base_model=base_model,
            dtype=dtype,
            trust_remote_code=trust_remote_code,
            overwrite=overwrite,
        )
    kind = "merged weights" if merge else "base weights + adapter/"
    Console().print(f"exported {escape(str(adapter))} -> [bold]{escape(str(path))}[/] ({kind}, plora.json)")
