"""What a run adds to plain fine-tuning: L2-SP, EWC, replay, distillation, the forgetting report.

Built by ``api.train`` right after ``build_run_parts``, from the ``regularize``,
``forgetting`` and ``distill`` sections; everything expensive (the Fisher, the
teacher's logits, the reference score before training) happens here, before
the first step, and what a resumed run must reuse is written into the run
folder (``ewc.safetensors``, ``teacher_logits.safetensors``) and read back
from it on resume. The loop only sees an ``Objective``, a training set and a
sampler.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tunesmith.config.root import Config
from tunesmith.data.batching import IGNORE, FeatureDataset
from tunesmith.errors import ConfigError
from tunesmith.methods.bottleneck import hidden_size_of
from tunesmith.objectives.distill import hidden as h
from tunesmith.objectives.distill import teacher as t
from tunesmith.objectives.distill.student import keep_indices
from tunesmith.objectives.objective import Objective
from tunesmith.objectives.regularize import fisher as fisher_mod
from tunesmith.objectives.regularize import penalties
from tunesmith.objectives.regularize.fisher import estimate_fisher
from tunesmith.objectives.regularize.reference import (
    encoder_parameters,
    forgetting_report,
    load_reference,
    replay_features,
    transplant_encoder,
)
from tunesmith.objectives.regularize.replay import ReplaySampler
from tunesmith.runs.load import load_checkpoint
from tunesmith.runs.parts import RunParts
from tunesmith.runs.predict import evaluate, generation_settings, predict, predict_records
from tunesmith.training.resume import data_fingerprint

log = logging.getLogger(__name__)
#: Probe prompts are answered greedily: the same answer every time, so before/after compare.
GREEDY = {"do_sample": False, "num_beams": 1, "num_return_sequences": 1}
REMEDY = (
    "replay general text while training (forgetting.replay: 0.1-0.3 with forgetting."
    "reference_text), or lower the learning rate or the number of epochs"
)


@dataclass
class RunExtras:
    """The objective, training set and sampler of a run, and its reference task.

    Attributes:
        objective: Loss terms and regularisers for the loop.
        train_set: The training examples (with replayed reference examples appended).
        sampler: The replay sampler, or None for the task's own.
        reference: The forgetting section's reference task, or None.
        before: The reference metrics before training (None: no report).
        writers: Files to write into the run folder once it exists.
    """

    objective: Objective
    train_set: FeatureDataset
    sampler: ReplaySampler | None = None
    reference: Any = None
    before: dict[str, Any] | None = None
    writers: list[Callable[[Path], None]] = field(default_factory=list)
    #: ``forgetting.probe_prompts`` and the untrained model's greedy answers to them.
    probes: list[dict[str, str]] = field(default_factory=list)

    def save(self, out: Path) -> None:
        """Write what a resumed run reads back (Fisher, teacher logits) into ``out``."""
        for write in self.writers:
            write(out)
        self.writers = []

    def forgetting(self, chosen: Path, limit: float | None = None) -> dict[str, Any]:
        """The forgetting report of the trained checkpoint ``chosen`` ({} when not asked).

        ``limit`` is ``forgetting.max_ppl_increase``: a perplexity ratio past it
        marks the report ``exceeded`` and names the remedy.
        """
        report = self._reference_report(chosen) if self.before is not None else {}
        if report.get("ppl_ratio") is not None and limit is not None:
            report["max_ppl_increase"] = limit
            report["exceeded"] = report["ppl_ratio"] > limit
            if report["exceeded"]:
                report["remedy"] = REMEDY
                log.warning(
                    "forgetting: reference perplexity x%.3f after training, past "
                    "forgetting.max_ppl_increase=%.3f; %s",
                    report["ppl_ratio"],
                    limit,
                    REMEDY,
                )
        if self.probes:
            prompts = [p["prompt"] for p in self.probes]
            answers = predict(chosen, texts=prompts, generate=GREEDY)
            report["probes"] = [
                {**p, "after": a["generated"]} for p, a in zip(self.probes, answers, strict=True)
            ]
        return report

    def _reference_report(self, chosen: Path) -> dict[str, Any]:
        ref = self.reference
        if ref.checkpoint is None:
            after = evaluate(chosen, records=ref.records)
        else:
            *_, trained, _, _ = load_checkpoint(chosen)
            *_, scorer, _, _ = load_checkpoint(ref.checkpoint)
            transplant_encoder(trained, scorer)
            del trained
            after = ref.score(scorer)
        report = forgetting_report(
            self.before, after, ref.metric, higher_is_better=ref.higher_is_better
        )
        log.info(
            "forgetting: reference %s %.4f before, %.4f after (retention %s)",
            report["metric"],
            report["before"],
            report["after"],
            report["retention"],
        )
        return report


def build_extras(
    cfg: Config, task: Any, parts: RunParts, out: Path, *, resuming: bool
) -> RunExtras:
    """Set up L2-SP, EWC, replay, distillation and the reference score, as configured."""

    trained = [(n, p) for g in parts.method.param_groups(parts.model) for n, p in g.params]
    regularisers: list[Any] = []
    if cfg.regularize.l2_sp > 0:
        regularisers.append(penalties.l2_sp(cfg.regularize.l2_sp, parts.model, trained))
    extras = RunExtras(Objective(), parts.train_set)
    if cfg.forgetting.active:
        _add_reference(cfg, task, parts, out, resuming, dict(trained), extras, regularisers)
    if cfg.forgetting.probe_prompts:
        extras.probes = probe_answers(cfg, task, parts, cfg.forgetting.probe_prompts)
    terms = _distill_terms(cfg, task, parts, extras, out, resuming) if cfg.distill.teacher else []
    extras.objective = Objective(terms, regularisers)
    return extras


def _add_reference(
    cfg: Config,
    task: Any,
    parts: RunParts,
    out: Path,
    resuming: bool,
    trained: dict[str, Any],
    extras: RunExtras,
    regularisers: list[Any],
) -> None:
    """Reference score before training, EWC's Fisher, the replay mix."""

    f = cfg.forgetting
    checkpoint = None
    if f.reference_checkpoint is not None:
        _, ref_task, ref_model, ref_tokenizer, ref_labels = load_checkpoint(
            f.reference_checkpoint,
            trust_remote_code=cfg.model.trust_remote_code,
            allow_unsafe_weights=cfg.model.allow_unsafe_weights,
        )
        checkpoint = (ref_task, ref_model, ref_tokenizer, ref_labels)
    ref = load_reference(cfg, task, parts.tokenizer, parts.splits.labels, checkpoint)
    extras.reference = ref
    log.info("forgetting: %d reference examples (%s)", len(ref.records), ref.task.name)
    if f.report:
        extras.before = ref.score(ref.model or parts.model)
    if f.ewc > 0:
        saved = out / fisher_mod.EWC_FILE
        if resuming and saved.is_file():
            fisher, anchors = fisher_mod.load_ewc(saved)
        else:
            fisher, anchors = _fisher(cfg, ref, parts, trained)
            extras.writers.append(lambda folder: fisher_mod.save_ewc(folder, fisher, anchors))
        if not fisher:
            log.warning("forgetting.ewc: no trained parameter has a Fisher value; EWC does nothing")
        regularisers.append(penalties.ewc(f.ewc, trained, fisher, anchors))
    if f.replay > 0:
        replayed = replay_features(ref, task, parts.tokenizer, parts.splits.labels)
        base = parts.train_set.features
        extras.train_set = FeatureDataset([*base, *replayed])
        extras.sampler = ReplaySampler(
            [task.feature_length(x) for x in base],
            [task.feature_length(x) for x in replayed],
            f.replay,
            cfg.train.batch_size,
            group_by_length=cfg.data.group_by_length,
            seed=cfg.train.seed,
        )
        log.info("replay: %d reference examples per epoch", extras.sampler.count)
        if task.chat_data:  # a causal LM's loss averages over every trained token of a batch
            share = sum(len(x["input_ids"]) for x in replayed) / max(
                1, sum(len(x["input_ids"]) for x in replayed) + _trained_tokens(base)
            )
            log.info(
                "replay: replayed text trains every token: %.0f%% of the trained tokens of a "
                "full pass (the loss averages over tokens, so this is its weight)",
                100 * share,
            )
    ref.model = None  # the report reloads it; not kept in memory during training


