"""Augmentation: EDA edits, synonym sources, back-translation plumbing, dynamic masking, K-shot.

The edits are checked for what a user relies on: the same seed gives the
same copies, labels are kept, word tags stay aligned and every entity comes
through whole (a hypothesis property over random tagged sentences), and an
operation that fires changes the text. Dynamic masking is checked for a new
mask each epoch at the configured rate. Back-translation runs through two
tiny random T5 models: plumbing only, the text is noise by construction.
"""

from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import tiny_config, toy_rows, write_csv
from tunesmith.config.augment import AugmentConfig
from tunesmith.config.root import Config
from tunesmith.data.augment.apply import Augmenter
from tunesmith.data.augment.eda import OPS, draw_ops, edit_words
from tunesmith.data.augment.masking import MaskedFeatureDataset
from tunesmith.data.augment.synonyms import EmbeddingSynonyms, WordNetSynonyms, find_wordnet
from tunesmith.errors import ConfigError

SYNONYMS = {
    "movie": ["film", "picture"],
    "great": ["superb", "terrific"],
    "dull": ["boring", "tedious"],
    "city": ["town"],
    "visited": ["saw"],
}


class DictSynonyms:
    """A synonym source from a fixed table (the operations' logic without WordNet)."""

    def synonyms(self, word: str) -> list[str]:
        return SYNONYMS.get(word, [])


def entities(words: list[str], tags: list[str]) -> list[tuple[str, tuple[str, ...]]]:
    """(type, words) of each BIO entity, in order."""
    found: list[tuple[str, list[str]]] = []
    for word, tag in zip(words, tags, strict=True):
        if tag.startswith("B-"):
            found.append((tag[2:], [word]))
        elif tag.startswith("I-"):
            assert found and found[-1][0] == tag[2:], f"I- tag outside an entity: {tags}"
            found[-1][1].append(word)
    return [(kind, tuple(ws)) for kind, ws in found]


@st.composite
def tagged_sentences(draw):
    """Random sentences of O words and entities (B- then I- tags)."""
    words: list[str] = []
    tags: list[str] = []
    vocab = [*SYNONYMS, "the", "of", "a", "xyz", "plot"]
    for _ in range(draw(st.integers(1, 8))):
        if draw(st.booleans()):
            kind = draw(st.sampled_from(["PER", "LOC"]))
            n = draw(st.integers(1, 3))
            words += [draw(st.sampled_from(["John", "New", "York", "movie"])) for _ in range(n)]
            tags += [f"B-{kind}"] + [f"I-{kind}"] * (n - 1)
        else:
            words.append(draw(st.sampled_from(vocab)))
            tags.append("O")
    return words, tags


@settings(max_examples=150, deadline=None)
@given(
    sentence=tagged_sentences(),
    op=st.sampled_from(sorted(OPS)),
    rate=st.floats(0.05, 0.5),
    seed=st.integers(0, 10_000),
)
def test_tagged_edits_keep_tags_aligned_and_entities_whole(sentence, op, rate, seed) -> None:
    words, tags = sentence
    out, out_tags = edit_words(words, tags, [op], rate, DictSynonyms(), random.Random(seed))
    assert len(out) == len(out_tags)
    assert entities(out, out_tags) == entities(words, tags)
    assert all(t == "O" for t in out_tags if t not in tags)
    assert out  # never emptied


@pytest.mark.parametrize("op", sorted(OPS))
def test_each_operation_changes_text_and_is_seeded(op: str) -> None:
    words = ["The", "great", "movie", "was", "dull", "but", "the", "city", "scenes", "were"]
    runs = [edit_words(words, None, [op], 0.1, DictSynonyms(), random.Random(s)) for s in (1, 1)]
    assert runs[0] == runs[1]
    assert runs[0][0] != words
    other = {
        tuple(edit_words(words, None, [op], 0.1, DictSynonyms(), random.Random(s))[0])
        for s in range(20)
    }
    assert len(other) > 1  # the seed matters


