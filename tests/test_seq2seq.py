"""Seq2seq (AutoModelForSeq2SeqLM): loss, beam search, metrics and end-to-end runs on a tiny T5.

The T5 here is built from a config (d_model 32, two blocks per stack, no
dropout) with a word-level fast tokenizer over eight letters-as-words, so the
copy task it learns in the end-to-end run (target = source) is solved
exactly by a model that trained, and not at all by one that did not.
"""

from __future__ import annotations

import itertools
import json
import random
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from tunesmith.api import TrainResult, evaluate, load_checkpoint, predict, train
from tunesmith.config.root import Config
from tunesmith.config.tasks import GenerateConfig
from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.errors import ConfigError, DataError, ModelError
from tunesmith.methods.base import get_method
from tunesmith.models.loading import load_tokenizer
from tunesmith.tasks.base import get_task
from tunesmith.tasks.inference import evaluate_dataset
from tunesmith.tasks.seq2seq import Seq2Seq, shift_right, target_ids, text_metrics

WORDS = list("abcdefgh")
SPECIALS = {"<pad>": 0, "</s>": 1, "<unk>": 2}
EOS = 1
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
]


def word_tokenizer(*, eos: bool = True):
    """A fast word-level tokenizer over ``WORDS``; appends ``</s>`` when ``eos``."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {**SPECIALS, **{w: i + len(SPECIALS) for i, w in enumerate(WORDS)}}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    if eos:
        backend.post_processor = processors.TemplateProcessing(
            single="$A </s>", special_tokens=[("</s>", EOS)]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", eos_token="</s>", unk_token="<unk>"
    )


def build_tiny_t5(folder: Path) -> Path:
    """Save a random T5 (d_model 32, 2 + 2 blocks, dropout off) and its tokenizer."""
    from transformers import T5Config, T5ForConditionalGeneration

    folder.mkdir(parents=True, exist_ok=True)
    word_tokenizer().save_pretrained(folder)
    torch.manual_seed(0)
    config = T5Config(
        vocab_size=len(SPECIALS) + len(WORDS),
        d_model=32,
        d_ff=64,
        d_kv=16,
        num_layers=2,
        num_heads=2,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=EOS,
        decoder_start_token_id=0,
    )
    T5ForConditionalGeneration(config).save_pretrained(folder, safe_serialization=True)
    return folder


def copy_rows(n: int, seed: int = 0) -> list[dict[str, str]]:
    """``input`` is 2-5 random words, ``output`` the same words: the copy task."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5)))
        rows.append({"input": words, "output": words})
    return rows


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def s2s_config(model: Path, data: Path, out: Path, **sections: dict) -> dict:
    """Validation is the training file itself: the test is that the model fits it."""
    cfg = {
        "model": {"name_or_path": str(model)},
        "task": {"type": "seq2seq"},
        "data": {
            "train": str(data),
            "validation": str(data),
            "source_column": "input",
            "target_column": "output",
            "max_length": 16,
            "max_target_length": 16,
        },
        "optim": {"lr": 3e-3, "warmup_ratio": 0.0},
        "generate": {"max_new_tokens": 8},
        "train": {
            "epochs": 24,
            "batch_size": 8,
            "eval_steps": 30,
            "output_dir": str(out),
            "log_steps": 10,
            "early_stopping_patience": None,
            "precision": "fp32",
        },
    }
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


def bare_task(**sections: dict) -> Seq2Seq:
    """A seq2seq task from a config whose files are never read."""
    cfg = {"model": {"name_or_path": "m"}, "task": {"type": "seq2seq"}, "data": {"train": "x"}}
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    task = get_task(Config.from_dict(cfg))
    assert isinstance(task, Seq2Seq)
    return task


def records(texts: list[str], targets: list[str] | None = None) -> list[dict]:
    out = [{"text": t, "source": f"row {i}"} for i, t in enumerate(texts)]
    for r, target in zip(out, targets or [], strict=False):
        r["target"] = target
    return out


def batch_of(task: Seq2Seq, tokenizer, recs: list[dict]) -> dict[str, torch.Tensor]:
    data = FeatureDataset(task.encode(recs, tokenizer, None))
    return Collator(tokenizer.pad_token_id)([data[i] for i in range(len(data))])


