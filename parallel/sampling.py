"""Sampling: one token per row of logits (greedy, temperature, top-k, top-p), seeded for reproducibility."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from parallel.errors import PloraError

__all__ = ["DistinctPaths", "Sampler", "SamplingOptions"]


@dataclass(frozen=True)
class SamplingOptions:
    """temperature 0 is greedy; top_k 0 and top_p 1 turn those filters off. ``distinct``: no two
    branches generate the same tokens (see :class:`DistinctPaths`)."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int | None = None
    distinct: bool = False

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
        """``logits [n, V]`` -> token ids ``[n]``; a ``-inf`` logit is never drawn."""
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


class DistinctPaths:
    """The rule behind ``--distinct``: a branch whose generated tokens so far equal another branch's
    may not take the token that one took next, so no two branches generate the same token sequence.

    Branches under one trunk see the same context, and in isolated mode only their branch
    coordinate tells them apart; greedy decoding then often writes one text K times. Forbidding a
    taken path turns the later branch (lower indices draw first) to its next best token, or under
    sampling to a draw from the rest, where the two would meet (the first content token, for a
    list), much as diverse beam search keeps beams apart; branches whose tokens already differ are
    not touched. Only the generated tokens count, so it serves branches that start alike (the
    numbered starts of ``--marker`` included). Each branch's path is a running hash: a collision can
    only forbid a token needlessly, never let a repeat through.
    """

    def __init__(self, num_branches: int) -> None:
        self._path = [hash(())] * num_branches
        self._taken: dict[int, set[int]] = {}

    def forbidden(self, branch: int) -> set[int]:
        """The tokens that would make ``branch`` repeat another branch's path."""
        return self._taken.get(self._path[branch], set())

    def take(self, branch: int, token: int) -> None:
        """``branch`` generated ``token``."""
        self._taken.setdefault(self._path[branch], set()).add(token)
        self._path[branch] = hash((self._path[branch], token))