def test_synonym_replacement_keeps_case_punctuation_and_stop_words() -> None:
    words = ["Great,", "the", "movie!"]
    out, _ = edit_words(words, None, ["synonym_replacement"], 0.5, DictSynonyms(), random.Random(0))
    assert out[1] == "the"
    assert out[0] in ("Superb,", "Terrific,", "Great,")
    assert out[2] in ("film!", "picture!", "movie!")
    assert out != words
    insert, _ = edit_words(words, None, ["random_insertion"], 0.3, DictSynonyms(), random.Random(0))
    assert len(insert) == 4 and set(insert) - set(words) <= {
        "superb",
        "terrific",
        "film",
        "picture",
    }


def test_draw_ops_follows_probabilities_and_always_fires() -> None:
    rng = random.Random(0)
    weights = {"random_swap": 0.5, "random_deletion": 0.1}
    draws = [draw_ops(weights, rng) for _ in range(4000)]
    assert all(draws)
    swap = sum("random_swap" in d for d in draws) / len(draws)
    delete = sum("random_deletion" in d for d in draws) / len(draws)
    # P(swap) = 0.5 + 0.5*0.9*(0.5/0.6) = 0.875; P(delete) = 0.1 + 0.45*(0.1/0.6) = 0.175
    assert swap == pytest.approx(0.875, abs=0.02)
    assert delete == pytest.approx(0.175, abs=0.02)


def test_augmenter_is_seeded_keeps_labels_and_counts_copies() -> None:
    records = [
        {"text": r["text"], "label": r["label"], "source": f"t.csv:{i}"}
        for i, r in enumerate(toy_rows(30))
    ] + [{"text": "ok", "label": "pos", "source": "t.csv:99"}]  # one word: copies collide
    cfg = AugmentConfig(
        multiplier=3,
        random_swap=0.5,
        random_deletion=0.5,
        synonym_replacement=0,
        random_insertion=0,
    )
    out, stats = Augmenter(cfg, 7, None)(records)
    again, _ = Augmenter(cfg, 7, None)(records)
    other, _ = Augmenter(cfg, 8, None)(records)
    assert out == again and out != other
    assert out[: len(records)] == records
    copies = out[len(records) :]
    assert stats.added == len(copies) and stats.added + stats.identical == 3 * len(records)
    assert stats.identical >= 3  # "ok" cannot change: every copy of it is dropped
    by_source = {r["source"]: r for r in records}
    for c in copies:
        origin = by_source[c["source"].split(" (augmented ")[0]]
        assert c["label"] == origin["label"]
        assert c["text"] != origin["text"]
    assert len({(c["source"].split(" (")[0], c["text"]) for c in copies}) == len(copies)


def test_wordnet_synonyms() -> None:
    try:
        folder = find_wordnet(None)
    except ConfigError as err:
        pytest.skip(f"no WordNet database here: {err}")
    wn = WordNetSynonyms(folder)
    assert "film" in wn.synonyms("movie")
    assert "marvelous" in wn.synonyms("wonderful")
    assert wn.synonyms("the") == []
    assert all(s.isalpha() and s != "movie" for s in wn.synonyms("movie"))


def test_missing_wordnet_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"wordnet-base.*synonyms: embeddings"):
        find_wordnet(str(tmp_path))


def test_embedding_neighbours_are_the_nearest_whole_words() -> None:
    class Tok:
        all_special_ids = (0,)

        def get_vocab(self) -> dict[str, int]:
            return {"[PAD]": 0, "good": 1, "great": 2, "awful": 3, "##ly": 4, "fine": 5}

    emb = torch.tensor([[0.0, 0.0], [1.0, 0.1], [1.0, 0.2], [-1.0, 0.0], [1.0, 0.15], [0.7, 0.7]])
    syn = EmbeddingSynonyms(Tok(), emb, neighbours=2)
    assert syn.synonyms("good") == ["great", "fine"]  # "##ly" is no whole word
    assert syn.synonyms("unknown") == []