@pytest.fixture(scope="module")
def t5(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_t5(tmp_path_factory.mktemp("tiny-t5"))


@pytest.fixture(scope="module")
def copy_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_jsonl(tmp_path_factory.mktemp("copy") / "copy.jsonl", copy_rows(40))


@pytest.fixture(scope="module")
def full_run(t5: Path, copy_file: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    out = tmp_path_factory.mktemp("s2s-full") / "run"
    return train(Config.from_dict(s2s_config(t5, copy_file, out)), progress=False)


@pytest.fixture(scope="module")
def lora_run(t5: Path, copy_file: Path, tmp_path_factory: pytest.TempPathFactory) -> TrainResult:
    """LoRA without generation during validation: ``loss`` must become the metric."""
    out = tmp_path_factory.mktemp("s2s-lora") / "run"
    cfg = s2s_config(
        t5,
        copy_file,
        out,
        method={"name": "lora", "r": 4},
        optim={"lr": 1e-2},
        generate={"in_eval": False},
        train={"epochs": 3, "eval_steps": None},
    )
    return train(Config.from_dict(cfg), progress=False)


def metrics_records(run: TrainResult, split: str) -> list[dict]:
    lines = (run.output_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["split"] == split and "loss" in r]


# -- loss ---------------------------------------------------------------------------
def test_label_smoothing_loss_matches_the_closed_form():
    """Smoothed CE = (1 - eps) * NLL(label) + eps * mean over classes of NLL(class)."""
    torch.manual_seed(0)
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[4, 0, -100], [2, -100, -100]])
    outputs, batch = SimpleNamespace(logits=logits), {"labels": labels}
    logp = logits.log_softmax(-1)
    positions = [(0, 0), (0, 1), (1, 0)]
    nll = sum(-logp[b, t, labels[b, t]] for b, t in positions)
    uniform = sum(-logp[b, t].mean() for b, t in positions)
    eps = 0.2
    smoothed = bare_task(task={"label_smoothing": eps}).loss_sum(outputs, batch)
    plain = bare_task().loss_sum(outputs, batch)
    assert float(plain) == pytest.approx(float(nll), rel=1e-6)
    assert float(smoothed) == pytest.approx(float((1 - eps) * nll + eps * uniform), rel=1e-6)
    assert float(smoothed) != pytest.approx(float(plain), rel=1e-3)


def test_decoder_inputs_are_the_labels_shifted_behind_the_start_token():
    labels = torch.tensor([[5, 6, 1], [7, 1, -100]])
    assert shift_right(labels, start=0, pad=0).tolist() == [[0, 5, 6], [0, 7, 1]]
    assert shift_right(labels, start=2, pad=1).tolist() == [[2, 5, 6], [2, 7, 1]]
    task = bare_task()
    task.decoder_ids = (0, 0)
    inputs = task.model_inputs({"input_ids": labels.clamp(min=0), "labels": labels})
    assert inputs["decoder_input_ids"].tolist() == [[0, 5, 6], [0, 7, 1]]
    assert "labels" not in inputs
    unlabelled = task.model_inputs({"input_ids": labels.clamp(min=0)})
    assert unlabelled["decoder_input_ids"].tolist() == [[0], [0]]


# -- data ---------------------------------------------------------------------------
def test_targets_end_in_eos_even_when_cut_or_the_tokenizer_adds_none():
    with_eos, without = word_tokenizer(), word_tokenizer(eos=False)
    a, b, c = (len(SPECIALS) + WORDS.index(w) for w in "abc")
    assert target_ids(with_eos, ["a b c"], 16) == [[a, b, c, EOS]]
    assert target_ids(without, ["a b c"], 16) == [[a, b, c, EOS]]
    assert target_ids(with_eos, ["a b c"], 3) == [[a, b, EOS]]
    assert target_ids(without, ["a b c"], 3) == [[a, b, EOS]]


def test_encode_cuts_source_and_target_at_their_own_limits(t5: Path):
    task = bare_task(data={"max_length": 3, "max_target_length": 4})
    tokenizer = load_tokenizer(str(t5))
    feats = task.encode(records(["a b c d e", "a"], ["a b c d e", "b"]), tokenizer, {})
    assert [len(f["input_ids"]) for f in feats] == [3, 2]
    assert [f["labels"][-1] for f in feats] == [EOS, EOS]
    assert [len(f["labels"]) for f in feats] == [4, 2]
    assert task.tokenizer is tokenizer
    assert "labels" not in task.encode(records(["a b"]), tokenizer, None)[0]


