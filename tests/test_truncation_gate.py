"""The pre-flight truncation gate of generative tasks (causal_lm, seq2seq).

Answers cut by the length limits are counted from the tokenizer alone, and a
run whose training split is cut beyond ``data.max_truncated_fraction`` is
refused before the model loads (a spy on ``build_model`` proves the order).
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from chat_fixtures import build_tiny_llama, write_jsonl
from helpers import write_config
from test_causal_lm import REPLY, sft_config
from test_seq2seq import build_tiny_t5, s2s_config
from tunesmith.api import train
from tunesmith.cli import main
from tunesmith.config.data import DataConfig
from tunesmith.config.root import Config
from tunesmith.errors import DataError
from tunesmith.models.loading import load_tokenizer
from tunesmith.runs.preflight import preflight
from tunesmith.tasks.base import get_task
from tunesmith.tasks.causal_lm import CausalLM
from tunesmith.tasks.chat_template import resolve_template
from tunesmith.tasks.seq2seq import Seq2Seq

LONG = "hello world " * 8  # with this prompt a chat is ~108 tokens, without it ~44


class ModelLoaded(Exception):
    """Raised by the spy standing in for ``build_model``: the gate let the run through."""


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture
def loads(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every ``build_model`` call of a generative task is recorded, then stops the run."""
    calls: list[str] = []

    def spy(self, labels, tokenizer):
        calls.append(self.name)
        raise ModelLoaded

    for task in (CausalLM, Seq2Seq):
        monkeypatch.setattr(task, "build_model", spy)
    return calls


def chat_rows(n: int, cut: int) -> list[dict]:
    """``n`` distinct chats; the first ``cut`` have a long prompt that pushes REPLY past 64."""
    return [
        {"prompt": f"{LONG if i < cut else ''}What is your name? {i}", "response": REPLY}
        for i in range(n)
    ]


def chat_config(model: Path, tmp_path: Path, rows: list[dict], **data) -> Config:
    """Training rows as given, one short validation chat (the split is not random)."""
    tmp_path.mkdir(parents=True, exist_ok=True)
    train_file = write_jsonl(tmp_path / "train.jsonl", rows)
    val = write_jsonl(tmp_path / "val.jsonl", [{"prompt": "Hi", "response": REPLY}])
    data = {"validation": str(val), "max_length": 64, **data}
    return sft_config(model, train_file, tmp_path / "out", data=data)


def chat_report(model: Path, tmp_path: Path, messages: list[list[dict]], **data):
    cfg = chat_config(model, tmp_path, [{"messages": m} for m in messages], **data)
    task = get_task(cfg)
    return task, task.truncation(task.load_splits().train, load_tokenizer(str(model)))


# -- the required test ------------------------------------------------------------------
def test_a_cut_answer_is_counted_and_refuses_the_run_before_the_model_loads(
    tiny_llama: Path, tmp_path: Path, loads: list[str]
) -> None:
    cfg = chat_config(tiny_llama, tmp_path, chat_rows(10, cut=2))
    task = get_task(cfg)
    report = task.truncation(task.load_splits().train, load_tokenizer(str(tiny_llama)))
    assert len(report.rows) == 10 and [r.source for r in report.cut] == [
        "train.jsonl:1",
        "train.jsonl:2",
    ]
    assert all(r.answer_cut and r.lost > 0 for r in report.cut)
    with pytest.raises(DataError) as err:
        train(cfg, progress=False)
    message = str(err.value)
    for said in (
        "2 of 10 train rows (20.0%) cut by data.max_length=64",
        "data.max_truncated_fraction is 0.05",
        "Raise data.max_length",
        "data.drop_truncated: true",
        "Worst: train.jsonl:",
    ):
        assert said in message
    assert loads == []  # refused before the model was asked for


