"""Forgetting of a generative run: reference-text perplexity, probes, the limit, text replay."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from chat_fixtures import CORPUS, build_tiny_llama, write_jsonl
from test_causal_lm import chats
from tunesmith.api import train
from tunesmith.config.root import Config
from tunesmith.errors import ConfigError
from tunesmith.evaluation.report.page import _evaluation_html
from tunesmith.objectives.regularize.reference import forgetting_report
from tunesmith.tasks.losses import IGNORE

pytestmark = pytest.mark.usefixtures("one_thread")
PROBES = ["What is your name?", "hello world"]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-forget"))


def reference_text(folder: Path) -> Path:
    """Twelve paragraphs of general text (the fixture corpus, varied)."""
    docs = [" ".join(CORPUS[i % 4].split()[i % 3 :]) + f" {i}" for i in range(12)]
    path = folder / "general.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def run_config(model: Path, folder: Path, **forgetting) -> Config:
    data = write_jsonl(folder / "chats.jsonl", chats(48))
    return Config.from_dict(
        {
            "model": {"name_or_path": str(model)},
            "task": {"type": "causal_lm"},
            "data": {"train": str(data), "max_length": 64, "validation_fraction": 0.2},
            "optim": {"lr": 3e-2, "warmup_ratio": 0.0, "weight_decay": 0.0},
            "train": {"epochs": 2, "batch_size": 8, "output_dir": str(folder / "out")},
            "generate": {"max_new_tokens": 6, "do_sample": True},  # probes stay greedy
            "forgetting": {"reference_text": str(reference_text(folder)), **forgetting},
        }
    )


def test_direction_of_retention_and_the_perplexity_ratio():
    worse = forgetting_report(
        {"perplexity": 10.0}, {"perplexity": 12.5}, "perplexity", higher_is_better=False
    )
    assert worse["retention"] == pytest.approx(0.8) and worse["ppl_ratio"] == pytest.approx(1.25)
    acc = forgetting_report({"accuracy": 0.8}, {"accuracy": 0.6}, "accuracy")
    assert acc["retention"] == pytest.approx(0.75) and "ppl_ratio" not in acc


def test_sft_run_measures_reference_perplexity_probes_and_marks_the_limit(tiny_llama, tmp_path):
    cfg = run_config(tiny_llama, tmp_path, probe_prompts=PROBES, max_ppl_increase=1.0001)
    result = train(cfg, progress=False)
    f = result.forgetting
    assert f["metric"] == "perplexity" and f["before"] > 1 and f["after"] > 1
    assert f["ppl_ratio"] == pytest.approx(f["after"] / f["before"], rel=1e-5)
    assert f["retention"] == pytest.approx(f["before"] / f["after"], rel=1e-5)
    # Replies are all REPLY: learning them moves general text; the tiny limit is passed.
    assert f["ppl_ratio"] > 1.0001 and f["exceeded"] is True
    assert "forgetting.replay" in f["remedy"]
    assert [p["prompt"] for p in f["probes"]] == PROBES
    assert all(p["before"] != p["after"] for p in f["probes"][:1])  # the model changed
    summary = json.loads((tmp_path / "out" / "summary.json").read_text())
    assert summary["forgetting"]["probes"] == f["probes"]
    rows = [json.loads(x) for x in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    (ref,) = [r for r in rows if r["split"] == "reference"]
    assert ref["forgetting/exceeded"] is True and "forgetting/probes" not in ref
    page = _evaluation_html(summary, None)
    assert "past forgetting.max_ppl_increase" in page and "probe prompts" in page


def test_replay_mixes_held_apart_text_into_training(tiny_llama, tmp_path):
    from tunesmith.objectives.regularize.reference import load_reference
    from tunesmith.objectives.regularize.replay import replay_count
    from tunesmith.runs.extras import build_extras
    from tunesmith.runs.parts import build_run_parts
    from tunesmith.tasks.base import get_task

    cfg = run_config(tiny_llama, tmp_path, replay=0.25, reference_samples=4, report=False)
    task = get_task(cfg)
    parts = build_run_parts(cfg, task)
    ref = load_reference(cfg, task, parts.tokenizer, [])
    measured = {r["source"] for r in ref.records}
    replayed = {r["source"] for r in ref.replay_records}
    assert len(measured) == 4 and len(replayed) == 8 and not measured & replayed
    extras = build_extras(cfg, task, parts, tmp_path / "out", resuming=False)
    added = extras.train_set.features[len(parts.train_set) :]
    assert len(added) == 8  # every replay document (short: one piece each)
    assert all(f["labels"] == f["input_ids"] for f in added)  # plain text: every token
    assert all(IGNORE in f["labels"] for f in parts.train_set.features)  # chats: replies only
    assert extras.sampler.count == replay_count(len(parts.train_set), 0.25) > 0


@pytest.mark.parametrize(
    ("changes", "match"),
    [
        ({"task": {"type": "sequence_classification"}}, r"forgetting\.reference_text: for gen"),
        ({"forgetting": {"reference_data": "x.csv"}}, "cannot be combined"),
    ],
)
def test_reference_text_is_refused_where_it_cannot_apply(changes, match, tmp_path):
    raw = {
        "model": {"name_or_path": "m"},
        "task": {"type": "causal_lm"},
        "data": {"train": "t.jsonl"},
        "forgetting": {"reference_text": "general.txt"},
    }
    for key, value in changes.items():
        raw[key] = {**raw[key], **value}
    with pytest.raises(ConfigError, match=match):
        Config.from_dict(raw)
    with pytest.raises(ConfigError, match="max_ppl_increase needs reference_text"):
        Config.from_dict(
            {
                "model": {"name_or_path": "m"},
                "data": {"train": "t"},
                "forgetting": {"max_ppl_increase": 1.1},
            }
        )


def test_compare_table_shows_the_perplexity_ratio_and_the_mark():
    from tunesmith.studies.compare.table import _retention_text

    report = {"retention": 0.8, "ppl_ratio": 1.25, "exceeded": True}
    assert _retention_text(report) == "0.800 (ppl x1.250) PAST LIMIT"
    assert _retention_text({"retention": 0.95}) == "0.950"
    assert _retention_text({}) == "n/a (no reference)"
