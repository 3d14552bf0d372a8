"""Causal-LM instruction tuning: chat reading, reply masking, training, generation."""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch

from chat_fixtures import build_tiny_llama, write_jsonl
from tunesmith.api import predict, train
from tunesmith.config.root import Config
from tunesmith.data.chat import load_chats
from tunesmith.errors import DataError, ModelError
from tunesmith.models.loading import load_tokenizer
from tunesmith.tasks.base import get_task
from tunesmith.tasks.causal_lm import left_aligned
from tunesmith.tasks.chat_template import PLAIN_TEMPLATE, reply_spans
from tunesmith.tasks.losses import IGNORE

REPLY = "I am a tiny bot."
QUESTIONS = ["What is your name?", "Where do you live?", "How old are you?", "Tell me a joke."]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def sft_config(model: Path, data_file: Path, out: Path, **sections: dict) -> Config:
    cfg = {
        "model": {"name_or_path": str(model)},
        "task": {"type": "causal_lm"},
        "data": {"train": str(data_file), "max_length": 64, "validation_fraction": 0.2},
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "weight_decay": 0.0},
        "train": {"epochs": 1, "batch_size": 8, "output_dir": str(out), "log_steps": 1},
        "generate": {"max_new_tokens": 12},
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return Config.from_dict(cfg)


def chats(n: int, seed: int = 0) -> list[dict]:
    """Varied questions (with numbers) all answered by REPLY."""
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        q = f"{rng.choice(QUESTIONS)} {rng.randint(0, 99)}"
        rows.append({"prompt": q, "response": REPLY, "id": i})
    return rows


def labelled_text(tokenizer, feature: dict) -> tuple[str, list[int]]:
    ids = [
        i for i, lab in zip(feature["input_ids"], feature["labels"], strict=True) if lab != IGNORE
    ]
    return tokenizer.decode(ids), ids


# -- masking ----------------------------------------------------------------------------
def test_labels_cover_exactly_the_assistant_replies(tiny_llama: Path, tmp_path: Path) -> None:
    messages = [
        {"role": "system", "content": "You are a helpful bot."},
        {"role": "user", "content": "What is your name?"},
        {"role": "assistant", "content": "I am a tiny bot."},
        {"role": "user", "content": "Where do you live?"},
        {"role": "assistant", "content": "I live in a test."},
    ]
    data = write_jsonl(tmp_path / "chat.jsonl", [{"messages": messages}] * 4)
    tokenizer = load_tokenizer(str(tiny_llama))
    for train_on, want in [
        ("all_assistant", ["I am a tiny bot.<|im_end|>", "I live in a test.<|im_end|>"]),
        ("last_assistant", ["I live in a test.<|im_end|>"]),
    ]:
        cfg = sft_config(
            tiny_llama, data, tmp_path / "o", task={"train_on": train_on}, data={"max_length": 128}
        )
        task = get_task(cfg)
        (feature,) = task.encode(task.load_records(str(data))[:1], tokenizer, {})
        labels, ids = feature["labels"], feature["input_ids"]
        # every label is the input id or -100 ...
        assert all(lab in (tok, IGNORE) for lab, tok in zip(labels, ids, strict=True))
        # ... and the labelled tokens, run by run, are exactly the replies with their EOS
        runs, current = [], []
        for lab, tok in zip(labels, ids, strict=True):
            if lab == IGNORE and current:
                runs.append(tokenizer.decode(current))
                current = []
            elif lab != IGNORE:
                current.append(tok)
        runs += [tokenizer.decode(current)] if current else []
        assert runs == want
        # system, user and template tokens are all masked
        masked = tokenizer.decode([t for t, lab in zip(ids, labels, strict=True) if lab == IGNORE])
        assert "What is your name?" in masked and "You are a helpful bot." in masked
        assert "<|im_start|>assistant" in masked and "tiny bot" not in masked.split("live")[0][-40:]


