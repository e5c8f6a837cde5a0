"""Parallel generation: a trunk and K branches decoded together in one sequence with one KV cache.

Coordinates are the contract's (parallel.layout.build_row, docs/layout.md): the trunk (the prompt
less its last token) is branch 0 at times ``0..M-1``; branch b's start token, its prompt and then
its generated tokens follow at times ``start_b + j`` (``start_b = M`` with left align; with right
align the branch prompts end on one column). Without a trunk the branches are numbered from 0,
start at time 0 and begin with BOS (EOS where the tokenizer has no BOS).

Decoding:

- the prefill feeds the trunk and the branch prompts in one forward, with the contract's mask;
- every step feeds one token per unfinished branch in one forward: ``input_ids [1, n]``, the
  encoded 2D ``position_ids [1, n]`` (parallel.rope2d) and the mask of those n queries against
  every token so far (``parallel.masks`` with ``num_queries``). A finished branch stays in the
  cache and costs nothing more.
- every branch begins with the row's start token at its own coordinate (parallel.layout.branch_start:
  the trunk's last token, moved into each branch); the logits that predict a branch's next token are
  those of its last token, so a branch that starts empty takes its first token from its own start.

Columnar mode lets a token see every branch's earlier columns, so tokens must be produced in time
order for the result to be the sequence the contract describes: decoding runs column by column
(all branches advance together), the prefill stops at the first column where some branch must
sample, and the rest of a longer branch prompt is fed column by column as forced tokens. A branch
that finishes feeds its last token once more so that later columns see it, as they would in
training. Isolated mode needs none of this (branches never see each other): every prompt goes into
the prefill and a finished branch's last token is never fed.
"""

from __future__ import annotations

import inspect
import time
import warnings
from collections import deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from parallel.errors import PloraError
from parallel.forward import build_attention_mask, check_attn_device
from parallel.layout import (
    ALIGN_MODES,
    MASK_MODES,
    Message,
    SpecialTokens,
    TokenSequence,
    branch_start_times,
    build_row,
)
from parallel.rope2d import encode_positions, model_stride, position_overflow
from parallel.skinny_linear import weight_major_linears
from parallel.tokenizer import chat_trunk, special_tokens

PLORA_CONFIG_ATTR = "plora_config"  # set by parallel.loading on the model it returns


class IdenticalBranchesWarning(UserWarning):
    """Greedy decoding of branches with the same prompt: only the branch coordinate sets them apart."""


# --------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SamplingOptions:
    """temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not self.temperature >= 0:
            raise PloraError(f"--temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise PloraError(f"--top-p must lie in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise PloraError(f"--top-k must be >= 0 (0 = off), got {self.top_k}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


class Sampler:
    """Draws one token per row of logits; one generator, so a seed makes the whole run reproducible."""

    def __init__(self, options: SamplingOptions, device: torch.device) -> None:
        self.options = options
        self.generator = torch.Generator(device=device)
        if options.seed is None:
            self.generator.seed()
        else:
            self.generator.manual_seed(options.seed)

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        """``logits [n, V]`` -> token ids ``[n]``."""
        o = self.options
        if o.greedy:
            return logits.argmax(-1)
        scores = logits.float() / o.temperature
        if o.top_k > 0:
            kth = torch.topk(scores, min(o.top_k, scores.shape[-1]), dim=-1).values[:, -1:]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if o.top_p < 1:
            ordered, order = scores.sort(dim=-1, descending=True)
            probs = ordered.softmax(-1)
            # Drop a token when the tokens before it already hold top_p; the first one always stays.
            drop = probs.cumsum(-1) - probs >= o.top_p
            scores = scores.scatter(-1, order, ordered.masked_fill(drop, float("-inf")))
        probs = scores.softmax(-1)
        return torch.multinomial(probs, 1, generator=self.generator).squeeze(1)


# --------------------------------------------------------------------------------------
# Decoding token ids
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class DecodeStep:
    """What one forward produced: the token sampled for each branch (by index) and its raw logits."""

    step: int
    tokens: dict[int, int]
    logits: dict[int, torch.Tensor]


@dataclass
class BranchState:
    branch_id: int
    forced: deque[int]  # prompt tokens still to feed (columnar mode, longer prompts)
    next_time: int  # time of the next token fed for this branch
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # eos | stop | length
    pending: int | None = None  # the token to feed in the next step


@dataclass(frozen=True)
class DecodeResult:
    tokens: list[list[int]]  # generated ids per branch (including a final EOS)
    finish_reasons: list[str]
    prompt_tokens: int  # trunk + branch prompts (+ BOS)
    cache_tokens: int  # tokens held in the one KV cache at the end
    steps: int  # forwards after the prefill
    prefill_seconds: float
    decode_seconds: float

    @property
    def generated_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def seconds(self) -> float:
        return self.prefill_seconds + self.decode_seconds

    @property
    def tokens_per_second(self) -> float:
        return self.generated_tokens / self.seconds if self.seconds > 0 else float("inf")


def _cache_kwarg(model: torch.nn.Module) -> str:
    """transformers >= 5.x names the cache argument ``cache``; earlier versions ``past_key_values``."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return "cache" if "cache" in inspect.signature(base.forward).parameters else "past_key_values"


