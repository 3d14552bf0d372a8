"""The pairs of the TRL benchmark, and one contender's run in its own process.

Each pair names how its data is prepared, a function per contender, the
throughput it is measured in (real tokens or preference pairs per second) and
the quality both sides are scored on after training.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from tunesmith.studies.bench.llm import LLMSpec, prepare_chats, sft_trl, sft_tunesmith
from tunesmith.studies.bench.llm_dpo import dpo_trl, dpo_tunesmith, prepare_pairs
from tunesmith.training.monitor import peak_rss_mb

Run = Callable[[LLMSpec], dict[str, Any]]


@dataclass(frozen=True)
class Pair:
    """One comparison: its data preparation, contenders, throughput unit and quality."""

    prepare: Run
    contenders: dict[str, Run]
    #: Result key counted per second of training, and its label.
    unit: str
    unit_label: str
    #: Result key of the quality both sides are scored on, its label, and its direction.
    quality: str
    quality_label: str
    higher_is_better: bool


PAIRS: dict[str, Pair] = {
    "sft": Pair(
        prepare_chats,
        {"trl": sft_trl, "tunesmith": sft_tunesmith},
        "real_tokens",
        "real tokens/s",
        "validation_loss",
        "validation loss",
        higher_is_better=False,
    ),
    "dpo": Pair(
        prepare_pairs,
        {"trl": dpo_trl, "tunesmith": dpo_tunesmith},
        "pairs",
        "pairs/s",
        "reward_accuracy",
        "reward accuracy",
        higher_is_better=True,
    ),
}
NAMES = {"trl": "TRL", "tunesmith": "tunesmith"}


def prepare(spec: LLMSpec) -> dict[str, Any]:
    """The pair's data, written once for both contenders."""
    return PAIRS[spec.pair].prepare(spec)


def run_contender(spec: LLMSpec) -> dict[str, Any]:
    """One contender's run plus its rate, this process's peak memory, load and wall time."""
    import torch

    start = time.perf_counter()
    if spec.threads:
        torch.set_num_threads(spec.threads)
    pair = PAIRS[spec.pair]
    result = pair.contenders[spec.contender](spec)
    return {
        **result,
        "rate": result[pair.unit] / result["train_seconds"],
        "real_tokens_per_s": result["real_tokens"] / result["train_seconds"],
        "peak_rss_mb": round(peak_rss_mb(), 1),
        "load_average_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
        "process_seconds": round(time.perf_counter() - start, 2),
        "torch_threads": torch.get_num_threads(),
    }
