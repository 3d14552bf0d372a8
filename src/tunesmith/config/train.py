"""The ``train`` section: length, batching, precision, speed levers and output.

Kept apart from ``config.py`` (which assembles the sections) because the
training loop's switches grow with every speed lever; each one is a plain key
here so ``tunesmith config show`` documents it.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, field_validator

from tunesmith.config.base import Section


class TrainConfig(Section):
    """Length, batching, precision and output of the training loop."""

    epochs: int = Field(2, ge=1, description="Passes over the training split.")
    max_steps: int | None = Field(None, gt=0, description="Optimizer steps; overrides epochs.")
    batch_size: int = Field(16, gt=0, description="Examples per micro-batch, per device.")
    eval_batch_size: int | None = Field(None, gt=0, description="null: 2 * batch_size.")
    grad_accum: int = Field(1, ge=1, description="Micro-batches per optimizer step.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field(
        "auto", description="Compute precision; auto: bf16 where supported, else fp32."
    )
    seed: int = Field(0, ge=0, description="Seed for splits, shuffling and initialisation.")
    eval_steps: int | None = Field(None, gt=0, description="Evaluate every N steps; null: epoch.")
    eval_at_start: bool = Field(
        False,
        description="Evaluate the untrained model first (step 0): the baseline in metrics.jsonl, "
        "and a candidate for best/ (training must beat it).",
    )
    early_stopping_patience: int | None = Field(
        3, ge=1, description="Evaluations without improvement before stopping; null disables."
    )
    log_steps: int = Field(10, gt=0, description="Log training metrics every N steps.")
    grad_norm_steps: int | None = Field(
        None, gt=0, description="Log per-layer-group gradient norms every N steps; null: log_steps."
    )
    max_bad_steps: int = Field(
        3, ge=1, description="Stop after this many consecutive non-finite steps (each skipped)."
    )
    num_threads: int | None = Field(None, gt=0, description="Torch CPU threads; null: default.")
    return_freed_memory: bool = Field(
        False,
        description="Linux/glibc: after every optimizer step, hand the malloc heap's free pages "
        "back to the system (malloc_trim), so the process's memory follows its live tensors: "
        "an SFT run of SmolLM2 + LoRA peaked 1.0 GB lower (4.5 -> 3.5 GB) at 0.78x the speed; "
        "false: glibc's default, which keeps freed activations resident.",
    )
    gradient_checkpointing: bool = Field(
        False, description="Recompute activations in the backward pass: less memory, ~30% slower."
    )
    compile: bool = Field(
        False, description="torch.compile the model (pays on GPU; measured slower on CPU)."
    )
    feature_cache: Literal["auto", "off", "memory", "disk"] = Field(
        "auto",
        description="Compute frozen bottom blocks once (eval mode) and train the top from "
        "their cached output; auto: in memory when it fits, else on disk.",
    )
    save_steps: int | None = Field(
        None, gt=0, description="Write a resumable checkpoint every N optimizer steps."
    )
    save_minutes: float | None = Field(
        30.0, gt=0, description="Write a resumable checkpoint every N minutes; null: never."
    )
    save_total_limit: int = Field(
        2, ge=1, description="Resumable checkpoints kept (the newest, plus the best step's)."
    )
    output_dir: str = Field(
        "runs/my-run", min_length=1, description="Run folder; relative to the working directory."
    )
    overwrite: bool = Field(False, description="Replace an existing run folder.")
    trackers: list[Literal["tensorboard", "mlflow", "wandb"]] = Field(
        default_factory=list,
        description="Where every metrics record goes besides metrics.jsonl: tensorboard "
        "(event files in output_dir/tensorboard), mlflow (the server or store named by "
        "MLFLOW_TRACKING_URI; MLflow's default is sqlite:///mlflow.db here), wandb (offline "
        "in output_dir/wandb unless WANDB_MODE=online). Each needs its package.",
    )
    experiment: str = Field(
        "tunesmith",
        min_length=1,
        description="The MLflow experiment (W&B project) runs are logged under.",
    )
    tracker_parent: str | None = Field(
        None,
        description="The MLflow run this run is logged under as a nested run (compare and "
        "tune set it for their runs).",
    )
    log_best_checkpoint: bool = Field(
        False, description="MLflow: upload best/ as artifacts of the run (a copy of the model)."
    )
    tensorboard: bool = Field(
        False, description="Deprecated: use train.trackers: [tensorboard] (the same)."
    )

    @field_validator("feature_cache", mode="before")
    @classmethod
    def _yaml_off(cls, value: Any) -> Any:
        # YAML 1.1 reads a bare off/no as false and on/yes as true.
        if isinstance(value, bool):
            return "auto" if value else "off"
        return value

    @property
    def active_trackers(self) -> list[str]:
        """``trackers``, or TensorBoard alone where the deprecated ``tensorboard`` is set."""
        return list(self.trackers) or (["tensorboard"] if self.tensorboard else [])

    @property
    def effective_eval_batch_size(self) -> int:
        """Evaluation batch size with the null default applied (no gradients: 2x fits)."""
        return self.eval_batch_size or 2 * self.batch_size