def _check_positions(model: torch.nn.Module, plan: Plan, max_new_tokens: int, stride: int) -> None:
    """Branch and time positions must stay inside the model's RoPE range (max_position_embeddings)."""
    max_branch = max(s.branch_id for s in plan.states)
    overflow = position_overflow(model, max_branch, plan.last_time(max_new_tokens), stride)
    if overflow is None:
        return
    which, position, limit = overflow
    if which == "branch":
        raise PloraError(
            f"{len(plan.states)} branches need branch positions up to {max_branch} x stride {stride} = "
            f"{position}, beyond the model's {limit} positions; use fewer branches"
        )
    raise PloraError(
        f"the prompts and --max-new-tokens need time positions up to {position}, beyond the model's "
        f"{limit} positions; shorten the prompts or lower --max-new-tokens"
    )


@dataclass
class Plan:
    """The contract's layout of a generation before decoding: what the prefill feeds, with which
    coordinates, and where each branch stands after it."""

    prefill_ids: np.ndarray
    prefill_branch: np.ndarray
    prefill_time: np.ndarray
    states: list[BranchState]
    sources: dict[int, int]  # branch index -> prefill position whose logits give its first token
    sample_times: list[int]  # time of each branch's first generated token
    num_tokens: int  # trunk + branch prompts (+ BOS)

    def last_time(self, max_new_tokens: int) -> int:
        return max(self.sample_times) + max_new_tokens - 1


def _plan(
    trunk: Sequence[int],
    prompts: Sequence[Sequence[int]],
    special: SpecialTokens,
    mask: str,
    align: str,
    branch_ids: Sequence[int] | None,
) -> Plan:
    row = build_row(
        TokenSequence.of(list(trunk), False) if trunk else None,
        [TokenSequence.of(list(p), False) for p in prompts],
        align,  # type: ignore[arg-type]
        special,
    )
    first = 1 if row.trunk_len else 0
    ids_of_branch = np.arange(first, first + len(prompts))
    row_branch = row.branch_id.astype(np.int64)
    if branch_ids is not None:
        if len(branch_ids) != len(prompts) or len(set(branch_ids)) != len(prompts) or min(branch_ids) < first:
            raise PloraError(
                f"branch_ids must be {len(prompts)} distinct ids >= {first}, got {list(branch_ids)}"
            )
        ids_of_branch = np.asarray(branch_ids, dtype=np.int64)
        row_branch = np.concatenate([np.arange(first), ids_of_branch])[row_branch]
    row_time = row.time_id.astype(np.int64)

    # Where each branch (its start token, then its prompt) lies in the row, when it starts and
    # when it first samples: from its own last token, the start when the prompt is empty.
    slices = [np.flatnonzero(row.branch_id == first + k) for k in range(len(prompts))]
    lens = [len(w) for w in slices]
    starts = branch_start_times(row.trunk_len, lens, align)  # type: ignore[arg-type]
    sample_times = [s + n for s, n in zip(starts, lens, strict=True)]
    # Columnar: the prefill stops at the first column where some branch samples (see module doc).
    cut = min(sample_times) if mask == "columnar" else np.iinfo(np.int64).max
    in_prefill = row_time < cut
    prefill = np.flatnonzero(in_prefill)
    position_in_prefill = {int(i): n for n, i in enumerate(prefill)}
    states, sources = [], {}
    for k, where in enumerate(slices):
        forced = deque(int(i) for i in row.input_ids[where[~in_prefill[where]]])
        fed = int(np.count_nonzero(in_prefill[where]))
        state = BranchState(int(ids_of_branch[k]), forced, starts[k] + fed)
        if forced:
            state.pending = forced.popleft()
        else:
            sources[k] = position_in_prefill[int(where[-1])]
        states.append(state)
    return Plan(
        prefill_ids=row.input_ids[prefill],
        prefill_branch=row_branch[prefill],
        prefill_time=row_time[prefill],
        states=states,
        sources=sources,
        sample_times=sample_times,
        num_tokens=row.num_tokens,
    )


