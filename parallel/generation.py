"""Text in, text out: branch prompts and a trunk prompt become texts generated in one sequence
(the decoding itself is parallel.decoder's)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from parallel.decoder import DecodeResult, DecodeStep, decode_parallel
from parallel.errors import PloraError
from parallel.layout import Message
from parallel.sampling import SamplingOptions
from parallel.tokenizer import chat_trunk, special_tokens

PLORA_CONFIG_ATTR = "plora_config"  # set by parallel.loading on the model it returns


class IdenticalBranchesWarning(UserWarning):
    """Greedy decoding of branches with the same prompt: only the branch coordinate sets them apart."""


@dataclass(frozen=True)
class BranchOutput:
    prompt: str
    text: str
    token_ids: list[int]
    finish_reason: str


@dataclass(frozen=True)
class GenerationResult:
    branches: list[BranchOutput]
    decode: DecodeResult

    @property
    def texts(self) -> list[str]:
        return [b.text for b in self.branches]


@dataclass(frozen=True)
class GenerationDefaults:
    """Layout settings generation must share with training: taken from the adapter when there is one."""

    mask: str = "isolated"
    align: str = "left"


def generation_defaults(model: torch.nn.Module) -> GenerationDefaults:
    config = getattr(model, PLORA_CONFIG_ATTR, None)
    if config is None:
        return GenerationDefaults()
    return GenerationDefaults(mask=config.mask, align=config.align)


def encode_prompt(tokenizer: Any, prompt: str, *, chat: bool, lead: str = "") -> list[int]:
    """Token ids of the trunk prompt; with ``chat``, the user turn in the chat template plus the
    assistant prefix and ``lead`` (a chat parallel record's trunk), so the branches continue the
    assistant's answer. A lead is the answer's opening before its list (``convert --split-lists``),
    so it needs ``chat`` (:func:`check_lead`)."""
    if not chat:
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if tokenizer.chat_template is None:
        raise PloraError(f"{tokenizer.name_or_path}: --chat needs a tokenizer with a chat template")
    try:
        # The trunk tokenize builds for {"messages": [user prompt], "lead": lead, "branches": [...]}.
        return chat_trunk(tokenizer, [Message("user", prompt)], lead=lead).ids.tolist()
    except ValueError as err:
        raise PloraError(f"{tokenizer.name_or_path}: {err}") from None


def check_lead(lead: str, *, prompt: str | None, chat: bool) -> None:
    """A lead opens the assistant's answer to the chat prompt: without both it has nothing to follow
    (a plain prompt holds its own lead)."""
    if lead and (prompt is None or not chat):
        raise PloraError("--lead opens the assistant's answer to the prompt: it needs --prompt and --chat")


def branch_prompts(
    prompt: str | None, branches: Sequence[str] | None, num_branches: int | None, marker: str = ""
) -> list[str]:
    """The branch prompts, from explicit texts or a count of branches that start empty, or with
    ``marker`` (``{k}`` is the branch's number from 1: ``"{k}."`` numbers a list the way the items
    of a ``convert --split-lists`` record begin); one-line errors for a blank prompt, a blank branch,
    neither or both."""
    if prompt is not None and not prompt.strip():
        raise PloraError("the prompt is empty; leave --prompt out for branches without a trunk")
    if branches and num_branches is not None:
        raise PloraError("give branch prompts or --num-branches, not both")
    if branches:
        for i, text in enumerate(branches, 1):
            if not text.strip():
                raise PloraError(f"branch {i} is empty; use --num-branches to start branches from the trunk")
        return list(branches)
    if num_branches is None:
        raise PloraError(
            "nothing to generate: give --branch TEXT (repeatable), --branches-file or --num-branches"
        )
    if num_branches < 1:
        raise PloraError(f"--num-branches must be at least 1, got {num_branches}")
    return [marker.replace("{k}", str(k)) for k in range(1, num_branches + 1)]


def check_alike_branches(*, marker: str, distinct: bool, num_branches: int | None) -> None:
    """``marker`` and ``distinct`` are for branches that start alike (``num_branches``): a marker
    makes their starts, and distinct compares what they generate, which for branches with prompts of
    their own would keep apart answers that may rightly agree."""
    if marker and num_branches is None:
        raise PloraError("--marker starts the branches of --num-branches; give branch prompts whole instead")
    if marker and not marker.strip():
        raise PloraError("--marker is blank; leave it out for branches that start empty")
    if distinct and num_branches is None:
        raise PloraError("--distinct keeps apart the branches of --num-branches, which start alike")


def _cut_at_stop(text: str, stop: Sequence[str]) -> str:
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompt: str | None = None,
    branches: Sequence[str] | None = None,
    *,
    num_branches: int | None = None,
    chat: bool = False,
    lead: str = "",
    marker: str = "",
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    distinct: bool = False,
    stop: Sequence[str] = (),
    mask: str | None = None,
    align: str | None = None,
    on_step: Callable[[DecodeStep], None] | None = None,
) -> GenerationResult:
    """Generate every branch under the trunk ``prompt`` in one sequence; returns texts and token ids.

    Either ``branches`` (prompts each branch starts with) or ``num_branches`` (branches that start
    from the trunk, empty or with ``marker``: see :func:`branch_prompts`). ``lead`` opens the
    assistant's answer under ``chat`` (see :func:`encode_prompt`). ``distinct``: no two branches
    generate the same tokens (parallel.sampling.DistinctPaths). ``mask``/``align`` default to the
    adapter's (see parallel.loading). The text of a branch stops before its EOS or its first stop
    string.
    """
    check_alike_branches(marker=marker, distinct=distinct, num_branches=num_branches)
    texts = branch_prompts(prompt, branches, num_branches, marker)
    sampling = SamplingOptions(
        temperature=temperature, top_p=top_p, top_k=top_k, seed=seed, distinct=distinct
    )
    if sampling.greedy and not distinct and len(texts) > 1 and len(set(texts)) < len(texts):
        warnings.warn(
            "greedy decoding of branches with the same prompt: only their branch coordinate (2D RoPE) "
            "tells them apart, and they often write the same text; use --distinct, --marker '{k}.', "
            "--temperature > 0 or distinct branch prompts for different branches",
            IdenticalBranchesWarning,
            stacklevel=2,
        )
    defaults = generation_defaults(model)
    check_lead(lead, prompt=prompt, chat=chat)
    trunk = encode_prompt(tokenizer, prompt, chat=chat, lead=lead) if prompt is not None else []
    prompt_ids = [list(tokenizer(t, add_special_tokens=False)["input_ids"]) if t else [] for t in texts]
    special = special_tokens(tokenizer)
    stop = [s for s in stop if s]
    # A stop string first shows up in the tokens ending with the newest one. It spans at most 4 tokens
    # per character (a token is at least one byte), so decoding that tail, not the whole branch, keeps
    # the check linear in the branch's length; 2 more tokens keep a decoder's leading-space cleanup
    # away from it.
    tail = 4 * max((len(s) for s in stop), default=0) + 2

    def stop_when(index: int, generated: list[int]) -> bool:
        text = tokenizer.decode(generated[-tail:])
        return any(s in text for s in stop)

    result = decode_parallel(
        model,
        trunk,
        prompt_ids,
        special=special,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        mask=mask or defaults.mask,
        align=align or defaults.align,
        stop_when=stop_when if stop else None,
        on_step=on_step,
    )
    outputs = []
    for text, ids, reason in zip(texts, result.tokens, result.finish_reasons, strict=True):
        shown = ids[:-1] if reason == "eos" else ids
        outputs.append(BranchOutput(text, _cut_at_stop(tokenizer.decode(shown), stop), ids, reason))
    return GenerationResult(outputs, result)