def _features(n: int, length: int) -> list[dict]:
    return [
        {"input_ids": [2] + [10 + (i + j) % 50 for j in range(length)] + [3], "labels": i % 2}
        for i in range(n)
    ]


def test_dynamic_masking_differs_by_epoch_at_the_rate() -> None:
    feats = _features(300, 40)
    data = MaskedFeatureDataset(feats, 0.15, mask_id=4, special_ids=[0, 2, 3, 4], seed=3)
    masks = []
    for epoch in (0, 1):
        data.set_epoch(epoch)
        items = [data[i] for i in range(len(feats))]
        masks.append([tuple(j for j, t in enumerate(it["input_ids"]) if t == 4) for it in items])
        masked = sum(len(m) for m in masks[-1])
        assert masked / (300 * 40) == pytest.approx(0.15, abs=0.01)
        for it, f in zip(items, feats, strict=True):
            assert it["labels"] == f["labels"]
            assert it["input_ids"][0] == 2 and it["input_ids"][-1] == 3  # specials kept
    assert sum(a != b for a, b in zip(*masks, strict=True)) > 250
    data.set_epoch(0)
    assert tuple(j for j, t in enumerate(data[5]["input_ids"]) if t == 4) == masks[0][5]
    assert feats[5]["input_ids"].count(4) == 0  # the stored features are untouched


def test_config_refuses_what_a_task_cannot_use(tmp_path: Path) -> None:
    base = {"model": {"name_or_path": "m"}, "data": {"train": "t.csv"}}

    def load(task: str, **data: object) -> Config:
        return Config.from_dict({**base, "task": {"type": task}, "data": {**base["data"], **data}})

    with pytest.raises(ConfigError, match=r"task\.type causal_lm is not supported"):
        load("causal_lm", augment={"multiplier": 2})
    with pytest.raises(ConfigError, match=r"cannot keep word tags aligned"):
        load(
            "token_classification",
            augment={"multiplier": 2, "back_translation": {"forward": "a", "backward": "b"}},
        )
    with pytest.raises(ConfigError, match="limit_per_class: K-shot"):
        load("token_classification", limit_per_class=8)
    with pytest.raises(ConfigError, match="every operation has probability 0"):
        load(
            "sequence_classification",
            augment={
                "multiplier": 2,
                "synonym_replacement": 0,
                "random_insertion": 0,
                "random_swap": 0,
                "random_deletion": 0,
            },
        )
    assert load("causal_lm", augment={"dynamic_masking": 0.1}).data.augment.dynamic_masking


def test_limit_per_class_keeps_k_rows_per_label_nested(tmp_path: Path, tiny_bert: Path) -> None:
    from tunesmith.tasks.base import get_task

    data = write_csv(tmp_path / "t.csv", toy_rows(200))
    picked = {}
    for k in (4, 16):
        cfg = Config.from_dict(
            tiny_config(
                tiny_bert,
                data,
                tmp_path / "o",
                data={"limit_per_class": k, "validation_fraction": 0.2},
            )
        )
        splits = get_task(cfg).load_splits()
        labels = [r["label"] for r in splits.train]
        assert labels.count("pos") == k and labels.count("neg") == k
        assert splits.provenance["rows"]["train"] == [r["source"] for r in splits.train]
        assert len(splits.validation) == 40  # held out before the K-shot limit
        picked[k] = {r["source"] for r in splits.train}
    assert picked[4] <= picked[16]