def check_decoding(*, mask: str | None, align: str | None, max_new_tokens: int) -> None:
    """The decoding settings that need no model (None: the model's default), so that a caller can
    refuse a bad request before loading one."""
    if mask is not None and mask not in MASK_MODES:
        raise PloraError(f"--mask must be one of {', '.join(MASK_MODES)}, got {mask!r}")
    if align is not None and align not in ALIGN_MODES:
        raise PloraError(f"align must be one of {', '.join(ALIGN_MODES)}, got {align!r}")
    if max_new_tokens < 1:
        raise PloraError(f"--max-new-tokens must be at least 1, got {max_new_tokens}")


@torch.no_grad()
def decode_parallel(
    model: torch.nn.Module,
    trunk: Sequence[int],
    prompts: Sequence[Sequence[int]],
    *,
    special: SpecialTokens,
    max_new_tokens: int,
    sampling: SamplingOptions = SamplingOptions(),
    mask: str = "isolated",
    align: str = "left",
    stride: int | None = None,
    branch_ids: Sequence[int] | None = None,
    stop_ids: Collection[int] | None = None,
    stop_when: Callable[[int, list[int]], bool] | None = None,
    on_step: Callable[[DecodeStep], None] | None = None,
) -> DecodeResult:
    """Generate up to ``max_new_tokens`` for each branch prompt, all in one sequence.

    ``trunk`` and ``prompts`` are token ids without BOS or start tokens (added per the contract).
    A branch stops at a token of ``stop_ids`` (default: EOS; finish "eos"), when
    ``stop_when(index, generated)`` says so ("stop"), or at the budget ("length"). ``branch_ids``
    overrides the branches' ids (default 1..K where a trunk remains after its last token became the
    start, BOS counted; else 0..K-1; see parallel.layout.branch_start): in isolated mode a branch
    decoded alone with the id it had in a group yields the same tokens. ``stride`` defaults to the
    model's (see :func:`model_stride`).
    """
    check_decoding(mask=mask, align=align, max_new_tokens=max_new_tokens)
    if not prompts:
        raise PloraError("nothing to generate: give at least one branch")
    stride = model_stride(model) if stride is None else stride
    stop_ids = {special.eos_id} if stop_ids is None else set(stop_ids)
    device = model.get_input_embeddings().weight.device
    check_attn_device(getattr(model.config, "_attn_implementation", None) or "eager", device)
    started = time.perf_counter()
    plan = _plan(trunk, prompts, special, mask, align, branch_ids)
    _check_positions(model, plan, max_new_tokens, stride)
    states = plan.states
    input_ids = torch.as_tensor(plan.prefill_ids, dtype=torch.long, device=device)[None]
    all_branch = torch.as_tensor(plan.prefill_branch, dtype=torch.long, device=device)[None]
    all_time = torch.as_tensor(plan.prefill_time, dtype=torch.long, device=device)[None]
    keep = sorted(set(plan.sources.values()))  # prefill logits are needed only where a branch samples

    from transformers import DynamicCache  # noqa: PLC0415 - slow import

    # No config: every layer keeps every token (a sliding-window cache would drop tokens our mask needs).
    cache = DynamicCache()
    cache_kwarg = _cache_kwarg(model)
    sampler = Sampler(sampling, device)

    def forward(ids: torch.Tensor, num_queries: int | None, logits_to_keep: Any) -> torch.Tensor:
        masks = build_attention_mask(model, all_branch, all_time, mask, None, num_queries=num_queries)
        position_ids = encode_positions(all_branch[:, -ids.shape[1] :], all_time[:, -ids.shape[1] :], stride)
        out = model(
            input_ids=ids,
            attention_mask=masks,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{cache_kwarg: cache},
        )
        return out.logits[0].float()

    def advance(step: int, rows: dict[int, torch.Tensor]) -> None:
        """Sample for the branches in ``rows`` (index -> logits), set what each feeds next."""
        order = sorted(rows)
        drawn = sampler(torch.stack([rows[k] for k in order])).tolist() if order else []
        for k, token in zip(order, drawn, strict=True):
            state = states[k]
            state.generated.append(token)
            if token in stop_ids:
                state.finish_reason = "eos"
            elif stop_when is not None and stop_when(k, state.generated):
                state.finish_reason = "stop"
            elif len(state.generated) >= max_new_tokens:
                state.finish_reason = "length"
            finished = state.finish_reason is not None
            state.pending = token if not finished or mask == "columnar" else None
        if on_step is not None and order:
            on_step(DecodeStep(step, dict(zip(order, drawn, strict=True)), {k: rows[k] for k in order}))

    # Decode steps feed a few rows per forward; on CPU those are cheaper weight-major (skinny_linear).
    with weight_major_linears(model):
        logits = forward(input_ids, None, torch.as_tensor(keep, device=device))
        row_of = {p: n for n, p in enumerate(keep)}
        advance(0, {k: logits[row_of[p]] for k, p in plan.sources.items()})
        prefill_seconds = time.perf_counter() - started

        step = 0
        while True:
            active = [k for k, s in enumerate(states) if s.pending is not None]
            if not active:
                break
            step += 1
            new_ids = [states[k].pending for k in active]
            new_branch = [states[k].branch_id for k in active]
            new_time = [states[k].next_time for k in active]
            all_branch = torch.cat([all_branch, torch.tensor([new_branch], device=device)], dim=1)
            all_time = torch.cat([all_time, torch.tensor([new_time], device=device)], dim=1)
            logits = forward(torch.tensor([new_ids], device=device), len(active), 0)
            to_sample = {}
            for n, k in enumerate(active):
                state = states[k]
                state.next_time += 1
                state.pending = None
                if state.finish_reason is not None:
                    continue  # columnar: its last token is now visible to later columns; nothing to sample
                if state.forced:
                    state.pending = state.forced.popleft()
                else:
                    to_sample[k] = logits[n]
            advance(step, to_sample)

    return DecodeResult(
        tokens=[s.generated for s in states],
        finish_reasons=[s.finish_reason or "length" for s in states],
        prompt_tokens=plan.num_tokens,
        cache_tokens=int(all_branch.shape[1]),
        steps=step,
        prefill_seconds=prefill_seconds,
        decode_seconds=time.perf_counter() - started - prefill_seconds,
    )