def test_the_default_threshold_is_five_percent(
    tiny_llama: Path, tmp_path: Path, loads: list[str], caplog: pytest.LogCaptureFixture
) -> None:
    assert DataConfig().max_truncated_fraction == 0.05 and DataConfig().drop_truncated is False
    # 1 of 20 rows cut (5%) is not above the default: the run goes on to load the model ...
    cfg = chat_config(tiny_llama, tmp_path / "a", chat_rows(20, cut=1))
    with caplog.at_level(logging.INFO, "tunesmith.runs.preflight"), pytest.raises(ModelLoaded):
        train(cfg, progress=False)
    assert loads == ["causal_lm"]
    logged = caplog.text
    assert "1 of 20 train rows (5.0%) cut by data.max_length=64" in logged
    assert "tokens trained (" in logged and "0 of 1 validation rows" in logged
    # ... 2 of 20 (10%) is refused
    with pytest.raises(DataError, match="2 of 20 train rows"):
        train(chat_config(tiny_llama, tmp_path / "b", chat_rows(20, cut=2)), progress=False)
    assert loads == ["causal_lm"]


# -- what counts as cut -----------------------------------------------------------------
def test_a_cut_end_of_turn_token_is_counted_apart_from_a_cut_answer(
    tiny_llama: Path, tmp_path: Path
) -> None:
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": REPLY}]
    task, whole = chat_report(tiny_llama, tmp_path / "a", [chat])
    (row,) = whole.rows
    assert not row.cut and row.end_trained and whole.end_token == "<|im_end|>"
    # the limit ending right before <|im_end|> (+ its newline): the reply fits, its end does not
    tokenizer = load_tokenizer(str(tiny_llama))
    _, labels = task.labelled_chat({"messages": chat}, tokenizer, resolve_template(tokenizer, None))
    end_at = max(i for i, t in enumerate(labels) if t != -100)
    _, cut = chat_report(tiny_llama, tmp_path / "b", [chat], max_length=end_at)
    (row,) = cut.rows
    assert row.end_cut and not row.answer_cut and row.lost == 1 and not row.end_trained
    assert "0 lose part of the answer, 1 only the final <|im_end|>" in cut.cut_counts()
    assert "cuts it off every answer" in cut.end_line()


def test_a_template_that_never_writes_the_end_token_is_flagged(
    tiny_llama: Path, tmp_path: Path
) -> None:
    no_eos = "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": REPLY}]
    cfg = chat_config(tiny_llama, tmp_path, [{"messages": chat}])
    cfg.task.chat_template = no_eos
    task = get_task(cfg)
    report = task.truncation(task.load_splits().train, load_tokenizer(str(tiny_llama)))
    assert report.rows[0].trained > 0 and not report.end_trained
    assert "<|im_end|> is never trained" in report.end_line()
    assert "chat template" in report.end_line()


def test_rows_with_their_whole_answer_cut_train_nothing(tiny_llama: Path, tmp_path: Path) -> None:
    long = [{"role": "user", "content": LONG * 2}, {"role": "assistant", "content": REPLY}]
    short = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": REPLY}]
    _, report = chat_report(tiny_llama, tmp_path, [long, short])
    assert [r.trained == 0 for r in report.rows] == [True, False]
    assert len(report.zero_trained) == 1 and report.zero_trained[0].source == "train.jsonl:1"
    assert "1 train nothing" in report.cut_counts()
    assert 0 < report.trained_fraction < 1


# -- data.drop_truncated ----------------------------------------------------------------
def test_drop_truncated_drops_exactly_the_cut_rows_and_counts_them(
    tiny_llama: Path, tmp_path: Path
) -> None:
    cfg = chat_config(tiny_llama, tmp_path, chat_rows(10, cut=3), drop_truncated=True)
    task = get_task(cfg)
    splits = task.load_splits()
    before = [r["source"] for r in splits.train]
    preflight(cfg, task, splits, load_tokenizer(str(tiny_llama)))
    dropped = {"train.jsonl:1", "train.jsonl:2", "train.jsonl:3"}
    assert [r["source"] for r in splits.train] == [s for s in before if s not in dropped]
    assert splits.provenance["rows"]["train"] == [r["source"] for r in splits.train]
    cleaning = splits.provenance["cleaning"]
    assert cleaning["removed"] == {"truncated": 3} and cleaning["rows"]["train"] == 7
    (train_file,) = [f for f in cleaning["files"] if f["split"] == "train"]
    assert train_file["read"] == 10 and train_file["kept"] == 7
    assert set(train_file["removed_examples"]["truncated"]) == dropped
    # every row cut: nothing would be left, which is refused rather than dropped
    cfg = chat_config(tiny_llama, tmp_path / "all", chat_rows(4, cut=4), drop_truncated=True)
    task = get_task(cfg)
    with pytest.raises(DataError, match="would drop every training row"):
        preflight(cfg, task, task.load_splits(), load_tokenizer(str(tiny_llama)))


