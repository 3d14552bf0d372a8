"""Teacher logits for the training examples, and the distillation term of the objective.

With ``distill.cache_logits`` the teacher runs once over the training set
(eval mode, no gradients) before training; its logits are kept per example
(``(1, C)`` for a text, ``(L, C)`` for a sentence's sub-tokens) and written to
``teacher_logits.safetensors`` in the run folder, keyed by the teacher and the
training data, so a resumed run reuses them. Every epoch then costs only the
student's passes. Without the cache the teacher runs on every batch.

A batch finds its rows through ``batch["index"]`` (the dataset index each
item carries), so batching order, length grouping and replay do not matter.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.objectives.distill.hidden import LiveTeacher
from tunesmith.objectives.distill.kd import kd_loss_sum

log = logging.getLogger(__name__)

CACHE_FILE = "teacher_logits.safetensors"


def teacher_key(teacher: Path, fingerprint: str) -> str:
    """Identifies a cache: the teacher's weights (name, size, time) and the data's fingerprint."""
    stamp = sorted(
        (p.name, p.stat().st_size, int(p.stat().st_mtime))
        for p in Path(teacher).iterdir()
        if p.suffix == ".safetensors"
    )
    text = json.dumps([str(Path(teacher).resolve()), stamp, fingerprint])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


@torch.no_grad()
def compute_logits(
    model: nn.Module,
    task: Any,
    features: Sequence[Mapping[str, Any]],
    collator: Collator,
    batch_size: int = 64,
) -> list[torch.Tensor]:
    """The teacher's loss-aligned logits per feature: ``(1, C)`` or ``(length, C)``, fp32 CPU."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    loader = DataLoader(FeatureDataset(features), batch_size=batch_size, collate_fn=collator)
    out: list[torch.Tensor] = [torch.empty(0)] * len(features)
    for batch in loader:
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = task.loss_logits(model(**task.model_inputs(batch)), batch).float().cpu()
        for row, index in enumerate(batch["index"].tolist()):
            if logits.dim() == 2:
                out[index] = logits[row : row + 1].clone()
                continue
            length = len(features[index]["input_ids"])
            side = collator.padding_side
            kept = logits[row, -length:] if side == "left" else logits[row, :length]
            out[index] = kept.clone()
    model.train(was_training)
    return out


def save_cache(path: Path, logits: Sequence[torch.Tensor], key: str) -> None:
    """Write per-example logits as one flat tensor plus lengths."""
    from safetensors.torch import save_file

    flat = torch.cat(list(logits)) if logits else torch.empty(0, 0)
    lengths = torch.tensor([t.shape[0] for t in logits], dtype=torch.long)
    save_file({"logits": flat.contiguous(), "lengths": lengths}, str(path), metadata={"key": key})


def load_cache(path: Path, key: str) -> list[torch.Tensor] | None:
    """The cached per-example logits, or None when absent or made for other data/teacher."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    with safe_open(str(path), framework="pt") as fh:
        if (fh.metadata() or {}).get("key") != key:
            return None
        flat, lengths = fh.get_tensor("logits"), fh.get_tensor("lengths")
    return list(torch.split(flat, lengths.tolist()))


class TeacherLogits:
    """The teacher's logits for a training batch: from the cache, or by running the teacher.

    Args:
        task: The run's task (``loss_logits``, ``model_inputs``).
        cached: Per-example logits (dataset order), or None to run the teacher live.
        model: The teacher (needed when ``cached`` and ``live`` are None).
        padding_side: The collator's padding side (where sequence logits are padded).
        live: A running teacher shared with the hidden-state term (one pass per batch).
    """

    def __init__(
        self,
        task: Any,
        cached: Sequence[torch.Tensor] | None = None,
        model: nn.Module | None = None,
        padding_side: str = "right",
        live: Any = None,
    ) -> None:

        if cached is None and model is None and live is None:
            raise ValueError("give cached logits or a teacher model")
        if cached is None and live is None:
            live = LiveTeacher(task, model)
        self.task, self.cached, self.live, self.padding_side = task, cached, live, padding_side

    def for_batch(self, batch: Mapping[str, torch.Tensor], shape: torch.Size) -> torch.Tensor:
        """Teacher logits shaped like the student's loss logits (``shape``)."""
        if self.cached is None:
            out, _ = self.live.run(batch)
            return self.task.loss_logits(out, batch).float()
        rows = [self.cached[i] for i in batch["index"].tolist()]
        device = batch["index"].device
        if len(shape) == 2:
            return torch.cat(rows).to(device)
        padded = torch.zeros(len(rows), shape[1], shape[2])
        for i, row in enumerate(rows):
            if self.padding_side == "left":
                padded[i, shape[1] - row.shape[0] :] = row
            else:
                padded[i, : row.shape[0]] = row
        return padded.to(device)


class DistillTerm:
    """``alpha * T^2 * KL(teacher || student)`` per target; the task loss gets ``1 - alpha``."""

    name = "kd"

    def __init__(self, teacher: TeacherLogits, task: Any, alpha: float, temperature: float) -> None:
        self.teacher, self.task = teacher, task
        self.alpha, self.temperature = float(alpha), float(temperature)
        self.task_weight = 1.0 - self.alpha

    def loss_sum(self, outputs: Any, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
        student = self.task.loss_logits(outputs, batch)
        teacher = self.teacher.for_batch(batch, student.shape)
        kd = kd_loss_sum(
            student, teacher, batch["labels"], self.temperature, self.task.loss_function()
        )
        return self.alpha * kd
