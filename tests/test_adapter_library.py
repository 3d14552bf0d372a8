"""Per-task adapters on one base: library add/list/delete and switching without reloading."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tunesmith.api import predict
from tunesmith.cli import main
from tunesmith.errors import ConfigError
from tunesmith.runs.library import AdapterLibrary

TEXTS = ["the movie was great", "a dull plot", "it was fun", "boring and weak"]


@pytest.fixture(scope="module")
def runs(tiny_bert: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Two LoRA adapters on the tiny BERT with different label sets, and a full run."""
    from serve_fixtures import CLASSIFIERS, train_classifiers

    tmp = tmp_path_factory.mktemp("adapters")
    methods = {**CLASSIFIERS, "full": ("two", {"name": "full"})}
    return train_classifiers(tiny_bert, tmp, rows=160, runs=methods)


def test_switching_adapters_gives_each_adapters_own_predictions(runs, tmp_path):
    lib = AdapterLibrary(tmp_path / "lib")
    lib.add("sentiment", runs["sentiment"])
    lib.add("three", runs["three"])
    assert lib.names() == ["sentiment", "three"]
    predictor = lib.predictor()
    base_id = id(predictor.model.get_base_model())
    for name in ("sentiment", "three", "sentiment"):  # back and forth on one base
        rows = predictor.predict(TEXTS, adapter=name)
        alone = predict(runs[name], TEXTS)
        assert [r["label"] for r in rows] == [r["label"] for r in alone]
        for a, b in zip(rows, alone, strict=True):
            assert a["adapter"] == name
            assert a["probabilities"].keys() == b["probabilities"].keys()
            for label, p in a["probabilities"].items():
                assert p == pytest.approx(b["probabilities"][label], abs=1e-5)
        assert id(predictor.model.get_base_model()) == base_id  # the base was not reloaded
    three = predictor.predict(TEXTS, adapter="three")
    assert set(three[0]["probabilities"]) == {"meh", "neg!", "pos!"}


def test_library_refuses_what_it_cannot_hold(runs, tmp_path):
    lib = AdapterLibrary(tmp_path / "lib")
    lib.add("a", runs["sentiment"])
    with pytest.raises(ConfigError, match="already exists"):
        lib.add("a", runs["three"])
    with pytest.raises(ConfigError, match="not a peft adapter"):
        lib.add("b", runs["full"])
    with pytest.raises(ConfigError, match="adapter name"):
        lib.add("../escape", runs["three"])
    with pytest.raises(ConfigError, match="no adapter 'zzz'"):
        lib.delete("zzz")
    with pytest.raises(ConfigError, match="no adapter 'zzz'"):
        lib.predictor().predict(TEXTS, adapter="zzz")
    lib.delete("a")
    assert lib.names() == []
    with pytest.raises(ConfigError, match="empty"):
        lib.predictor()


def test_adapters_cli(runs, tmp_path, capsys):
    lib = str(tmp_path / "lib")
    assert main(["adapters", "add", "sentiment", str(runs["sentiment"]), "--library", lib]) == 0
    assert main(["adapters", "add", "three", str(runs["three"]), "--library", lib]) == 0
    capsys.readouterr()
    assert main(["adapters", "list", "--library", lib]) == 0
    listing = capsys.readouterr().out
    assert "sentiment" in listing and "three" in listing and "base model:" in listing
    args = ["predict", "--library", lib, "--adapter", "sentiment", "--adapter", "three"]
    assert main([*args, "--text", "a superb film"]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["adapter"] for r in rows] == ["sentiment", "three"]
    assert main(["adapters", "delete", "three", "--library", lib]) == 0
    capsys.readouterr()
    assert main(["predict", "--library", lib, "--adapter", "three", "--text", "x"]) == 2
    assert "no adapter 'three'" in capsys.readouterr().err