def test_source_and_target_columns_are_read_and_checked(tmp_path: Path):
    rows = [
        {"input": "a b", "output": "b a"},
        {"input": "c", "output": " "},  # empty target: dropped and noted
        {"input": "d", "output": "d"},
    ]
    path = write_jsonl(tmp_path / "d.jsonl", rows)
    task = bare_task(data={"train": str(path), "source_column": "input", "target_column": "output"})
    got = task.load_records(str(path), dropped=[])
    assert [(r["text"], r["target"]) for r in got] == [("a b", "b a"), ("d", "d")]
    assert "target" not in task.load_records(str(path), labelled=False)[0]
    notes: list[str] = []
    task.read_dropping_empty(str(path), notes, "with an empty source or target")
    assert "d.jsonl: dropped 1 rows with an empty source or target" in notes[0]
    wrong = bare_task(data={"train": str(path), "source_column": "question"})
    with pytest.raises(DataError, match=r"column 'question' not found.*set data\.source_column"):
        wrong.load_records(str(path))


def test_eval_metric_is_bleu_or_loss_when_nothing_is_generated():
    assert bare_task().cfg.eval.metric == "bleu"
    assert bare_task(generate={"in_eval": False}).cfg.eval.metric == "loss"
    with pytest.raises(ConfigError, match=r"generate\.in_eval is false; set generate\.in_eval"):
        bare_task(generate={"in_eval": False}, eval={"metric": "chrf"})


def test_text_metrics_are_sacrebleu_corpus_scores():
    perfect = text_metrics(["a b c d", "e f g h"], ["a b c d", "e f g h"])
    assert perfect == {"bleu": pytest.approx(100.0), "chrf": pytest.approx(100.0)}
    half = text_metrics(["a b c d", "h g f e"], ["a b c d", "e f g h"])
    assert 0 < half["bleu"] < 100 and 0 < half["chrf"] < 100
    assert text_metrics([], []) == {}


def test_a_decoder_only_model_is_refused(tiny_bert: Path):
    from transformers import AutoModel

    from tunesmith.tasks.seq2seq import decoder_ids

    with pytest.raises(ModelError, match="needs an encoder-decoder model"):
        decoder_ids(AutoModel.from_pretrained(tiny_bert), None, "bert")


# -- methods ------------------------------------------------------------------------
@pytest.mark.parametrize(
    "method",
    [
        {"name": "full"},
        {"name": "freeze", "train_layers": 1},
        {"name": "lora"},
        {"name": "ia3"},
        {"name": "prefix", "num_virtual_tokens": 2},
        {"name": "prompt", "num_virtual_tokens": 2},
        {"name": "bottleneck", "reduction_factor": 4},
    ],
    ids=lambda m: m["name"],
)
def test_every_method_trains_and_generates_on_t5(t5: Path, method: dict):
    task = bare_task(model={"name_or_path": str(t5)}, method=method)
    tokenizer = load_tokenizer(str(t5))
    batch = batch_of(task, tokenizer, records(["a b c", "d e"], ["a b c", "d e"]))
    batch["index"] = torch.arange(2)
    model = get_method(task.cfg).apply(task.build_model([], tokenizer))
    task.loss_sum(model(**task.model_inputs(batch)), batch).backward()
    trained = {n for n, p in model.named_parameters() if p.grad is not None}
    assert trained == {n for n, p in model.named_parameters() if p.requires_grad}
    assert task.generate_predictions(model, batch)["generated"].shape[:2] == (2, 1)
    if method["name"] == "freeze":  # the top block of each stack (and its final norm)
        tops = ("encoder.block.1.", "encoder.final", "decoder.block.1.", "decoder.final")
        assert trained and all(n.startswith(tops) for n in trained)
        assert any(n.startswith("encoder.") for n in trained)
        assert any(n.startswith("decoder.") for n in trained)
    if method["name"] in ("lora", "ia3"):  # the pretrained LM head is not an adapter's to train
        assert all("lora_" in n or "ia3_" in n for n in trained)


# -- end to end ---------------------------------------------------------------------
def test_tiny_t5_learns_to_copy(full_run: TrainResult):
    """Loss falls and BLEU rises from near zero to (almost) exact copies."""
    val = metrics_records(full_run, "validation")
    first, best = val[0], full_run.validation_metrics
    assert best["loss"] < 0.4 * first["loss"]
    assert first["bleu"] < 30 < 80 < best["bleu"]
    assert best["chrf"] > first["chrf"]
    assert set(best) >= {"loss", "bleu", "chrf"}
    train_losses = [r["loss"] for r in metrics_records(full_run, "train")]
    assert train_losses[-1] < 0.4 * train_losses[0]
    assert Config.load(full_run.output_dir / "config.yaml").eval.metric == "bleu"


