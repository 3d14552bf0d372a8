"""Rollouts: a window of prompt batches becomes batches of sampled completions to train on.

``sample_groups`` asks the batched generator for ``G`` sampled completions of
every prompt of the window in one call (the run's own random generator, so a
resumed run samples the same). ``completion_rows`` lays each micro-batch's
prompts times their completions out as right-padded rows (prompt then
completion: positions count from each row's first token, as in generation)
with the mask of the completion tokens, the only ones scored.

``RolloutBuffer`` keeps the batches of the current window between its
``rl.iterations`` updates, and goes into a checkpoint as tensors (safetensors,
never pickle) so that a run killed between two updates resumes on the same
rollouts and their old log-probabilities.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from tunesmith.models.generator import Completion, GenerationRequest, Generator
from tunesmith.tasks.base import Batch
from tunesmith.tasks.preference_batch import right_padded


@dataclass(frozen=True)
class SamplingSettings:
    """How rollouts are sampled (``rl.*``)."""

    group_size: int
    temperature: float
    top_p: float
    max_new_tokens: int
    stop_at_eos: bool


def sample_groups(
    generator: Generator,
    prompts: Sequence[list[int]],
    settings: SamplingSettings,
    rng: torch.Generator,
) -> list[list[Completion]]:
    """``group_size`` sampled completions per prompt, drawn from ``rng``."""
    requests = [
        GenerationRequest(
            prompt=ids,
            max_new_tokens=settings.max_new_tokens,
            temperature=settings.temperature,
            top_p=settings.top_p,
            n=settings.group_size,
            generator=rng,
            ignore_eos=not settings.stop_at_eos,
        )
        for ids in prompts
    ]
    return [result.completions for result in generator.generate(requests)]


def completion_rows(
    prompts: Sequence[list[int]], completions: Sequence[Sequence[int]], pad_id: int
) -> Batch:
    """Rows ``prompt + completion`` (one per completion), right-padded, and the completion mask.

    ``prompts`` holds each row's prompt (repeated for the rows of a group).
    """
    rows = [
        torch.tensor([*p, *c], dtype=torch.long) for p, c in zip(prompts, completions, strict=True)
    ]
    lengths = torch.tensor([len(p) for p in prompts])
    ids, mask, completion = right_padded(rows, pad_id, lengths)
    return {"input_ids": ids, "attention_mask": mask, "completion": completion}


class RolloutBuffer:
    """The current window's rollout batches, kept for the window's later updates."""

    PREFIX = "batch"

    def __init__(self) -> None:
        self.batches: list[Batch] | None = None

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """The batches as flat ``batch<i>.<key>`` tensors (empty when there are none)."""
        if self.batches is None:
            return {}
        return {
            f"{self.PREFIX}{i}.{key}": value.contiguous()
            for i, batch in enumerate(self.batches)
            for key, value in batch.items()
        }

    def load_state_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        """Take back what ``state_tensors`` wrote (other keys are ignored)."""
        batches: dict[int, Batch] = {}
        for name, value in tensors.items():
            head, _, key = name.partition(".")
            if head.startswith(self.PREFIX) and head[len(self.PREFIX) :].isdigit():
                batches.setdefault(int(head[len(self.PREFIX) :]), {})[key] = value
        self.batches = [batches[i] for i in sorted(batches)] if batches else None
