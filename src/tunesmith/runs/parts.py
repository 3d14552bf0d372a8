"""Everything a run builds before its loop: data, tokenizer, features, adapted model.

Shared by ``train`` and ``estimate`` so an estimate measures exactly the model,
batches and method the run would use (no second, drifting copy of the steps).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import torch

from tunesmith.config.root import Config
from tunesmith.data.augment.build import augment_training, training_dataset
from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.methods.base import Method, get_method
from tunesmith.models.loading import load_tokenizer
from tunesmith.objectives.class_weights import resolve_class_weights
from tunesmith.objectives.distill.student import build_student
from tunesmith.runs.preflight import preflight
from tunesmith.tasks.base import DataSplits, Task

log = logging.getLogger(__name__)


@dataclass
class RunParts:
    """The built pieces of a run, in the order they are made."""

    splits: DataSplits
    tokenizer: Any
    method: Method
    train_set: FeatureDataset
    val_set: FeatureDataset
    test_set: FeatureDataset
    model: torch.nn.Module
    collator: Collator


def build_run_parts(cfg: Config, task: Task) -> RunParts:
    """Read and split the data, tokenise it, load the model and apply the method.

    Generative tasks check their answers against the length limits before the
    model loads (``runs/preflight.py``): too many cut ones refuse the run.

    The seed is set just before the model is built, so a new head starts
    from the same weights in every run with that seed. Augmentation comes
    after the model (synonyms may be its embedding neighbours) and before
    tokenisation; only the training split is augmented.
    """
    from accelerate.utils import set_seed

    splits = task.load_splits()
    for note in splits.notes:
        log.info("%s", note)
    log.info(
        "data: %d train, %d validation, %d test rows; labels: %s",
        len(splits.train),
        len(splits.validation),
        len(splits.test),
        ", ".join(splits.labels),
    )
    tokenizer = load_tokenizer(
        cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code
    )
    preflight(cfg, task, splits, tokenizer)  # cut answers: refused before the model loads
    method = get_method(cfg)
    set_seed(cfg.train.seed)
    if cfg.distill.student_layers is not None:  # the teacher with fewer blocks
        model = method.apply(build_student(cfg, task, splits.labels))
    else:
        model = method.apply(task.build_model(splits.labels, tokenizer))
    if cfg.data.augment.enabled:  # after the model: embedding neighbours come from it
        splits.train, _stats = augment_training(cfg, splits.train, tokenizer, model)
    label2id = {lab: i for i, lab in enumerate(splits.labels)}
    features = task.pack_training(task.encode(splits.train, tokenizer, label2id), tokenizer)
    train_set = training_dataset(cfg, features, tokenizer)
    val_set, test_set = (
        FeatureDataset(task.encode(recs, tokenizer, label2id))
        for recs in (splits.validation, splits.test)
    )
    if task.has_classes:  # saved in the manifest: eval weighs the loss the same way
        task.class_weights = resolve_class_weights(cfg.loss, splits.labels, train_set.features)
    if method.padding_side is not None:  # recorded in the manifest for eval/predict
        tokenizer.padding_side = method.padding_side
    collator = Collator(tokenizer.pad_token_id, tokenizer.padding_side)
    return RunParts(splits, tokenizer, method, train_set, val_set, test_set, model, collator)
