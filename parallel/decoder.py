"""Decoding token ids: a trunk and K branches decoded together in one sequence with one KV cache.

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
    SpecialTokens,
    TokenSequence,
    branch_start_times,
    build_row,
)
from parallel.rope2d import encode_positions, model_stride, position_overflow
from parallel.sampling import DistinctPaths, Sampler, SamplingOptions
from parallel.skinny_linear import weight_major_linears

__all__ = ["DecodeResult", "DecodeStep", "Decoder", "Plan", "check_decoding", "decode_parallel"]


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


class Decoder:
    """One generation's KV cache and branch states. :meth:`prefill` feeds the plan's prefill and
    samples the branches that sample there; each :meth:`step` feeds one token per branch that has
    one to feed and samples where a branch's prompt is done."""

    def __init__(
        self,
        model: torch.nn.Module,
        plan: Plan,
        *,
        mask: str,
        stride: int,
        sampler: Sampler,
        max_new_tokens: int,
        stop_ids: Collection[int],
        stop_when: Callable[[int, list[int]], bool] | None = None,
        on_step: Callable[[DecodeStep], None] | None = None,
    ) -> None:
        from transformers import DynamicCache  # noqa: PLC0415 - slow import

        self.model, self.plan, self.mask, self.stride, self.sampler = model, plan, mask, stride, sampler
        self.max_new_tokens, self.stop_ids = max_new_tokens, stop_ids
        self.stop_when, self.on_step = stop_when, on_step
        self.states = plan.states
        self.device = model.get_input_embeddings().weight.device
        # (branch, time) of every token fed so far, the queries' and the cache's.
        self.branch = torch.as_tensor(plan.prefill_branch, dtype=torch.long, device=self.device)[None]
        self.time = torch.as_tensor(plan.prefill_time, dtype=torch.long, device=self.device)[None]
        # No config: every layer keeps every token (a sliding-window cache would drop tokens our mask needs).
        self.cache = DynamicCache()
        self.paths = DistinctPaths(len(plan.states)) if sampler.options.distinct else None
        self._cache_kwarg = _cache_kwarg(model)
        self.steps = 0

    def prefill(self) -> None:
        """Feed the trunk and the branch prompts (in columnar mode, up to the first column where a
        branch samples) in one forward, and sample each branch whose prompt is all in it."""
        ids = torch.as_tensor(self.plan.prefill_ids, dtype=torch.long, device=self.device)[None]
        keep = sorted(set(self.plan.sources.values()))  # logits are needed only where a branch samples
        logits = self._forward(ids, None, torch.as_tensor(keep, device=self.device))
        row_of = {p: n for n, p in enumerate(keep)}
        self._advance({k: logits[row_of[p]] for k, p in self.plan.sources.items()})

    def step(self) -> bool:
        """Feed each branch's pending token in one forward and sample the next where due; False
        (and nothing fed) when no branch has a token to feed."""
        states = self.states
        active = [k for k, s in enumerate(states) if s.pending is not None]
        if not active:
            return False
        self.steps += 1
        new_branch = torch.tensor([[states[k].branch_id for k in active]], device=self.device)
        new_time = torch.tensor([[states[k].next_time for k in active]], device=self.device)
        self.branch = torch.cat([self.branch, new_branch], dim=1)
        self.time = torch.cat([self.time, new_time], dim=1)
        logits = self._forward(
            torch.tensor([[states[k].pending for k in active]], device=self.device), len(active), 0
        )
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
        self._advance(to_sample)
        return True

    def _forward(self, ids: torch.Tensor, num_queries: int | None, logits_to_keep: Any) -> torch.Tensor:
        """Logits ``[kept, V]`` of the queries ``ids`` (the last tokens of ``self.branch``/``self.time``)."""
        model, n = self.model, ids.shape[1]
        masks = build_attention_mask(model, self.branch, self.time, self.mask, None, num_queries=num_queries)
        position_ids = encode_positions(self.branch[:, -n:], self.time[:, -n:], self.stride)
        out = model(
            input_ids=ids,
            attention_mask=masks,
            position_ids=position_ids,
            use_cache=True,
            logits_to_keep=logits_to_keep,
            **{self._cache_kwarg: self.cache},
        )
        return out.logits[0].float()

    def _draw_distinct(self, k: int, logits: torch.Tensor, paths: DistinctPaths) -> int:
        """Branch ``k``'s token, off every path another branch has taken (lower indices draw first)."""
        forbidden = paths.forbidden(k)
        if forbidden:
            where = torch.tensor(sorted(forbidden), device=logits.device)
            logits = logits.index_fill(0, where, float("-inf"))
        token = int(self.sampler(logits[None])[0])
        paths.take(k, token)
        return token

    def _advance(self, rows: dict[int, torch.Tensor]) -> None:
        """Sample for the branches in ``rows`` (index -> logits), set what each feeds next."""
        order = sorted(rows)
        if self.paths is not None:
            drawn = [self._draw_distinct(k, rows[k], self.paths) for k in order]
        else:
            drawn = self.sampler(torch.stack([rows[k] for k in order])).tolist() if order else []
        for k, token in zip(order, drawn, strict=True):
            state = self.states[k]
            state.generated.append(token)
            if token in self.stop_ids:
                state.finish_reason = "eos"
            elif self.stop_when is not None and self.stop_when(k, state.generated):
                state.finish_reason = "stop"
            elif len(state.generated) >= self.max_new_tokens:
                state.finish_reason = "length"
            finished = state.finish_reason is not None
            state.pending = token if not finished or self.mask == "columnar" else None
        if self.on_step is not None and order:
            logits = {k: rows[k] for k in order}
            self.on_step(DecodeStep(self.steps, dict(zip(order, drawn, strict=True)), logits))


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
    device = model.get_input_embeddings().weight.device
    check_attn_device(getattr(model.config, "_attn_implementation", None) or "eager", device)
    started = time.perf_counter()
    plan = _plan(trunk, prompts, special, mask, align, branch_ids)
    _check_positions(model, plan, max_new_tokens, stride)
    decoder = Decoder(
        model,
        plan,
        mask=mask,
        stride=stride,
        sampler=Sampler(sampling, device),
        max_new_tokens=max_new_tokens,
        stop_ids={special.eos_id} if stop_ids is None else set(stop_ids),
        stop_when=stop_when,
        on_step=on_step,
    )
    # Decode steps feed a few rows per forward; on CPU those are cheaper weight-major (skinny_linear).
    with weight_major_linears(model):
        decoder.prefill()
        prefill_seconds = time.perf_counter() - started
        while decoder.step():
            pass
    return DecodeResult(
        tokens=[s.generated for s in plan.states],
        finish_reasons=[s.finish_reason or "length" for s in plan.states],
        prompt_tokens=plan.num_tokens,
        cache_tokens=int(decoder.branch.shape[1]),
        steps=decoder.steps,
        prefill_seconds=prefill_seconds,
        decode_seconds=time.perf_counter() - started - prefill_seconds,
    )
