"""Choosing the next token of many rows at once, each row with its own settings.

The batched generator decodes requests with different temperatures, top-k and
top-p side by side, so the settings are per-row tensors and every filter is
one tensor operation over the rows that need it, instead of a chain of
logits processors per request. The filters follow the definitions of
transformers' ``TemperatureLogitsWarper``, ``TopKLogitsWarper`` and
``TopPLogitsWarper`` (in that order), so a request sampled here draws from
the distribution ``model.generate`` would draw from with the same settings.

A temperature of 0 means greedy: the arg-max of the raw logits, which is
exactly what ``model.generate(do_sample=False)`` picks.

Random draws come from one ``torch.Generator`` per request, shared by the
request's rows (its ``n`` completions): a request's samples depend on its own
seed only, not on which other requests share the batch.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def apply_temperature(logits: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """``logits`` divided row by row by ``temperature``; rows at 0 (greedy) are left as they are."""
    scale = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return logits / scale[:, None]


def top_k_filter(logits: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """``logits`` with every token below the row's k-th largest logit set to -inf (k = 0: off)."""
    k_max = int(top_k.max())
    if k_max <= 0:
        return logits
    k = top_k.clamp(min=1, max=logits.shape[-1])
    kth = torch.topk(logits, min(k_max, logits.shape[-1]), dim=-1).values.gather(1, k[:, None] - 1)
    remove = (logits < kth) & (top_k > 0)[:, None]
    return logits.masked_fill(remove, float("-inf"))


def top_p_filter(logits: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """``logits`` cut to the smallest set of tokens whose probability reaches the row's ``top_p``.

    Rows at 1.0 are left as they are; the most likely token always stays.
    """
    active = top_p < 1.0
    if not bool(active.any()):
        return logits
    sorted_logits, order = torch.sort(logits, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    remove_sorted = cumulative <= (1 - top_p)[:, None]
    remove_sorted[:, -1] = False
    remove = remove_sorted.scatter(1, order, remove_sorted) & active[:, None]
    return logits.masked_fill(remove, float("-inf"))


def filter_logits(
    logits: torch.Tensor, temperature: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
) -> torch.Tensor:
    """Temperature, then top-k, then top-p, each row with its own values (transformers' order)."""
    return top_p_filter(top_k_filter(apply_temperature(logits, temperature), top_k), top_p)


class Sampler:
    """Picks one token per row from that row's logits with that row's settings.

    Args:
        temperature: Per row; 0 means greedy.
        top_k: Per row; 0 means no top-k cut.
        top_p: Per row; 1.0 means no nucleus cut.
        generators: Per row, the request's random generator (rows of one request
            share it); None for greedy rows.
        logprobs: Return the log-probability of each chosen token.
    """

    def __init__(
        self,
        temperature: Sequence[float],
        top_k: Sequence[int],
        top_p: Sequence[float],
        generators: Sequence[torch.Generator | None],
        *,
        logprobs: bool = False,
    ) -> None:
        self.temperature = torch.tensor(temperature, dtype=torch.float32)
        self.top_k = torch.tensor(top_k, dtype=torch.long)
        self.top_p = torch.tensor(top_p, dtype=torch.float32)
        self.generators = list(generators)
        self.logprobs = logprobs
        self._regroup()

    def _regroup(self) -> None:
        """Rows that sample, grouped by their generator (one draw call per request, not per row).

        Each group keeps its rows twice: as rows of the batch and as rows of the
        sampled subset, whose filtered distributions are computed together.
        """
        sampled = (self.temperature > 0).nonzero().flatten().tolist()
        groups: dict[int, tuple[torch.Generator | None, list[int], list[int]]] = {}
        for local, row in enumerate(sampled):
            gen = self.generators[row]
            entry = groups.setdefault(id(gen), (gen, [], []))
            entry[1].append(row)
            entry[2].append(local)
        self.sampled_rows = torch.tensor(sampled, dtype=torch.long)
        self.groups = [
            (gen, torch.tensor(rows), torch.tensor(local)) for gen, rows, local in groups.values()
        ]

    def keep(self, rows: torch.Tensor) -> None:
        """Drop every row not in ``rows`` (the batch was compacted to them, in this order)."""
        self.temperature = self.temperature[rows]
        self.top_k = self.top_k[rows]
        self.top_p = self.top_p[rows]
        self.generators = [self.generators[i] for i in rows.tolist()]
        self._regroup()

    def choose(self, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Next token per row (greedy rows: arg-max) and, when asked for, its log-probability.

        The log-probability is that of the model's distribution at the row's
        temperature, before the top-k/top-p cut: what a policy-gradient trainer
        recomputes for the same token.
        """
        tokens = logits.argmax(dim=-1)
        if self.groups:
            self._sample_into(tokens, logits)
        if not self.logprobs:
            return tokens, None
        scaled = apply_temperature(logits, self.temperature)
        return tokens, scaled.log_softmax(dim=-1).gather(1, tokens[:, None]).squeeze(1)

    def _sample_into(self, tokens: torch.Tensor, logits: torch.Tensor) -> None:
        """Overwrite the sampled rows of ``tokens`` with draws from their filtered distributions."""
        rows = self.sampled_rows
        filtered = filter_logits(
            logits[rows], self.temperature[rows], self.top_k[rows], self.top_p[rows]
        )
        probs = filtered.softmax(dim=-1)
        for gen, group, local in self.groups:
            tokens[group] = torch.multinomial(probs[local], 1, generator=gen).squeeze(1)
