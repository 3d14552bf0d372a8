"""Continued pre-training on raw text: documents, packing, per-document losses, a real run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from chat_fixtures import CORPUS, build_tiny_llama
from tunesmith.api import predict, train
from tunesmith.config.root import Config
from tunesmith.data.packing import PackedCollator, concat_blocks, pack_documents
from tunesmith.models.loading import load_tokenizer
from tunesmith.tasks.base import get_task
from tunesmith.tasks.losses import IGNORE

pytestmark = pytest.mark.usefixtures("one_thread")
#: Paragraphs of different lengths (one longer than max_length), blank-line separated.
DOCS = [" ".join(CORPUS[i % len(CORPUS)].split()[: 3 + 4 * i]) for i in range(8)] + [
    " ".join(CORPUS * 3)
]


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_llama(tmp_path_factory.mktemp("tiny-llama-cpt"))


def text_file(folder: Path, docs: list[str] = DOCS) -> Path:
    path = folder / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def cpt_config(model: Path, data: Path, out: Path, **data_keys) -> Config:
    return Config.from_dict(
        {
            "model": {"name_or_path": str(model)},
            "task": {"type": "causal_lm"},
            "data": {
                "train": str(data),
                "format": "text",
                "max_length": 48,
                "validation_fraction": 0.25,
                **data_keys,
            },
            "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "weight_decay": 0.0},
            "train": {"epochs": 3, "batch_size": 2, "output_dir": str(out), "eval_at_start": True},
            "generate": {"max_new_tokens": 6},
        }
    )


def encoded_documents(model: Path, tmp_path: Path) -> tuple[object, list[dict]]:
    task = get_task(cpt_config(model, text_file(tmp_path), tmp_path / "o"))
    tokenizer = load_tokenizer(str(model))
    records = task.load_records(str(text_file(tmp_path)))
    return tokenizer, task.encode(records, tokenizer, None)


def test_documents_are_trained_whole_with_eos_in_max_length_pieces(tiny_llama, tmp_path):
    tokenizer, features = encoded_documents(tiny_llama, tmp_path)
    eos = tokenizer.eos_token_id
    assert len(features) > len(DOCS)  # the long document is split, not cut
    assert all(len(f["input_ids"]) <= 48 and f["labels"] == f["input_ids"] for f in features)
    ends = sum(f["input_ids"][-1] == eos for f in features)
    assert ends == len(DOCS)  # each document closes with EOS, pieces in between do not
    whole = [t for f in features for t in f["input_ids"]]
    assert tokenizer.decode([t for t in whole if t != eos]).replace(" ", "") == "".join(
        DOCS
    ).replace(" ", "")


def per_token_nll(model, batch: dict) -> torch.Tensor:
    logits = model(**batch, use_cache=False).logits[0, :-1].float()  # no cache: packed mask
    return F.cross_entropy(logits, batch["labels"][0, 1:], ignore_index=IGNORE, reduction="none")


def test_packed_documents_give_each_documents_own_loss(tiny_llama, tmp_path):
    """Blocks of several documents (position_ids restarting) = every document alone, 1e-5."""
    tokenizer, features = encoded_documents(tiny_llama, tmp_path)
    torch.manual_seed(0)
    model = get_task(cpt_config(tiny_llama, text_file(tmp_path), tmp_path / "o")).build_model(
        [], tokenizer
    )
    model.eval()
    blocks = pack_documents(features, 48)
    assert len(blocks) < len(features)  # several documents share a block
    collate = PackedCollator()
    packed = collate(blocks)
    with torch.no_grad():
        nll = per_token_nll(model, {k: packed[k] for k in ("input_ids", "position_ids", "labels")})
        alone = [per_token_nll(model, collate([f])) for f in features]
    # The packed row's targets, document after document, are exactly the documents' own.
    offset, starts = 0, []
    for f in features:
        starts.append(offset)
        offset += len(f["input_ids"])
    for start, f, own in zip(starts, features, alone, strict=True):
        n = len(f["input_ids"])
        mine = nll[start : start + n - 1]
        assert packed["labels"][0, start] == IGNORE
        torch.testing.assert_close(mine.sum(), own.sum(), atol=1e-5, rtol=1e-5)
    assert int((packed["labels"] != IGNORE).sum()) == sum(len(f["input_ids"]) - 1 for f in features)


def test_concat_blocks_keep_the_token_stream(tiny_llama, tmp_path):
    _, features = encoded_documents(tiny_llama, tmp_path)
    blocks = concat_blocks(features, 20)
    assert all(len(b["input_ids"]) == 20 for b in blocks[:-1])
    stream = [t for f in features for t in f["input_ids"]]
    assert [t for b in blocks for t in b["input_ids"]] == stream


@pytest.mark.parametrize("packing", ["documents", "concat", "none"])
def test_a_pretraining_run_lowers_held_out_perplexity(tiny_llama, tmp_path, packing):
    cfg = cpt_config(tiny_llama, text_file(tmp_path), tmp_path / packing, packing=packing)
    result = train(cfg, progress=False)
    rows = [json.loads(x) for x in (tmp_path / packing / "metrics.jsonl").read_text().splitlines()]
    evals = [r["perplexity"] for r in rows if r["split"] == "validation"]
    assert rows[0]["step"] == 0 and evals[-1] < 0.3 * evals[0]  # before training, then after
    assert result.validation_metrics["perplexity"] == pytest.approx(min(evals))
    if packing == "none":  # raw text to continue: no chat template around it
        (out,) = predict(result.best_dir, texts=["hello world the"])
        assert out["text"] == "hello world the" and "<|im_start|>" not in out["generated"]


def test_audit_of_raw_text_trains_every_token_and_cuts_nothing(tiny_llama, tmp_path, capsys):
    from helpers import write_config
    from tunesmith.cli import main

    raw = cpt_config(tiny_llama, text_file(tmp_path), tmp_path / "o").model_dump(mode="json")
    assert main(["data", "audit", str(write_config(tmp_path, raw))]) == 0
    out = capsys.readouterr().out
    assert "(100.0%)" in out and "pieces of documents split at data.max_length=48" in out
    assert "cut at data.max_length" not in out
