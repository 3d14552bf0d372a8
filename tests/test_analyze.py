"""``tunesmith analyze``: per-group measurements and a suggestion that is a valid config."""

from __future__ import annotations

from pathlib import Path

import yaml

from conftest import tiny_config, toy_rows, write_csv
from tunesmith.cli import main
from tunesmith.config.root import Config
from tunesmith.inspect.analyze import Analysis, analyze, render


def test_analyze_reports_every_group_and_a_valid_suggestion(tiny_bert: Path, tmp_path: Path):
    data = write_csv(tmp_path / "toy.csv", toy_rows(200))
    base = tiny_config(tiny_bert, data, tmp_path / "run")
    result = analyze(Config.from_dict(base), batches=3, probe_steps=4)
    assert isinstance(result, Analysis)
    assert [r.group for r in result.rows] == ["embeddings", "block.0", "block.1", "head"]
    from transformers import AutoModel

    base_params = sum(p.numel() for p in AutoModel.from_pretrained(tiny_bert).parameters())
    # Every parameter is in exactly one group; the head adds the classifier (32*2+2).
    assert sum(r.parameters for r in result.rows) == base_params + 66
    for r in result.rows:
        assert r.grad_norm > 0 and r.fisher > 0
    head = next(r for r in result.rows if r.group == "head")
    assert head.probe_gain == 0.0 and head.probe_loss == result.head_only_loss
    # The suggestion merges into the user's config and validates.
    merged = {**base, **result.suggestion}
    cfg = Config.from_dict(merged)
    assert cfg.method.name in ("freeze", "full")
    text = render(result)
    assert "config fragment:" in text and yaml.safe_load(text.split("config fragment:\n")[1])


def test_analyze_command(tiny_bert: Path, tmp_path: Path, capsys):
    data = write_csv(tmp_path / "toy.csv", toy_rows(120))
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(tiny_config(tiny_bert, data, tmp_path / "run")))
    assert main(["analyze", str(path), "--batches", "2", "--probe-steps", "2"]) == 0
    out = capsys.readouterr().out
    for group in ("embeddings", "block.0", "block.1", "head"):
        assert group in out
    assert "suggestion:" in out
