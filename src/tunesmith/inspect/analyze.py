"""``tunesmith analyze``: which layers matter for this data, before tuning.

On a few batches of the user's training data it measures, per layer group
(embeddings, each block, head):

* the gradient norm of the loss (how hard the data pulls on the group);
* a diagonal empirical-Fisher importance: the mean squared gradient per
  parameter, averaged over batches (a standard sensitivity estimate);
* a cheap probe: the validation-batch loss after a few AdamW steps in which
  only that group (plus the new head, which starts random) may adapt,
  compared with adapting the head alone.

From the probe it suggests how many top blocks to train (the fewest whose
gains cover most of the total) and prints a ready config fragment. It is a
heuristic guide, not a guarantee; the numbers are printed so a user can judge.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils.data import DataLoader

from tunesmith.config.root import Config
from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.methods.base import ParamGroup
from tunesmith.models.layers import EMBEDDINGS, HEAD, LayerMap, discover_layers
from tunesmith.models.loading import check_model_source, load_tokenizer, quiet_transformers
from tunesmith.tasks.base import Batch, Task, get_task
from tunesmith.training.optim import build_optimizer

log = logging.getLogger(__name__)

#: Share of the summed block gains the suggested top blocks must cover.
COVERAGE = 0.8
#: Probes are a few steps long; a larger LR than training makes their signal visible.
PROBE_LR_FACTOR = 10.0


@dataclass
class GroupReport:
    """Measurements of one layer group."""

    group: str
    parameters: int
    grad_norm: float
    fisher: float
    probe_loss: float
    probe_gain: float  # loss reduction beyond adapting the head alone


@dataclass
class Analysis:
    """Per-group measurements and the suggestion derived from them."""

    rows: list[GroupReport] = field(default_factory=list)
    base_loss: float = 0.0
    head_only_loss: float = 0.0
    suggested_layers: int | None = None
    suggestion: dict[str, Any] = field(default_factory=dict)


def analyze(cfg: Config, *, batches: int = 8, probe_steps: int = 10) -> Analysis:
    """Measure per-group sensitivity on ``batches`` training batches (see module doc)."""
    from accelerate.utils import set_seed

    quiet_transformers()
    check_model_source(cfg.model.name_or_path, allow_unsafe_weights=cfg.model.allow_unsafe_weights)
    task = get_task(cfg)
    splits = task.load_splits()
    tokenizer = load_tokenizer(
        cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code
    )
    label2id = {lab: i for i, lab in enumerate(splits.labels)}
    collator = Collator(tokenizer.pad_token_id, tokenizer.padding_side)
    bs = cfg.train.batch_size
    train_batches = _batches(task, splits.train, tokenizer, label2id, collator, bs, batches, cfg)
    held_out = splits.validation or splits.train
    probe_eval = _batches(task, held_out, tokenizer, label2id, collator, bs, 4, cfg)

    set_seed(cfg.train.seed)
    model = task.build_model(splits.labels, tokenizer)
    layers = discover_layers(model, cfg.method.blocks)
    model.train()
    grad_norms, fisher = _sensitivity(model, task, layers, train_batches)
    initial = copy.deepcopy(model.state_dict())

    result = Analysis(base_loss=_loss(model, task, probe_eval))
    result.head_only_loss = _probe(
        model, task, layers, [HEAD], train_batches, probe_eval, cfg, probe_steps
    )
    for group in layers.groups:
        model.load_state_dict(initial)
        if group == HEAD:
            probe = result.head_only_loss
        else:
            probe = _probe(
                model, task, layers, [group, HEAD], train_batches, probe_eval, cfg, probe_steps
            )
        result.rows.append(
            GroupReport(
                group=group,
                parameters=sum(p.numel() for _, p in layers.params_of(model, group)),
                grad_norm=grad_norms[group],
                fisher=fisher[group],
                probe_loss=probe,
                probe_gain=result.head_only_loss - probe,
            )
        )
    result.suggested_layers, result.suggestion = _suggest(result.rows, layers)
    return result


def _batches(
    task: Task,
    records: list[dict[str, Any]],
    tokenizer: Any,
    label2id: dict[str, int],
    collator: Collator,
    batch_size: int,
    count: int,
    cfg: Config,
) -> list[Batch]:
    """``count`` seeded random batches (length-grouped like training)."""
    subset = records[: batch_size * count * 4]
    features = task.encode(subset, tokenizer, label2id)
    sampler = task.train_sampler(features, batch_size, group_by_length=True, seed=cfg.train.seed)
    loader = DataLoader(
        FeatureDataset(features), batch_size=batch_size, sampler=sampler, collate_fn=collator
    )
    out = []
    for batch in loader:
        if len(out) == count:
            break
        out.append(batch)
    return out


def _batch_loss(model: torch.nn.Module, task: Task, batch: Batch) -> torch.Tensor:
    outputs = model(**task.model_inputs(batch))
    return task.loss_sum(outputs, batch) / task.count_targets(batch).clamp(min=1)


@torch.no_grad()
def _loss(model: torch.nn.Module, task: Task, batches: list[Batch]) -> float:
    was = model.training
    model.eval()
    value = sum(float(_batch_loss(model, task, b)) for b in batches) / len(batches)
    model.train(was)
    return value


def _sensitivity(
    model: torch.nn.Module, task: Task, layers: LayerMap, batches: list[Batch]
) -> tuple[dict[str, float], dict[str, float]]:
    """Mean gradient norm and mean squared gradient per parameter, per group."""
    params = {g: [p for _, p in layers.params_of(model, g)] for g in layers.groups}
    norms = dict.fromkeys(params, 0.0)
    fisher = dict.fromkeys(params, 0.0)
    for p in model.parameters():
        p.requires_grad_(True)
    for batch in batches:
        model.zero_grad(set_to_none=True)
        _batch_loss(model, task, batch).backward()
        for group, ps in params.items():
            grads = [p.grad.detach().float() for p in ps if p.grad is not None]
            if not grads:
                continue
            squared = sum(float((g * g).sum()) for g in grads)
            norms[group] += squared**0.5 / len(batches)
            fisher[group] += squared / sum(p.numel() for p in ps) / len(batches)
    model.zero_grad(set_to_none=True)
    return norms, fisher


def _probe(
    model: torch.nn.Module,
    task: Task,
    layers: LayerMap,
    groups: list[str],
    train_batches: list[Batch],
    eval_batches: list[Batch],
    cfg: Config,
    steps: int,
) -> float:
    """Held-out loss after ``steps`` AdamW steps in which only ``groups`` adapt."""
    chosen = [(n, p) for g in groups for n, p in layers.params_of(model, g)]
    ids = {id(p) for _, p in chosen}
    for p in model.parameters():
        p.requires_grad_(id(p) in ids)
    probe_cfg = cfg.optim.model_copy(update={"lr": cfg.optim.lr * PROBE_LR_FACTOR})
    optimizer = build_optimizer([ParamGroup("probe", chosen)], probe_cfg)
    for step in range(steps):
        batch = train_batches[step % len(train_batches)]
        _batch_loss(model, task, batch).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return _loss(model, task, eval_batches)


def _suggest(rows: list[GroupReport], layers: LayerMap) -> tuple[int | None, dict[str, Any]]:
    """The fewest top blocks covering ``COVERAGE`` of the positive block gains."""
    gain = {r.group: max(r.probe_gain, 0.0) for r in rows}
    depth = max(len(s) for s in layers.blocks)
    per_depth = [
        sum(gain.get(g, 0.0) for g in layers.top_blocks(k) if g not in layers.top_blocks(k - 1))
        for k in range(1, depth + 1)
    ]
    total = sum(per_depth)
    if total <= 0:
        return 0, {"method": {"name": "freeze", "train_layers": 0}}
    covered, k = 0.0, 0
    while k < depth and covered < COVERAGE * total:
        covered += per_depth[k]
        k += 1
    if k >= depth:
        emb_gain = gain.get(EMBEDDINGS, 0.0)
        llrd = 0.8 if emb_gain < 0.1 * total else 0.9
        return None, {"method": {"name": "full", "llrd": llrd}}
    return k, {"method": {"name": "freeze", "train_layers": k}}


def render(result: Analysis) -> str:
    """The per-group table, the suggestion and the ready config fragment."""
    import yaml

    lines = [
        f"loss before any update: {result.base_loss:.4f}; after adapting the head alone: "
        f"{result.head_only_loss:.4f}",
        f"{'group':<20}{'params':>12}{'grad norm':>12}{'fisher/param':>14}"
        f"{'probe loss':>12}{'gain':>9}",
    ]
    for r in result.rows:
        lines.append(
            f"{r.group:<20}{r.parameters:>12,}{r.grad_norm:>12.4f}{r.fisher:>14.3e}"
            f"{r.probe_loss:>12.4f}{r.probe_gain:>9.4f}"
        )
    lines.append("")
    if result.suggested_layers is None:
        lines.append("suggestion: gains spread over every block: fine-tune all of them with decay")
    else:
        lines.append(
            f"suggestion: train the top {result.suggested_layers} block(s) + head "
            f"(they give >= {COVERAGE:.0%} of the probe gain)"
        )
    lines.append("config fragment:")
    lines.append(yaml.safe_dump(result.suggestion, sort_keys=False).rstrip())
    return "\n".join(lines)