def _trained_tokens(features: list[dict[str, Any]]) -> int:
    return sum(sum(1 for t in f.get("labels", ())[1:] if t != IGNORE) for f in features)


def probe_answers(
    cfg: Config, task: Any, parts: RunParts, prompts: list[str]
) -> list[dict[str, str]]:
    """Greedy answers of the untrained model (the method applied, nothing learned yet)."""
    own = task.cfg
    task.cfg = cfg.model_copy(update={"generate": generation_settings(cfg, GREEDY)})
    try:
        records = task.text_records(prompts)
        rows = predict_records(parts.model, task, parts.tokenizer, parts.splits.labels, records)
    finally:
        task.cfg = own
    return [{"prompt": p, "before": r["generated"]} for p, r in zip(prompts, rows, strict=True)]


def _fisher(cfg: Config, ref: Any, parts: RunParts, trained: dict[str, Any]) -> tuple[dict, dict]:
    """Fisher and anchors keyed by the run model's parameter names."""

    samples, seed = cfg.forgetting.fisher_samples, cfg.train.seed
    if ref.model is None:  # the run's own model is the reference: every trained weight
        fisher = estimate_fisher(
            parts.model, ref.task, ref.features, ref.collator, trained, samples=samples, seed=seed
        )
        return fisher, {n: p.detach().clone() for n, p in trained.items()}
    ref_params = encoder_parameters(ref.model)
    by_own = {own: p for own, p in ref_params.values()}
    ref_fisher = estimate_fisher(
        ref.model, ref.task, ref.features, ref.collator, by_own, samples=samples, seed=seed
    )
    fisher, anchors = {}, {}
    for rel, (name, param) in encoder_parameters(parts.model).items():
        if name in trained and rel in ref_params and ref_params[rel][1].shape == param.shape:
            own, ref_param = ref_params[rel]
            fisher[name], anchors[name] = ref_fisher[own], ref_param.detach().clone()
    return fisher, anchors