def test_plain_template_and_missing_template(tmp_path: Path) -> None:
    bare = build_tiny_llama(tmp_path / "bare", chat_template=None)
    tokenizer = load_tokenizer(str(bare))
    messages = [{"role": "user", "content": "hello"}, {"role": "assistant", "content": "world"}]
    text, spans = reply_spans(tokenizer, messages, PLAIN_TEMPLATE)
    assert text == "user: hello\nassistant: world<|im_end|>\n"
    assert [text[s:e] for s, e in spans] == ["world<|im_end|>"]
    # Distinct chats: exact repeats would be dropped as duplicates (data.clean).
    chats_ = [[{**messages[0], "content": f"hello {i}"}, messages[1]] for i in range(10)]
    data = write_jsonl(tmp_path / "c.jsonl", [{"messages": m} for m in chats_])
    with pytest.raises(ModelError, match=r"no chat template.*task.chat_template"):
        train(sft_config(bare, data, tmp_path / "a"), progress=False)


@pytest.mark.parametrize(
    ("gate", "match"),
    [
        (0.05, r"8 of 8 train rows \(100.0%\) cut by data.max_length=32"),  # the pre-flight gate
        (1.0, r"no reply token to train on.*data.max_length=32"),  # gate off: encode refuses
    ],
)
def test_all_replies_truncated_is_refused(
    tiny_llama: Path, tmp_path: Path, gate: float, match: str
) -> None:
    long_prompt = "hello world " * 40
    rows = [{"prompt": f"{long_prompt}{i}", "response": REPLY} for i in range(10)]  # distinct
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = sft_config(
        tiny_llama, data, tmp_path / "o", data={"max_length": 32, "max_truncated_fraction": gate}
    )
    with pytest.raises(DataError, match=match):
        train(cfg, progress=False)


# -- reading ----------------------------------------------------------------------------
def test_chat_layouts(tmp_path: Path) -> None:
    alpaca = write_jsonl(
        tmp_path / "a.jsonl",
        [
            {"instruction": "Add", "input": "1 and 2", "output": "3"},
            {"instruction": "Hi", "output": "Hello"},
        ],
    )
    recs = load_chats(alpaca, system_prompt="Be brief.")
    assert recs[0]["messages"] == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Add\n\n1 and 2"},
        {"role": "assistant", "content": "3"},
    ]
    assert recs[1]["messages"][1]["content"] == "Hi" and recs[0]["group"] == "Add\n\n1 and 2"
    pairs = write_jsonl(tmp_path / "p.jsonl", [{"q": "a?", "a": "b."}])
    (rec,) = load_chats(pairs, prompt_column="q", response_column="a")
    assert [m["role"] for m in rec["messages"]] == ["user", "assistant"] and rec["text"] == "a?"
    # prediction input: a trailing assistant turn is dropped, the prompt is the last user turn
    msgs = write_jsonl(
        tmp_path / "m.jsonl",
        [{"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": "y"}]}],
    )
    (pred,) = load_chats(msgs, labelled=False)
    assert pred["messages"] == [{"role": "user", "content": "x"}]


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([{"role": "bot", "content": "x"}], r"role 'bot'; use one of system, user, assistant"),
        ([{"role": "user", "content": "x"}, {"role": "user", "content": "y"}], "two user messages"),
        ([{"role": "user", "content": "x"}], "must end with an assistant message"),
        ([{"role": "assistant", "content": "x"}], "must start with a user message"),
        ("hello", "must be a list of messages"),
    ],
)
def test_bad_chats_name_the_row(tmp_path: Path, messages, match: str) -> None:
    data = write_jsonl(tmp_path / "bad.jsonl", [{"messages": messages}])
    with pytest.raises(DataError, match=match) as err:
        load_chats(data)
    assert "bad.jsonl" in str(err.value)


def test_no_chat_columns(tmp_path: Path) -> None:
    data = write_jsonl(tmp_path / "x.jsonl", [{"question": "a", "answer": "b"}])
    with pytest.raises(DataError, match=r"no chat columns.*data.prompt_column"):
        load_chats(data)