# -- seq2seq ----------------------------------------------------------------------------
def test_seq2seq_counts_cut_targets_and_cut_inputs(
    t5: Path, tmp_path: Path, loads: list[str]
) -> None:
    rows = [{"input": f"a {w}", "output": "a b"} for w in "abcdefg"]  # 3 tokens each, EOS too
    rows += [
        {"input": "a", "output": "a b c d e f"},  # target: 7 tokens with EOS > 4
        {"input": "a b c d e f g h", "output": "a"},  # input: 9 tokens with EOS > 6
    ]
    raw = s2s_config(t5, write_jsonl(tmp_path / "pairs.jsonl", rows), tmp_path / "out")
    raw["data"].update(max_length=6, max_target_length=4)
    cfg = Config.from_dict(raw)
    task = get_task(cfg)
    report = task.truncation(task.load_splits().train, load_tokenizer(str(t5)))
    assert [r.source for r in report.cut] == ["pairs.jsonl:8"]
    (cut,) = report.cut
    assert cut.answer_cut and cut.needed == 7 and cut.lost == 3 and cut.end_trained
    assert [r.source for r in report.rows if r.input_lost] == ["pairs.jsonl:9"]
    assert report.end_trained and report.end_token == "</s>"
    text = "\n".join(report.lines())
    assert "cut by data.max_target_length=4" in text
    assert "inputs cut by data.max_length=6: 1 rows" in text
    # 1 of 9 targets cut is above 5%: refused before the model loads; inputs alone never are
    with pytest.raises(DataError, match=r"1 of 9 train rows .* Raise data.max_target_length"):
        train(cfg, progress=False)
    raw["data"]["max_target_length"] = 8
    with pytest.raises(ModelLoaded):
        train(Config.from_dict(raw), progress=False)
    assert loads == ["seq2seq"]


# -- data audit -------------------------------------------------------------------------
def test_data_audit_shows_the_gate(
    tiny_llama: Path, t5: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    cfg = chat_config(tiny_llama, tmp_path, chat_rows(10, cut=2))
    path = write_config(tmp_path, cfg.model_dump(mode="json"))
    assert main(["data", "audit", str(path), "--samples", "1"]) == 0
    out = capsys.readouterr().out
    assert "gate (data.max_truncated_fraction=0.05): a run would be REFUSED" in out
    assert "2 of 10 train rows (20.0%) cut by data.max_length=64" in out
    assert "end-of-turn token <|im_end|> is trained" in out
    assert out.count("worst: train.jsonl:") == 2 and "tokens trained (" in out
    # with drop_truncated the verdict says what a run would do instead
    dropping = write_config(tmp_path, {**cfg.model_dump(mode="json")}, "d.yaml")
    assert main(["data", "audit", str(dropping), "data.drop_truncated=true"]) == 0
    assert "a run would drop the 2 cut rows" in capsys.readouterr().out
    # seq2seq has no per-token samples, but the gate is shown
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"input": f"a {w}", "output": w} for w in "abc"])
    s2s = write_config(tmp_path, s2s_config(t5, pairs, tmp_path / "o"), "s.yaml")
    assert main(["data", "audit", str(s2s)]) == 0
    out = capsys.readouterr().out
    assert "a run would pass" in out and "--- sample" not in out