def _distill_terms(
    cfg: Config, task: Any, parts: RunParts, extras: RunExtras, out: Path, resuming: bool
) -> list[Any]:
    """The KD term (teacher logits cached and saved, or computed live) and, with
    ``distill.hidden_weight``, the hidden-state term."""

    d = cfg.distill
    _, t_task, model, tokenizer, labels = load_checkpoint(
        d.teacher,
        trust_remote_code=cfg.model.trust_remote_code,
        allow_unsafe_weights=cfg.model.allow_unsafe_weights,
    )
    if t_task.name != task.name or list(labels) != list(parts.splits.labels):
        raise ConfigError(
            f"distill.teacher: a {t_task.name} model with labels {labels}; the run trains "
            f"{task.name} with labels {parts.splits.labels} (same task, same labels and order)"
        )
    if tokenizer.get_vocab() != parts.tokenizer.get_vocab():
        raise ConfigError(
            "distill.teacher: its tokenizer differs from model.name_or_path's; teacher and "
            "student must read the same token ids"
        )
    side = parts.collator.padding_side
    live = None
    if d.hidden_weight > 0 or not d.cache_logits:
        live = h.LiveTeacher(task, model, hidden=d.hidden_weight > 0)
    cached = None
    if d.cache_logits:
        features = extras.train_set.features
        key = t.teacher_key(Path(d.teacher), data_fingerprint(features))
        cached = t.load_cache(out / t.CACHE_FILE, key) if resuming else None
        if cached is None:
            log.info("distill: computing the teacher's logits on %d examples", len(features))
            cached = t.compute_logits(
                model, task, features, parts.collator, cfg.train.effective_eval_batch_size
            )
            logits = cached
            extras.writers.append(lambda folder: t.save_cache(folder / t.CACHE_FILE, logits, key))
    teacher = t.TeacherLogits(task, cached, padding_side=side, live=live)
    terms: list[Any] = [t.DistillTerm(teacher, task, d.alpha, d.temperature)]
    if live is not None and live.blocks is not None:
        terms.append(_hidden_term(cfg, task, parts.model, live))
    return terms


def _hidden_term(cfg: Config, task: Any, student: Any, live: Any) -> Any:
    """Hidden-state matching between the student's blocks and the teacher's."""

    mine = h.BlockOutputs(student)
    theirs = live.blocks
    sizes = (
        hidden_size_of(student, mine.blocks[0]),
        hidden_size_of(live.model, theirs.blocks[0]),
    )
    if sizes[0] != sizes[1]:
        raise ConfigError(
            f"distill.hidden_weight: the student's hidden size is {sizes[0]}, the teacher's "
            f"{sizes[1]}; hidden-state matching needs the same size"
        )
    d = cfg.distill
    kept = None
    if d.student_layers is not None:
        kept = keep_indices(len(theirs.blocks), d.student_layers)
    pairs = h.matched_blocks(len(mine.blocks), len(theirs.blocks), kept)
    log.info("distill: hidden states matched (student, teacher blocks): %s", pairs)
    return h.HiddenTerm(mine, live, pairs, task, d.hidden_weight)