def test_split_keeps_each_question_on_one_side(tiny_llama: Path, tmp_path: Path) -> None:
    rows = [{"prompt": f"question {i % 20}", "response": f"answer {i}"} for i in range(100)]
    data = write_jsonl(tmp_path / "c.jsonl", rows)
    cfg = sft_config(tiny_llama, data, tmp_path / "o", data={"test_fraction": 0.2})
    splits = get_task(cfg).load_splits()
    sides = [{r["group"] for r in part} for part in (splits.train, splits.validation, splits.test)]
    assert sides[0] and sides[1] and sides[2]
    assert not (sides[0] & sides[1] or sides[0] & sides[2] or sides[1] & sides[2])
    assert len(splits.validation) == 20 and len(splits.test) == 20


def test_left_aligned_moves_padding_left() -> None:
    class Tok:
        pad_token_id = 0

    ids = torch.tensor([[5, 6, 7], [8, 9, 0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    out = left_aligned(ids, mask, Tok())
    assert out["input_ids"].tolist() == [[5, 6, 7], [0, 8, 9]]
    assert out["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]


# -- training -----------------------------------------------------------------------------
@pytest.mark.usefixtures("one_thread")
def test_tiny_llama_learns_a_fixed_reply(tiny_llama: Path, tmp_path: Path) -> None:
    """The masked loss trains: the reply is learned, and generated for an unseen question."""
    data = write_jsonl(tmp_path / "c.jsonl", chats(96))
    cfg = sft_config(tiny_llama, data, tmp_path / "run", train={"epochs": 6, "eval_at_start": True})
    result = train(cfg, progress=False)
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    val = [x for x in lines if x.get("split") == "validation"]
    assert val[0]["step"] == 0 and val[0]["perplexity"] > 50  # the untrained baseline
    assert val[-1]["perplexity"] < 1.5 and val[-1]["loss"] < 0.4
    rows = predict(result.best_dir, ["Tell me a joke. 123", "Where do you live? 7"])
    assert [r["generated"] for r in rows] == [REPLY, REPLY]
    assert rows[0]["text"] == "Tell me a joke. 123"


@pytest.mark.usefixtures("one_thread")
def test_lora_trains_only_adapters_and_beams_return_several(
    tiny_llama: Path, tmp_path: Path
) -> None:
    data = write_jsonl(tmp_path / "c.jsonl", chats(48))
    cfg = sft_config(
        tiny_llama,
        data,
        tmp_path / "lora",
        method={"name": "lora", "r": 4, "target_modules": ["q_proj", "v_proj"]},
        train={"epochs": 2},
        generate={"num_beams": 3, "num_return_sequences": 3, "max_new_tokens": 4},
    )
    result = train(cfg, progress=False)
    saved = {p.name for p in result.best_dir.iterdir()}
    assert "adapter_model.safetensors" in saved and "model.safetensors" not in saved
    from safetensors.torch import load_file

    names = load_file(str(result.best_dir / "adapter_model.safetensors")).keys()
    assert names and all("lora_" in n for n in names)  # the tied LM head is not saved/trained
    (row,) = predict(result.best_dir, ["What is your name? 5"])
    assert len(row["generated"]) == 3 and all(isinstance(t, str) for t in row["generated"])


@pytest.mark.usefixtures("one_thread")
def test_prompt_tuning_scores_the_text_not_the_virtual_tokens(
    tiny_llama: Path, tmp_path: Path
) -> None:
    """Prompt tuning returns logits for its virtual tokens too; the loss reads the text's.

    It used to fail at the first step (logits of 16 + L positions against L labels).
    """
    data = write_jsonl(tmp_path / "c.jsonl", chats(30))
    cfg = sft_config(
        tiny_llama,
        data,
        tmp_path / "prompt",
        method={"name": "prompt", "num_virtual_tokens": 4},
        train={"max_steps": 3, "eval_at_start": True},
    )
    train(cfg, progress=False)
    metrics = (tmp_path / "prompt" / "metrics.jsonl").read_text().splitlines()
    lines = [json.loads(x) for x in metrics]
    val = [x for x in lines if x.get("split") == "validation"]
    assert val and all(math.isfinite(x["loss"]) and x["perplexity"] > 1 for x in val)


# -- command line -----------------------------------------------------------------------
def test_data_audit_marks_replies(tiny_llama: Path, tmp_path: Path, capsys) -> None:
    from helpers import write_config
    from tunesmith.cli import main

    data = write_jsonl(tmp_path / "c.jsonl", chats(20))
    cfg = sft_config(tiny_llama, data, tmp_path / "o").model_dump(mode="json")
    path = write_config(tmp_path, cfg)
    assert main(["data", "audit", str(path), "--samples", "2"]) == 0
    out = capsys.readouterr().out
    assert out.count("--- sample") == 2
    assert out.count(f"[[{REPLY}<|im_end|>]]") == 2  # exactly the reply is marked, per sample
    assert "What is your name?" in out or "Where do you live?" in out or "Tell me" in out
    assert "examples with nothing to train: 0" in out
    # classification has no per-token targets: a clear refusal
    from conftest import toy_rows, write_csv

    rows = write_csv(tmp_path / "toy.csv", toy_rows(20))
    cfg2 = dict(cfg, task={"type": "sequence_classification"}, data={"train": str(rows)})
    assert main(["data", "audit", str(write_config(tmp_path, cfg2, "c2.yaml"))]) == 2
    assert "applies to causal_lm" in capsys.readouterr().err


def test_chatterbot_conversion_is_cached_and_atomic(tmp_path: Path, monkeypatch) -> None:
    from tunesmith.assets import prepare as asset_prep

    folder = tmp_path / "english"
    folder.mkdir()
    (folder / "ai.yml").write_text(
        "categories: [AI]\nconversations:\n- - What is AI?\n  - A field.\n"
        "- - Hi\n  - Hello\n  - How are you?\n",  # odd turn count: the last user turn is cut
        encoding="utf-8",
    )
    monkeypatch.setenv("TUNESMITH_CACHE", str(tmp_path / "cache"))
    calls = []

    def convert(src: Path, out: Path) -> None:
        calls.append(out)
        asset_prep.chatterbot_to_jsonl(src, out)

    first = asset_prep.prepared("chat", folder, convert, ".jsonl")
    again = asset_prep.prepared("chat", folder, convert, ".jsonl")
    assert first == again and len(calls) == 1
    rows = [json.loads(x) for x in first.read_text().splitlines()]
    assert rows[1]["messages"] == [
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
    ]
    assert rows[0]["category"] == "AI"

    def broken(src: Path, out: Path) -> None:
        out.write_text("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        asset_prep.prepared("other", folder, broken, ".jsonl")
    assert sorted(p.name for p in (tmp_path / "cache" / "assets").iterdir()) == [first.name]


@pytest.mark.slow
def test_real_smollm2_masks_replies_and_predicts_sensibly(tmp_path: Path) -> None:
    """The converted GGUF model: its own template is masked exactly, and it is a sane LM."""
    from tunesmith.data.batching import Collator, FeatureDataset
    from tunesmith.tasks.inference import evaluate_dataset

    cfg = Config.load(Path(__file__).parent.parent / "examples" / "sft_smollm2.yaml")
    task = get_task(cfg)
    records = task.load_splits().validation[:16]
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    features = task.encode(records, tokenizer, {})
    checked = 0
    for record, feature in zip(records, features, strict=True):
        if len(record["messages"]) != 2 or len(feature["input_ids"]) >= cfg.data.max_length:
            continue  # multi-turn or cut off: the whole last reply is not there to compare
        text, _ = labelled_text(tokenizer, feature)
        assert text == record["messages"][-1]["content"] + "<|im_end|>"
        checked += 1
    assert checked >= 8
    model = task.build_model([], tokenizer)
    collator = Collator(tokenizer.pad_token_id, tokenizer.padding_side)
    metrics, _ = evaluate_dataset(model, task, FeatureDataset(features), collator, [], 8)
    assert 1.0 < metrics["perplexity"] < 60.0  # a broken conversion scores in the thousands
