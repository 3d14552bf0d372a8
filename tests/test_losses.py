"""The classification losses, class weights and the distillation term, against hand values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tunesmith.config.losses import LossConfig
from tunesmith.config.root import Config
from tunesmith.errors import ConfigError
from tunesmith.objectives.class_weights import computed_weights, label_counts, resolve_class_weights
from tunesmith.objectives.distill.kd import kd_loss_sum
from tunesmith.objectives.objective import Objective
from tunesmith.tasks.losses.classification import ClassificationLoss


def _data(seed: int = 0, n: int = 6, classes: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, generator=g, dtype=torch.float64)
    labels = torch.randint(0, classes, (n,), generator=g)
    return logits, labels


def test_focal_with_gamma_zero_is_cross_entropy():
    logits, labels = _data()
    focal = ClassificationLoss(gamma=0.0).loss_sum(logits, labels)
    assert focal.item() == pytest.approx(F.cross_entropy(logits, labels, reduction="sum").item())
    # ... and gamma > 0 lowers the loss of every example (the factor is below 1).
    assert ClassificationLoss(gamma=2.0).loss_sum(logits, labels) < focal


def test_focal_matches_the_definition_by_hand():
    logits = torch.tensor([[2.0, 0.0]], dtype=torch.float64)
    p = math.exp(2) / (math.exp(2) + 1)
    expected = (1 - p) ** 2 * -math.log(p)
    got = ClassificationLoss(gamma=2.0).loss_sum(logits, torch.tensor([0]))
    assert got.item() == pytest.approx(expected)


def test_label_smoothing_matches_the_closed_form():
    # Two classes, logits (0, ln 3): p = (1/4, 3/4); label 1, eps 0.2:
    # (1 - eps) * -ln(3/4) + eps / 2 * (-ln(1/4) - ln(3/4)).
    logits = torch.tensor([[0.0, math.log(3.0)]])
    eps = 0.2
    expected = (1 - eps) * -math.log(0.75) + eps / 2 * (-math.log(0.25) - math.log(0.75))
    got = ClassificationLoss(label_smoothing=eps).loss_sum(logits, torch.tensor([1]))
    assert got.item() == pytest.approx(expected, rel=1e-6)
    torch_value = F.cross_entropy(logits, torch.tensor([1]), label_smoothing=eps)
    assert got.item() == pytest.approx(torch_value.item(), rel=1e-6)


def test_class_weights_change_the_loss_as_computed_by_hand():
    logits = torch.tensor([[0.0, math.log(3.0)], [0.0, math.log(3.0)]])
    labels = torch.tensor([0, 1])
    loss = ClassificationLoss(weights=[3.0, 1.0])
    expected_sum = 3.0 * -math.log(0.25) + 1.0 * -math.log(0.75)
    assert loss.loss_sum(logits, labels).item() == pytest.approx(expected_sum, rel=1e-6)
    assert loss.normaliser(labels).item() == pytest.approx(4.0)
    # The weighted mean is PyTorch's CrossEntropyLoss(weight=...).
    mean = loss.loss_sum(logits, labels) / loss.normaliser(labels)
    torch_mean = F.cross_entropy(logits, labels, weight=torch.tensor([3.0, 1.0]))
    assert mean.item() == pytest.approx(torch_mean.item(), rel=1e-6)


def test_ignored_labels_count_nowhere_and_accumulation_equals_one_batch():
    logits = torch.randn(2, 5, 3, generator=torch.Generator().manual_seed(1))
    labels = torch.tensor([[0, 2, -100, 1, -100], [-100, 1, 1, 0, 2]])
    loss = ClassificationLoss(weights=[1.0, 4.0, 0.5], label_smoothing=0.1, gamma=1.5)
    keep = labels != -100
    flat = loss.loss_sum(logits[keep], labels[keep])
    assert loss.loss_sum(logits, labels).item() == pytest.approx(flat.item(), rel=1e-6)
    # Two micro-batches normalised by the window's summed weights == the whole batch.
    whole = loss.loss_sum(logits, labels) / loss.normaliser(labels)
    parts = sum(loss.loss_sum(logits[i : i + 1], labels[i : i + 1]) for i in range(2))
    window = sum(loss.normaliser(labels[i : i + 1]) for i in range(2))
    assert (parts / window).item() == pytest.approx(whole.item(), rel=1e-6)


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"label_smoothing": 0.1},
        {"weights": [0.5, 2.0, 1.0]},
        {"gamma": 2.0},
        {"gamma": 0.5, "label_smoothing": 0.2, "weights": [1.0, 3.0, 0.2]},
    ],
)
def test_gradcheck_classification_loss(options):
    logits, labels = _data(seed=3)
    loss = ClassificationLoss(**options)
    assert torch.autograd.gradcheck(
        lambda z: loss.loss_sum(z, labels), (logits.requires_grad_(True),)
    )


def test_gradcheck_kd_loss():
    student, labels = _data(seed=4)
    teacher, _ = _data(seed=5)
    weighted = ClassificationLoss(weights=[1.0, 2.0, 0.5])
    for class_loss in (None, weighted):
        assert torch.autograd.gradcheck(
            lambda s, cl=class_loss: kd_loss_sum(s, teacher, labels, 2.0, cl),
            (student.requires_grad_(True),),
        )


class _Term:
    """The KD term's arithmetic without a model: fixed teacher logits."""

    name = "kd"

    def __init__(self, teacher: torch.Tensor, alpha: float, temperature: float) -> None:
        self.teacher, self.alpha, self.temperature = teacher, alpha, temperature
        self.task_weight = 1 - alpha

    def loss_sum(self, outputs, batch):
        return self.alpha * kd_loss_sum(outputs, self.teacher, batch["labels"], self.temperature)