def test_back_translation_plumbing_with_tiny_models(tmp_path: Path) -> None:
    from test_seq2seq import WORDS, build_tiny_t5
    from tunesmith.config.augment import BackTranslationConfig
    from tunesmith.data.augment.back_translation import BackTranslator

    fwd, bwd = build_tiny_t5(tmp_path / "fwd"), build_tiny_t5(tmp_path / "bwd")
    bt = BackTranslationConfig(
        forward=str(fwd), backward=str(bwd), probability=1.0, batch_size=3, max_length=6
    )
    translate = BackTranslator(bt)
    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 5))) for _ in range(7)]
    out = translate(texts)
    assert len(out) == len(texts) and out == translate(texts)  # batched, deterministic
    assert all(set(t.split()) <= set(WORDS) for t in out)
    records = [{"text": t, "label": str(i % 2), "source": f"f:{i}"} for i, t in enumerate(texts)]
    cfg = AugmentConfig(multiplier=2, back_translation=bt)
    aug, stats = Augmenter(cfg, 0, None, translate)(records)
    copies = aug[len(records) :]
    assert stats.by_op["back_translation"] == len(copies)
    translated = dict(zip(texts, out, strict=True))
    for c in copies:  # a copy is its origin's translation, with the origin's label
        origin = records[int(c["source"].split(":")[1].split(" ")[0])]
        assert c["text"] == translated[origin["text"]] and c["label"] == origin["label"]
    # both copies of a text translate alike (greedy): the second is dropped as identical
    assert stats.identical >= len(records)


@pytest.mark.usefixtures("one_thread")
def test_training_with_augmentation_and_masking(tmp_path: Path, tiny_bert: Path) -> None:
    from tunesmith.api import train
    from tunesmith.runs.parts import build_run_parts
    from tunesmith.tasks.base import get_task

    data = write_csv(tmp_path / "t.csv", toy_rows(60))
    raw = tiny_config(
        tiny_bert,
        data,
        tmp_path / "run",
        data={
            "validation_fraction": 0.2,
            "augment": {
                "multiplier": 2,
                "random_swap": 0.5,
                "random_deletion": 0.5,
                "synonym_replacement": 0,
                "random_insertion": 0,
                "dynamic_masking": 0.2,
            },
        },
        method={"name": "freeze", "train_layers": 1},
        train={"epochs": 2},
    )
    cfg = Config.from_dict(raw)
    task = get_task(cfg)
    parts = build_run_parts(cfg, task)
    originals = [r for r in parts.splits.train if "(augmented" not in r["source"]]
    assert len(originals) == 48 and len(parts.splits.train) > 48 * 2
    assert isinstance(parts.train_set, MaskedFeatureDataset)
    assert len(parts.train_set) == len(parts.splits.train)
    assert len(parts.val_set) == 12  # validation is never augmented
    result = train(cfg, progress=False)
    assert result.loop.cache_seconds == 0  # masked inputs: no frozen-prefix cache
    assert result.loop.steps == 2 * -(-len(parts.splits.train) // 16)
    with pytest.raises(ConfigError, match="feature_cache: memory cannot be used"):
        Config.from_dict({**raw, "train": {**raw["train"], "feature_cache": "memory"}})


def test_data_augment_previews_the_copies_train_makes(
    tmp_path: Path, tiny_bert: Path, capsys: pytest.CaptureFixture
) -> None:
    from helpers import cli_fails, write_config
    from tunesmith.cli import main

    data = write_csv(tmp_path / "t.csv", toy_rows(40))
    augment = {
        "multiplier": 2,
        "synonyms": "embeddings",
        "embedding_neighbours": 3,
        "dynamic_masking": 0.3,
    }
    cfg = tiny_config(tiny_bert, data, tmp_path / "o", data={"augment": augment})
    assert main(["data", "augment", str(write_config(tmp_path, cfg)), "--show", "2"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("augmentation: ") and "copies added to 36 training examples" in out
    assert out.count("\n  = ") == 2 and out.count("\n  + ") >= 2
    # synonyms: embeddings draws from the model's own vocabulary (the tiny BERT's words)
    assert "synonym_replacement" in out
    epochs = [line for line in out.splitlines() if line.startswith("  epoch ")]
    assert len(epochs) == 2 and epochs[0] != epochs[1] and "[MASK]" in epochs[0] + epochs[1]
    del cfg["data"]["augment"]
    cli_fails(capsys, ["data", "augment", str(write_config(tmp_path, cfg))], "augments nothing")