def kv_cache_bytes(config: Any, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of a full-attention KV cache holding ``tokens`` tokens (keys and values, every layer)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
    element = torch.empty((), dtype=dtype).element_size()
    return 2 * text.num_hidden_layers * heads * head_dim * element * tokens


# --------------------------------------------------------------------------------------
# Text in, text out
# --------------------------------------------------------------------------------------


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


def encode_prompt(tokenizer: Any, prompt: str, *, chat: bool) -> list[int]:
    """Token ids of the trunk prompt; with ``chat``, the user turn in the chat template plus the
    assistant prefix (a chat parallel record's trunk), so the branches continue the assistant's answer."""
    if not chat:
        return list(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    if tokenizer.chat_template is None:
        raise PloraError(f"{tokenizer.name_or_path}: --chat needs a tokenizer with a chat template")
    try:
        # The trunk tokenize builds for {"messages": [user prompt], "branches": [...]}.
        return chat_trunk(tokenizer, [Message("user", prompt)]).ids.tolist()
    except ValueError as err:
        raise PloraError(f"{tokenizer.name_or_path}: {err}") from None


def branch_prompts(prompt: str | None, branches: Sequence[str] | None, num_branches: int | None) -> list[str]:
    """The branch prompts, from explicit texts or a count of empty branches; one-line errors for a
    blank prompt, a blank branch, neither or both."""
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
    return [""] * num_branches


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
    max_new_tokens: int = 128,
    temperature: float = 0.0,
    top_p: float = 1.0,
    top_k: int = 0,
    seed: int | None = None,
    stop: Sequence[str] = (),
    mask: str | None = None,
    align: str | None = None,
    on_step: Callable[[DecodeStep], None] | None = None,
) -> GenerationResult:
    """Generate every branch under the trunk ``prompt`` in one sequence; returns texts and token ids.

    Either ``branches`` (prompts each branch starts with) or ``num_branches`` (branches that start
    empty from the trunk). ``mask``/``align`` default to the adapter's (see parallel.loading). The
    text of a branch stops before its EOS or its first stop string.
    """
    texts = branch_prompts(prompt, branches, num_branches)
    sampling = SamplingOptions(temperature=temperature, top_p=top_p, top_k=top_k, seed=seed)
    if sampling.greedy and len(texts) > 1 and len(set(texts)) < len(texts):
        warnings.warn(
            "greedy decoding of branches with the same prompt: only their branch coordinate (2D RoPE) "
            "tells them apart, and they often write the same text; use --temperature > 0 or "
            "distinct branch prompts for different branches",
            IdenticalBranchesWarning,
            stacklevel=2,
        )
    defaults = generation_defaults(model)
    trunk = encode_prompt(tokenizer, prompt, chat=chat) if prompt is not None else []
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
