"""The ``search`` and ``tune`` config sections of ``tunesmith tune``.

``search`` maps dotted config keys to distributions::

    search:
      optim.lr: {loguniform: [1.0e-5, 1.0e-3]}
      method.train_layers: {int: [1, 6]}
      method.r: {categorical: [4, 8, 16]}

Keys are checked against the config schema when the file loads (a typo is an
error naming the nearest key, before any trial runs); whether a sampled
*combination* is valid is only known per trial, and an invalid one is pruned
with its error, not crashed on. ``tunesmith train`` ignores both sections.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field, model_validator

from tunesmith.config.base import Section

#: Distribution kinds, in the order the docs list them.
KINDS = ("loguniform", "uniform", "int", "categorical")


class Distribution(Section):
    """One searched key: exactly one of the four kinds."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    loguniform: tuple[float, float] | None = Field(
        None, description="[low, high], sampled on a log scale (learning rates); low > 0."
    )
    uniform: tuple[float, float] | None = Field(None, description="[low, high], linear scale.")
    int_: tuple[int, int] | None = Field(
        None, alias="int", description="[low, high], integers, both ends included."
    )
    categorical: list[Any] | None = Field(None, min_length=1, description="The choices.")

    @model_validator(mode="after")
    def _exactly_one(self) -> Distribution:
        given = [k for k in KINDS if self.bounds(k) is not None]
        if len(given) != 1:
            raise ValueError(
                f"give exactly one of {', '.join(KINDS)} (got {', '.join(given) or 'none'})"
            )
        kind = given[0]
        if kind != "categorical":
            low, high = self.bounds(kind)
            if not low < high:
                raise ValueError(f"{kind}: low must be below high (got [{low}, {high}])")
            if kind == "loguniform" and low <= 0:
                raise ValueError(f"loguniform: low must be > 0 (got {low})")
        return self

    def bounds(self, kind: str) -> Any:
        """The value given for ``kind`` (None when not this kind)."""
        return getattr(self, "int_" if kind == "int" else kind)

    @property
    def kind(self) -> str:
        """Which of the kinds this is."""
        return next(k for k in KINDS if self.bounds(k) is not None)


class TuneConfig(Section):
    """How ``tunesmith tune`` searches: pruning, start-up trials, where the study lives."""

    pruner: Literal["median", "asha", "none"] = Field(
        "median",
        description="Stop bad trials early: median (below the median of earlier trials at "
        "the same evaluation), asha (successive halving), none.",
    )
    startup_trials: int = Field(
        3, ge=0, description="Trials that run to the end before pruning starts."
    )
    warmup_evals: int = Field(
        0, ge=0, description="Evaluations of each trial before it may be pruned."
    )
    storage: str | None = Field(
        None,
        description="Study database (an SQLite file, or an SQLAlchemy URL to share a study "
        "between processes); null: study.db in the tuning folder.",
    )
    study_name: str = Field("tunesmith", min_length=1, description="Name of the study in it.")
