"""``tunesmith prune``: a checkpoint pruned (in rounds, each followed by recovery) to a new folder.

The steps, each in its own module:

1. load the checkpoint; merge LoRA/DoRA/IA3 into the base weights first (pruning
   acts on the weights the model computes with), refuse what cannot be merged;
2. per round (``prune_magnitude.round_targets``): prune to that round's target
   sparsity (``prune_magnitude`` zeros weights; ``prune_structured`` slices
   heads or FFN neurons away), then fine-tune ``recover_steps`` optimizer
   steps on the run's training rows with the checkpoint's own config (optimizer,
   schedule, batch size, precision) — masked weights stay exactly zero;
3. save a normal checkpoint folder: plain transformers weights with zeros
   (magnitude) or the ``pruned_format`` folder (structured), whose
   ``tunesmith.json`` says how it was pruned (``"pruned"``).

Why recovery uses the training rows of the run (``splits.json`` next to the
checkpoint): the held-out rows measure the result and must stay unseen.
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith.config.root import Config
from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.deploy import prune_magnitude as pm
from tunesmith.deploy.plain import plain_checkpoint
from tunesmith.errors import ConfigError, DataError
from tunesmith.evaluation.speed import make_batches
from tunesmith.methods.base import METHODS, get_method
from tunesmith.models import prune_structured as ps
from tunesmith.models.folders import save_model_folder
from tunesmith.models.loading import checkpoint_manifest
from tunesmith.models.pruned_format import is_pruned, save_pruned
from tunesmith.runs.load import load_checkpoint, records_for
from tunesmith.tasks.base import Task
from tunesmith.training.loop import Trainer
from tunesmith.training.monitor import MetricsLog
from tunesmith.training.parts import LoopCallbacks, LoopData
from tunesmith.training.precision import new_accelerator, resolve_precision

log = logging.getLogger(__name__)

KINDS = ("magnitude", *ps.KINDS)
#: Batch size of the training batches gradient importance is summed over.
SCORE_BATCH_SIZE = 16


@dataclass
class PruneSettings:
    """What ``tunesmith prune`` was asked for.

    Attributes:
        kind: ``magnitude`` (zero single weights), ``heads`` or ``neurons`` (remove them).
        sparsity: Share of the prunable weights (magnitude) or of the heads/neurons to remove.
        scope: ``global`` (rank across layers) or ``per_layer`` (the same share in each).
        rounds: Pruning rounds reaching ``sparsity`` gradually (cubic schedule).
        recover_steps: Fine-tuning steps after each round (0: none).
        importance: ``magnitude`` or ``gradient`` scores for heads/neurons.
        train_data: A data file to recover on instead of the run's training rows.
        score_batches: Training batches the gradient importance is summed over.
    """

    kind: str
    sparsity: float
    scope: str = "global"
    rounds: int = 1
    recover_steps: int = 0
    importance: str = "magnitude"
    train_data: str | None = None
    score_batches: int = 8

    def check(self) -> None:
        """Refuse settings that cannot work, before anything is loaded.

        Raises:
            ConfigError: Naming the option and its valid values.
        """
        if self.kind not in KINDS:
            raise ConfigError(f"prune: unknown --kind '{self.kind}'; use {', '.join(KINDS)}")
        if not 0 < self.sparsity < 1:
            raise ConfigError(
                f"prune: --sparsity must be between 0 and 1 (exclusive), not {self.sparsity:g}"
            )
        if self.scope not in pm.SCOPES:
            raise ConfigError(f"prune: unknown --scope '{self.scope}'; use global or per_layer")
        if self.importance not in ps.IMPORTANCE:
            raise ConfigError(
                f"prune: unknown --importance '{self.importance}'; use magnitude or gradient"
            )
        if self.importance == "gradient" and self.kind == "magnitude":
            raise ConfigError(
                "prune: --importance gradient scores heads/neurons; magnitude "
                "pruning ranks single weights by size"
            )
        if self.rounds < 1 or self.recover_steps < 0:
            raise ConfigError("prune: --rounds must be at least 1 and --recover-steps at least 0")


@dataclass
class PruneResult:
    """What was pruned: settings, per-round progress and model statistics before/after."""

    folder: Path
    checkpoint: str
    settings: PruneSettings
    before: dict[str, Any]
    after: dict[str, Any]
    rounds: list[dict[str, Any]] = field(default_factory=list)

    @property
    def achieved(self) -> float:
        """The sparsity reached: share of prunable weights zeroed, or of heads/neurons removed."""
        return float(self.after["sparsity"])

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self) | {"folder": str(self.folder), "achieved": self.achieved}
        for side in ("before", "after"):
            out[side] = {k: v for k, v in out[side].items() if k != "per_layer"}
        out["after_per_layer"] = self.after.get("per_layer", {})
        return out


def prune_checkpoint(
    checkpoint: str | Path, output: str | Path, settings: PruneSettings, *, progress: bool = False
) -> PruneResult:
    """Prune ``checkpoint`` as ``settings`` say and save it to the new folder ``output``.

    Raises:
        ConfigError: ``output`` exists, bad settings, or a checkpoint that cannot be
            pruned (int8, already structurally pruned, multi-task, unmergeable adapter).
        ModelError: Structured pruning of an architecture other than BERT-like encoders.
        DataError: Recovery or gradient scores need training rows and there are none.
    """

    settings.check()
    output = Path(output)
    if output.exists():
        raise ConfigError(f"prune: {output} already exists; choose a new folder")
    manifest = checkpoint_manifest(checkpoint)
    check_prunable(checkpoint, manifest)
    cfg, task, model, tokenizer, labels = load_checkpoint(checkpoint)
    model, cfg, manifest = _merged(checkpoint, cfg, model, manifest)
    structured = settings.kind != "magnitude"
    if structured:
        ps.encoder_layers(model, where=checkpoint)
    else:
        pm.prunable_linears(model)
    needs_rows = settings.recover_steps > 0 or settings.importance == "gradient"
    train_set = (
        _train_set(task, cfg, checkpoint, settings, tokenizer, labels) if needs_rows else None
    )
    collator = Collator(tokenizer.pad_token_id, tokenizer.padding_side)
    reference = sum(p.numel() for p in model.parameters())
    before = model_stats(model, settings.kind, None, reference)
    masks: pm.Masks | None = None
    kept = ps.full_kept(model) if structured else None
    rounds = []
    for number, target in enumerate(pm.round_targets(settings.sparsity, settings.rounds), 1):
        if structured:
            scores = _scores(model, task, settings, train_set, collator)
            kept = ps.prune_units(
                model, settings.kind, target, kept, scope=settings.scope, scores=scores
            )
        else:
            masks = pm.prune_magnitude(model, target, settings.scope, masks)
        done = {"round": number, "target": target, **_headline(model, settings.kind, kept)}
        note = ""
        if settings.recover_steps:
            parts = (cfg, task, train_set, collator, labels, settings)
            # Another seed per round: a short recovery would otherwise see the same batches.
            seed = cfg.train.seed + number - 1
            model, losses = recover(model, *parts, masks=masks, seed=seed, progress=progress)
            done |= {"recovery_loss_first": losses[0], "recovery_loss_last": losses[-1]}
            done["after_recovery"] = _headline(model, settings.kind, kept)["achieved"]
            note = f"; recovery loss {losses[0]:.4f} -> {losses[-1]:.4f}"
        log.info(
            "prune round %d/%d: target %.3f, reached %.3f%s",
            *(number, settings.rounds, target, done["achieved"], note),
        )
        rounds.append(done)
    model.eval()
    after = model_stats(model, settings.kind, kept, reference)
    pruned = {
        "kind": settings.kind,
        "target": settings.sparsity,
        "achieved": after["sparsity"],
        "all_parameters": after["all_sparsity"],
        "scope": settings.scope,
        "rounds": settings.rounds,
        "recover_steps": settings.recover_steps,
    }
    if structured:
        pruned["importance"] = settings.importance
    # The unpruned model's validation metrics do not describe this one: the report does.
    meta = {k: v for k, v in manifest.items() if k != "validation"}
    meta |= {"pruned": pruned, "pruned_from": str(checkpoint)}
    folder = save_model_folder(output, _saver(task, cfg, model, kept), tokenizer, meta)
    return PruneResult(folder, str(checkpoint), settings, before, after, rounds)


def check_prunable(checkpoint: str | Path, manifest: dict[str, Any]) -> None:
    """Refuse, before loading, checkpoints that pruning cannot take.

    Raises:
        ConfigError: An int8 export, a structurally pruned folder, or a multi-task model.
    """

    if manifest.get("quantized"):
        raise ConfigError(
            f"prune: {checkpoint} is {manifest['quantized']}; prune the fp32 checkpoint "
            "(then quantize the pruned one)"
        )
    if is_pruned(checkpoint):
        raise ConfigError(
            f"prune: {checkpoint} already had heads or neurons removed; prune the original "
            "checkpoint with the combined target instead"
        )
    if manifest.get("task") == "multitask":
        raise ConfigError(
            f"prune: {checkpoint} is a multi-task model; pruning takes single-task checkpoints"
        )


def _merged(
    checkpoint: str | Path, cfg: Config, model: nn.Module, manifest: dict[str, Any]
) -> tuple[nn.Module, Config, dict[str, Any]]:
    """The plain model, config and manifest to prune: adapters merged into the base."""
    if not METHODS.get(cfg.method.name).saves_adapter:
        return model, cfg, manifest
    merged, manifest = plain_checkpoint(cfg.method.name, model, manifest, "prune")
    plain = Config.from_dict(manifest["config"], source=f"{checkpoint} (merged)")
    plain = plain.model_copy(update={"model": cfg.model})  # the caller's permissions
    return merged, plain, manifest


def _train_set(
    task: Task,
    cfg: Config,
    checkpoint: str | Path,
    settings: PruneSettings,
    tokenizer: Any,
    labels: list[str],
) -> FeatureDataset:
    """The rows recovery (and gradient importance) trains on, encoded.

    Raises:
        DataError: No ``--train-data`` and no training rows recorded next to the checkpoint.
    """

    if settings.train_data is not None:
        records = task.load_records(settings.train_data)
    else:
        try:
            records = records_for(task, cfg, checkpoint, None, "train")
        except DataError as err:
            raise DataError(
                f"prune: recovery needs the run's training rows ({err}); give --train-data "
                "FILE, or --recover-steps 0 (and --importance magnitude)"
            ) from None
    label2id = {lab: i for i, lab in enumerate(labels)}
    task.check_labels(records, label2id, "train")
    return FeatureDataset(task.encode(records, tokenizer, label2id))


def _scores(
    model: nn.Module,
    task: Task,
    settings: PruneSettings,
    train_set: FeatureDataset | None,
    collator: Collator,
) -> list[torch.Tensor] | None:
    """Per-layer unit importance for this round (None: weight magnitude)."""
    if settings.importance != "gradient" or train_set is None:
        return None
    import random

    # A seeded sample: the run's rows may be ordered (by label, by source file).
    rows = random.Random(task.cfg.train.seed).sample(train_set.features, len(train_set.features))
    batches = make_batches(rows, collator, SCORE_BATCH_SIZE, settings.score_batches)

    def loss(outputs: Any, batch: Any) -> torch.Tensor:
        return task.loss_sum(outputs, batch) / task.count_targets(batch).clamp(min=1)

    return ps.gradient_scores(model, settings.kind, batches, loss, task.model_inputs)


def recover(
    model: nn.Module,
    cfg: Config,
    task: Task,
    train_set: FeatureDataset,
    collator: Collator,
    labels: list[str],
    settings: PruneSettings,
    *,
    masks: pm.Masks | None = None,
    seed: int | None = None,
    progress: bool = False,
) -> tuple[nn.Module, list[float]]:
    """Fine-tune ``model`` for ``settings.recover_steps`` steps; the model and its logged losses.

    The checkpoint's config drives it (method, optimizer, schedule over these
    steps, batch size, precision, seed); only the run length changes, and no
    evaluation or checkpoint is made (held-out rows stay unseen). ``seed``
    replaces the run's seed (data order, dropout). With ``masks``,
    ``MaskKeeper`` holds the pruned weights at zero.
    """
    from accelerate.utils import set_seed

    steps = settings.recover_steps
    keeper = pm.MaskKeeper(pm.prunable_linears(model), masks) if masks is not None else None
    with tempfile.TemporaryDirectory(prefix="tunesmith-prune-") as tmp:
        changes = {
            "max_steps": steps,
            "eval_steps": None,
            "eval_at_start": False,
            "save_steps": None,
            "save_minutes": None,
            "compile": False,
            "early_stopping_patience": None,
            "log_steps": max(1, steps // 10),
            "output_dir": tmp,
            "seed": cfg.train.seed if seed is None else seed,
        }
        run_cfg = cfg.model_copy(update={"train": cfg.train.model_copy(update=changes)})
        set_seed(run_cfg.train.seed)
        method = get_method(run_cfg)
        model = method.apply(model)
        accelerator = new_accelerator(resolve_precision(run_cfg.train.precision))
        metrics = MetricsLog(Path(tmp) / "metrics.jsonl", enabled=False)
        trainer = Trainer.for_method(
            run_cfg,
            task,
            model,
            method,
            accelerator,
            LoopData(train_set, FeatureDataset([]), collator, labels),
            LoopCallbacks(metrics, hooks=[keeper] if keeper is not None else [], progress=progress),
        )
        try:
            trainer.run()
            model = accelerator.unwrap_model(trainer.model)
        finally:
            trainer.release()
            if keeper is not None:
                keeper.close()
    losses = [r["loss"] for r in metrics.records if r.get("split") == "train" and "loss" in r]
    return model.eval(), losses


def model_stats(
    model: nn.Module, kind: str, kept: ps.Kept | None, reference: int
) -> dict[str, Any]:
    """Sparsity and parameter counts of ``model``; ``reference``: the unpruned parameter count.

    ``sparsity`` is the quantity ``--sparsity`` asks for: zeros among the prunable
    weights (magnitude), or the share of heads/neurons removed. ``all_sparsity``
    counts zeros and removed parameters against all parameters of the unpruned model.
    """
    stats = pm.sparsity_stats(model)
    removed = reference - stats["parameters"]
    stats["all_sparsity"] = (reference - stats["nonzero_parameters"]) / reference
    stats["removed_parameters"] = removed
    if kind != "magnitude":
        stats["sparsity"] = _headline(model, kind, kept)["achieved"]
        if kept is not None:
            stats["kept"] = ps.unit_counts(kept)
    else:
        stats["sparsity"] = stats["pruned_sparsity"]
    return stats


def _headline(model: nn.Module, kind: str, kept: ps.Kept | None) -> dict[str, float]:
    """The sparsity reached now, as ``--sparsity`` measures it."""
    if kind == "magnitude":
        return {"achieved": pm.sparsity_stats(model)["pruned_sparsity"]}
    config = model.config
    per_layer = config.num_attention_heads if kind == "heads" else config.intermediate_size
    total = per_layer * config.num_hidden_layers
    left = ps.unit_counts(kept)[kind] if kept is not None else total
    return {"achieved": 1 - left / total}


def _saver(task: Task, cfg: Config, model: nn.Module, kept: ps.Kept | None) -> Any:
    """How the pruned weights are written: the method's plain folder, or the sliced format."""
    if kept is None:
        method = get_method(cfg)
        return lambda folder: task.save_weights(method, model, folder)

    return lambda folder: save_pruned(model, folder, kept)