def test_kd_alpha_zero_is_plain_cross_entropy():
    student, labels = _data(seed=6)
    teacher, _ = _data(seed=7)
    ce = ClassificationLoss().loss_sum(student, labels)
    total = Objective([_Term(teacher, 0.0, 4.0)]).batch_loss(ce, student, {"labels": labels})
    assert total.item() == pytest.approx(F.cross_entropy(student, labels, reduction="sum").item())


def test_kd_with_t1_alpha1_is_the_kl_between_the_distributions():
    student, labels = _data(seed=8)
    teacher, _ = _data(seed=9)
    ce = ClassificationLoss().loss_sum(student, labels)
    total = Objective([_Term(teacher, 1.0, 1.0)]).batch_loss(ce, student, {"labels": labels})
    kl = F.kl_div(
        student.log_softmax(-1), teacher.log_softmax(-1), log_target=True, reduction="sum"
    )
    assert total.item() == pytest.approx(kl.item(), rel=1e-9)
    # Identical models: nothing to distil.
    assert kd_loss_sum(teacher, teacher, labels, 3.0).item() == pytest.approx(0.0, abs=1e-12)


def test_kd_skips_ignored_positions():
    student = torch.randn(1, 4, 3, dtype=torch.float64)
    teacher = torch.randn(1, 4, 3, dtype=torch.float64)
    labels = torch.tensor([[1, -100, 0, -100]])
    keep = labels[0] != -100
    whole = kd_loss_sum(student, teacher, labels, 2.0)
    kept = kd_loss_sum(student[0, keep], teacher[0, keep], labels[0, keep], 2.0)
    assert whole.item() == pytest.approx(kept.item())


def test_computed_class_weights():
    counts = label_counts([{"labels": 0}] * 9 + [{"labels": 1}], 2)
    assert counts == [9, 1]
    inverse = computed_weights(counts, "inverse")
    assert inverse[1] / inverse[0] == pytest.approx(9.0)
    assert sum(inverse) / 2 == pytest.approx(1.0)
    effective = computed_weights(counts, "effective", beta=0.9)
    ratio = (1 - 0.9**9) / (1 - 0.9)  # (1 - b) / (1 - b^1) over (1 - b) / (1 - b^9)
    assert effective[1] / effective[0] == pytest.approx(ratio)
    assert computed_weights([5, 5], "effective", beta=0.0) == [1.0, 1.0]
    # Token features: -100 is not a class.
    assert label_counts([{"labels": [-100, 1, 1, -100, 0]}], 3) == [1, 2, 0]


def test_resolve_class_weights_lists_mappings_and_alpha():
    labels = ["neg", "pos"]
    cfg = LossConfig(class_weights={"pos": 4.0})
    assert resolve_class_weights(cfg, labels, []) == [1.0, 4.0]
    cfg = LossConfig(type="focal", class_weights=[2.0, 1.0], focal_alpha={"neg": 0.25, "pos": 0.75})
    assert resolve_class_weights(cfg, labels, []) == [0.5, 0.75]
    with pytest.raises(ConfigError, match=r"unknown label 'poss'.*did you mean 'pos'"):
        resolve_class_weights(LossConfig(class_weights={"poss": 2.0}), labels, [])
    with pytest.raises(ConfigError, match="3 weights for 2 labels"):
        resolve_class_weights(LossConfig(class_weights=[1.0, 2.0, 3.0]), labels, [])


def test_loss_section_validation(tmp_path):
    base = {"model": {"name_or_path": "m"}, "data": {"train": "t.csv"}}
    cfg = Config.from_dict({**base, "loss": {"type": "focal", "class_weights": "inverse"}})
    assert cfg.loss.focal_gamma == 2.0
    # A saved (fully resolved) config loads back.
    cfg.save(tmp_path / "c.yaml")
    assert Config.load(tmp_path / "c.yaml").loss.class_weights == "inverse"
    with pytest.raises(ConfigError, match="focal_gamma is only read with type: focal"):
        Config.from_dict({**base, "loss": {"focal_gamma": 1.0}})
    with pytest.raises(ConfigError, match="only for sequence_classification"):
        Config.from_dict({**base, "task": {"type": "seq2seq"}, "loss": {"type": "focal"}})
    with pytest.raises(ConfigError, match="weights must be >= 0"):
        Config.from_dict({**base, "loss": {"class_weights": [-1.0, 1.0]}})
    mapped = Config.from_dict({**base, "loss": {"class_weights": {0: 1.0, 1: 3.0}}})
    assert mapped.loss.class_weights == {"0": 1.0, "1": 3.0}