def test_beam_search_returns_the_requested_beams_best_first(full_run: TrainResult):
    _cfg, task, model, tokenizer, _ = load_checkpoint(full_run.best_dir)
    gen = GenerateConfig(num_beams=4, num_return_sequences=3, max_new_tokens=6)
    task.cfg = task.cfg.model_copy(update={"generate": gen})
    sources = [r["input"] for r in copy_rows(3)]  # rows it was trained on
    batch = batch_of(task, tokenizer, records(sources))
    batch["index"] = torch.arange(3)
    generated = task.generate_predictions(model, batch)["generated"]
    assert generated.shape[:2] == (3, 3)
    for i, beams in enumerate(generated.tolist()):
        seqs = [[t for t in beam if t >= 0] for beam in beams]
        assert len({tuple(s) for s in seqs}) == 3, seqs
        scores = [beam_score(model, batch, i, s, gen.max_new_tokens) for s in seqs]
        assert all(a >= b - 1e-5 for a, b in itertools.pairwise(scores)), scores
    rows = task.format_predictions({"generated": generated}, [], [])
    assert all(isinstance(r["generated"], list) and len(r["generated"]) == 3 for r in rows)


def beam_score(model, batch: dict, i: int, tokens: list[int], max_new: int) -> float:
    """Length-normalised log-probability, as beam search ranks finished hypotheses."""
    seq = tokens + ([EOS] if len(tokens) < max_new else [])  # EOS was cut off as -100
    with torch.no_grad():
        logits = model(
            input_ids=batch["input_ids"][i : i + 1],
            attention_mask=batch["attention_mask"][i : i + 1],
            decoder_input_ids=torch.tensor([[0, *seq[:-1]]]),
        ).logits
    logp = logits[0].log_softmax(-1)[torch.arange(len(seq)), seq]
    return float(logp.sum()) / len(seq)


def test_eval_samples_generates_for_the_first_items_only(full_run: TrainResult):
    _cfg, task, model, tokenizer, _ = load_checkpoint(full_run.best_dir)
    rows = copy_rows(6, seed=1)
    recs = records([r["input"] for r in rows], [r["output"] for r in rows])
    collator = Collator(tokenizer.pad_token_id)
    everything = FeatureDataset(task.encode(recs, tokenizer, {}))
    first3 = FeatureDataset(everything.features[:3])
    some, preds = evaluate_dataset(
        model, task, everything, collator, [], 4, generate=True, generate_limit=3
    )
    assert (preds["generated"][3:] == -100).all() and (preds["reference"][3:] == -100).all()
    assert (preds["reference"][:3] != -100).any(-1).all()
    exact, _ = evaluate_dataset(model, task, first3, collator, [], 4, generate=True)
    assert some["bleu"] == pytest.approx(exact["bleu"])
    assert some["chrf"] == pytest.approx(exact["chrf"])
    no_generation, _ = evaluate_dataset(model, task, everything, collator, [], 4)
    assert set(no_generation) == {"loss"}


def test_predict_and_evaluate_round_trip(full_run: TrainResult, tmp_path: Path):
    best = full_run.best_dir
    seen = [r["input"] for r in copy_rows(6)]  # training rows
    rows = predict(best, seen)
    assert [r["text"] for r in rows] == seen
    assert all(isinstance(r["generated"], str) for r in rows)
    assert sum(r["generated"] == r["text"] for r in rows) >= 4  # it learned to copy
    beams = predict(best, seen[:2], generate={"num_beams": 3, "num_return_sequences": 2})
    assert all(isinstance(r["generated"], list) and len(r["generated"]) == 2 for r in beams)
    sources = write_jsonl(tmp_path / "in.jsonl", [{"input": "b a d"}, {"input": "e"}])
    from_file = predict(best, input_path=str(sources))  # no target column needed
    assert [r["text"] for r in from_file] == ["b a d", "e"]
    again = evaluate(best, split="validation")
    assert again["loss"] == pytest.approx(full_run.validation_metrics["loss"], rel=1e-4)
    assert again["bleu"] == pytest.approx(full_run.validation_metrics["bleu"], rel=1e-4)


def test_lora_trains_only_lora_weights_and_loss_is_the_metric(lora_run: TrainResult):
    from safetensors.torch import load_file

    saved = load_file(lora_run.best_dir / "adapter_model.safetensors")
    assert saved and all(".lora_A." in k or ".lora_B." in k for k in saved)
    trainable = lora_run.parameters[-1]["trainable"]
    assert trainable == sum(t.numel() for t in saved.values())
    val = metrics_records(lora_run, "validation")
    assert all("bleu" not in r for r in val)
    assert val[-1]["loss"] < val[0]["loss"]
    cfg = Config.load(lora_run.output_dir / "config.yaml")
    assert cfg.eval.metric == "loss"
    rows = predict(lora_run.best_dir, ["a b"])
    assert isinstance(rows[0]["generated"], str)
