"""The ``preference`` section: which preference loss ``task.type: preference`` minimises.

Each loss reads ``beta`` and a few keys of its own. A key the chosen loss does
not read is an error rather than a silent no-op (``preference_problems``), and
so is ``task.label_smoothing`` for every loss but ``robust``, the one that
models flipped labels. The losses follow TRL 1.16 (the oracle the tests compare
with); where TRL and a paper differ, ``docs/tasks.md`` says which was
followed.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from tunesmith.config.base import Section
from tunesmith.config.specs import Problem

#: The losses, in the order the docs list them.
LOSSES = ("dpo", "ipo", "hinge", "robust", "orpo", "simpo", "kto")
#: Losses that need no reference model (they score the policy alone).
REFERENCE_FREE = frozenset({"orpo", "simpo"})
#: Keys of this section each loss reads besides ``loss`` and ``beta``.
LOSS_KEYS: dict[str, frozenset[str]] = {
    "dpo": frozenset({"precompute_reference"}),
    "ipo": frozenset({"precompute_reference"}),
    "hinge": frozenset({"precompute_reference"}),
    "robust": frozenset({"precompute_reference"}),
    "orpo": frozenset(),
    "simpo": frozenset({"simpo_gamma"}),
    "kto": frozenset({"precompute_reference", "desirable_weight", "undesirable_weight"}),
}
#: The one loss that reads ``task.label_smoothing`` (the assumed share of flipped pairs).
SMOOTHED = "robust"


class PreferenceConfig(Section):
    """Preference optimisation (``task.type: preference``): the loss and its parameters."""

    loss: Literal["dpo", "ipo", "hinge", "robust", "orpo", "simpo", "kto"] = Field(
        "dpo",
        description="dpo (sigmoid), ipo, hinge, robust (reads task.label_smoothing), orpo and "
        "simpo (no reference model), kto (unpaired rows: prompt, completion, label).",
    )
    beta: float = Field(
        0.1,
        gt=0,
        description="Strength of the implicit KL penalty (dpo, hinge, robust, kto); IPO's "
        "regularisation tau; ORPO's weight lambda of the odds-ratio term; SimPO's reward scale.",
    )
    precompute_reference: bool = Field(
        False,
        description="Score every pair with the reference once before training and drop the "
        "reference from memory (full or top-N training keeps no frozen copy then).",
    )
    simpo_gamma: float | None = Field(
        None, ge=0, description="simpo: target reward margin over beta (default 0.5)."
    )
    desirable_weight: float | None = Field(
        None, gt=0, description="kto: weight of the desirable rows' losses (default 1.0)."
    )
    undesirable_weight: float | None = Field(
        None, gt=0, description="kto: weight of the undesirable rows' losses (default 1.0)."
    )

    @property
    def gamma(self) -> float:
        """SimPO's margin over beta (TRL's ``simpo_gamma``)."""
        return 0.5 if self.simpo_gamma is None else self.simpo_gamma

    @property
    def weights(self) -> tuple[float, float]:
        """KTO's (desirable, undesirable) weights."""
        return (self.desirable_weight or 1.0, self.undesirable_weight or 1.0)

    @property
    def needs_reference(self) -> bool:
        """Whether the loss compares the policy with a reference model."""
        return self.loss not in REFERENCE_FREE


def preference_problems(
    task_type: str, preference: PreferenceConfig, task: Any, data_format: str
) -> list[Problem]:
    """Keys of ``preference`` (and ``task.label_smoothing``) the run would not read.

    Args:
        task_type: ``task.type``; the section belongs to ``preference`` alone.
        preference: The section.
        task: The ``task`` section (for ``label_smoothing``).
        data_format: ``data.format``: KTO reads unpaired rows, the rest pairs.
    """
    # Keys that differ from their defaults: a saved, fully resolved config writes them all.
    changed = [
        key
        for key, spec in PreferenceConfig.model_fields.items()
        if getattr(preference, key) != spec.default
    ]
    if task_type != "preference":
        return [
            Problem(
                f"preference.{key}",
                f"preference.{key}: only read with task.type preference (task.type is {task_type})",
            )
            for key in changed
        ]
    set_keys = [key for key in changed if key != "loss"]
    reads = LOSS_KEYS[preference.loss] | {"beta"}
    problems = [
        Problem(
            f"preference.{key}",
            f"preference.{key}: not read by preference.loss {preference.loss}; " + _readers(key),
        )
        for key in set_keys
        if key not in reads
    ]
    rows = "kto" if preference.loss == "kto" else "preference"
    if data_format not in ("auto", rows):
        problems.append(
            Problem(
                "data.format",
                f"data.format: preference.loss {preference.loss} reads {rows} rows "
                f"(data.format {rows} or auto), not {data_format}",
            )
        )
    if task.label_smoothing > 0 and preference.loss != SMOOTHED:
        problems.append(
            Problem(
                "task.label_smoothing",
                f"task.label_smoothing: preference.loss {preference.loss} does not use it; only "
                f"{SMOOTHED} does (the share of pairs assumed flipped)",
            )
        )
    return problems


def _readers(key: str) -> str:
    """Which losses read ``key`` (for the error message)."""
    names = [name for name in LOSSES if key in LOSS_KEYS[name]]
    return f"read by {', '.join(names)}" if names else "remove it"
