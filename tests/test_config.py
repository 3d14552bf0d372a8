"""Tests for tunesmith.config: loading, overrides, round trips and errors that say where.

One problem is one line; several are all reported at once, a line each.
"""

from __future__ import annotations

import os
import re
import textwrap
import typing
from pathlib import Path

import pytest

from tunesmith.config.root import (
    Config,
    DataConfig,
    OptimConfig,
    apply_overrides,
    field_docs,
)
from tunesmith.errors import ConfigError

MINIMAL = """\
model:
  name_or_path: org/some-model
data:
  train: train.csv
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text), encoding="utf-8")
    return path


def load_error(path: Path, overrides: tuple[str, ...] = ()) -> str:
    with pytest.raises(ConfigError) as info:
        Config.load(path, overrides)
    message = str(info.value)
    assert "\n" not in message, "one problem is one line for the CLI"
    return message


def load_errors(path: Path, overrides: tuple[str, ...] = ()) -> list[str]:
    """The problems of a file with several: after the count line, one line each."""
    with pytest.raises(ConfigError) as info:
        Config.load(path, overrides)
    first, *rest = str(info.value).splitlines()
    assert first == f"{path}: {len(rest)} problems"
    assert all(line.startswith("  ") for line in rest)
    return [line.removeprefix("  ") for line in rest]


def test_minimal_config_fills_defaults(tmp_path: Path) -> None:
    cfg = Config.load(write(tmp_path, MINIMAL))
    assert cfg.model.name_or_path == "org/some-model"  # hub-like id: untouched
    assert cfg.data.train == "train.csv"  # does not exist next to the config: untouched
    assert cfg.task.type == "sequence_classification"
    assert cfg.method.name == "full"
    assert cfg.optim.lr == 5e-5
    assert cfg.optim.betas == (0.9, 0.999)
    assert cfg.train.batch_size == 16
    assert cfg.train.effective_eval_batch_size == 32
    assert cfg.train.output_dir == "runs/my-run"
    assert cfg.eval.metric == "accuracy"
    assert cfg.model.trust_remote_code is False
    assert cfg.model.allow_unsafe_weights is False


def test_overrides_parse_yaml_values(tmp_path: Path) -> None:
    overrides = (
        "optim.lr=3e-5",
        "train.overwrite=true",
        "optim.max_grad_norm=null",
        "data.labels=[neg, pos]",
        "optim.betas=[0.8, 0.99]",
        "train.epochs=5",
        "data.validation_fraction=.2",
    )
    cfg = Config.load(write(tmp_path, MINIMAL), overrides)
    assert cfg.optim.lr == pytest.approx(3e-5)
    assert isinstance(cfg.optim.lr, float)
    assert cfg.train.overwrite is True
    assert cfg.optim.max_grad_norm is None
    assert cfg.data.labels == ["neg", "pos"]
    assert cfg.optim.betas == (0.8, 0.99)
    assert cfg.train.epochs == 5
    assert cfg.data.validation_fraction == pytest.approx(0.2)


def test_apply_overrides_is_pure_and_converts_exponent_floats() -> None:
    original = {"optim": {"lr": 1.0}}
    result = apply_overrides(original, ["optim.lr=3e-5", "train.seed=7", "eval.metric='1e3'"])
    assert original == {"optim": {"lr": 1.0}}
    assert result["optim"]["lr"] == pytest.approx(3e-5)
    assert isinstance(result["optim"]["lr"], float)
    assert result["train"] == {"seed": 7}
    assert result["eval"]["metric"] == "1e3"  # quoted: stays text


def test_exponent_float_in_file_is_accepted(tmp_path: Path) -> None:
    cfg = Config.load(write(tmp_path, MINIMAL + "optim:\n  lr: 3e-5\n"))
    assert cfg.optim.lr == pytest.approx(3e-5)


def test_empty_section_means_defaults(tmp_path: Path) -> None:
    cfg = Config.load(write(tmp_path, MINIMAL + "optim:\ntrain:\n"))
    assert cfg.optim == OptimConfig()


def test_round_trip_resolved_config(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.csv").write_text("text,label\na,b\n")
    path = write(
        tmp_path,
        """\
        model:
          name_or_path: org/some-model
        data:
          train: data/train.csv
          labels: [0, 1]
        optim:
          lr: 2e-5
          betas: [0.85, 0.99]
        train:
          precision: bf16
          max_steps: 100
        eval:
          metric: eval_loss
        """,
    )
    original = Config.load(path, ["train.seed=3", "optim.warmup_steps=10"])
    saved = original.save(tmp_path / "out" / "resolved.yaml")
    reloaded = Config.load(saved)
    assert reloaded == original
    assert reloaded.to_yaml() == original.to_yaml()
    assert reloaded.data.labels == ["0", "1"]
    assert "validation_fraction: 0.1" in saved.read_text()  # defaults are written out


def test_relative_data_path_resolved_against_config_folder(tmp_path: Path) -> None:
    config_dir = tmp_path / "configs"
    (config_dir / "data").mkdir(parents=True)
    (config_dir / "data" / "train.csv").write_text("text,label\n")
    (config_dir / "model").mkdir()
    path = write(
        config_dir,
        """\
        model:
          name_or_path: model
        data:
          train: data/train.csv
          validation: data/missing.csv
        """,
    )
    cfg = Config.load(path)
    assert Path(cfg.data.train) == (config_dir / "data" / "train.csv").resolve()
    assert Path(cfg.model.name_or_path).is_absolute()
    assert cfg.data.validation == "data/missing.csv"  # absent there: left as written
    assert cfg.train.output_dir == "runs/my-run"  # output_dir is never rebased


def test_absolute_and_override_paths_untouched(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("x")
    absolute = os.path.abspath(tmp_path / "elsewhere.csv")
    cfg = Config.load(write(tmp_path, MINIMAL), [f"data.validation={absolute}"])
    assert cfg.data.validation == absolute
    cfg = Config.load(write(tmp_path, MINIMAL), ["data.train=train.csv"])
    assert cfg.data.train == "train.csv"  # overrides stay relative to the cwd


def test_unknown_key_in_section_names_line_and_suggestion(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "optim:\n  weight_decay: 0.0\n  lrr: 1e-4\n")
    assert load_error(path) == f"{path}:7: unknown key 'optim.lrr' (did you mean 'optim.lr'?)"


def test_unknown_top_level_key_suggests_section(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "trian:\n  epochs: 3\n")
    assert load_error(path) == f"{path}:5: unknown key 'trian' (did you mean 'train'?)"


def test_unknown_key_without_close_match_lists_allowed(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "eval:\n  zzz: 1\n")
    message = load_error(path)
    assert "unknown key 'eval.zzz'" in message
    assert "allowed: metric, greater_is_better" in message


def test_unknown_key_in_override(tmp_path: Path) -> None:
    message = load_error(write(tmp_path, MINIMAL), ("optim.lrr=1e-4",))
    assert (
        message == "override 'optim.lrr=1e-4': unknown key 'optim.lrr' (did you mean 'optim.lr'?)"
    )


def test_override_with_invalid_value(tmp_path: Path) -> None:
    message = load_error(write(tmp_path, MINIMAL), ("optim.lr=abc",))
    assert message.startswith("override 'optim.lr=abc': optim.lr: Input should be a valid number")
    assert "(got 'abc')" in message


@pytest.mark.parametrize("bad", ["optim.lr", "=3", "optim..lr=3"])
def test_malformed_override(tmp_path: Path, bad: str) -> None:
    message = load_error(write(tmp_path, MINIMAL), (bad,))
    assert message.startswith(f"override '{bad}'")
    assert "key.path=value" in message


def test_override_through_a_value(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "optim:\n  lr: 0.1\n")
    assert "'optim.lr' is a value, not a section" in load_error(path, ("optim.lr.x=1",))


@pytest.mark.parametrize(
    ("section", "line", "key"),
    [
        ("optim:\n  lr: -0.001\n", 6, "optim.lr: Input should be greater than 0 (got -0.001)"),
        ("train:\n  batch_size: 0\n", 6, "train.batch_size: Input should be greater than 0"),
        ("optim:\n  warmup_ratio: 1.5\n", 6, "optim.warmup_ratio: Input should be less than 1"),
        ("train:\n  epochs: many\n", 6, "train.epochs: Input should be a valid integer"),
        ("optim:\n  betas:\n    - 0.9\n    - x\n", 8, "optim.betas.1: Input should be a valid"),
    ],
)
def test_invalid_values_name_line_and_key(
    tmp_path: Path, section: str, line: int, key: str
) -> None:
    path = write(tmp_path, MINIMAL + section)
    assert load_error(path).startswith(f"{path}:{line}: {key}")


def test_several_errors_in_a_section_are_all_reported(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "train:\n  epochs: 0\n  batch_size: 0\n  log_steps: 0\n")
    problems = load_errors(path)
    assert [p.split(": ", 2)[:2] for p in problems] == [
        [f"{path}:6", "train.epochs"],
        [f"{path}:7", "train.batch_size"],
        [f"{path}:8", "train.log_steps"],
    ]


def test_every_problem_of_a_file_is_reported_with_its_line_and_nearest_key(
    tmp_path: Path,
) -> None:
    path = write(
        tmp_path,
        """\
        model:
          name_or_path: org/some-model
          trust_remote: true
        data:
          train: train.csv
        optim:
          lr: -1
        train:
          epohcs: 3
        """,
    )
    assert load_errors(path) == [
        f"{path}:3: unknown key 'model.trust_remote' (did you mean 'model.trust_remote_code'?)",
        f"{path}:7: optim.lr: Input should be greater than 0 (got -1)",
        f"{path}:9: unknown key 'train.epohcs' (did you mean 'train.epochs'?)",
    ]
    # Overrides come after the file's lines, in the order given.
    problems = load_errors(path, ("train.seed=x", "optim.lr=1e-5"))
    assert [p.split(": ", 1)[0] for p in problems] == [
        f"{path}:3",
        f"{path}:9",
        "override 'train.seed=x'",
    ]


def test_checks_across_sections_report_every_problem_at_its_key(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """\
        model:
          name_or_path: org/some-model
        task:
          type: seq2seq
        data:
          train: train.csv
          padding_free: true
          augment:
            multiplier: 1
        loss:
          type: focal
        """,
    )
    problems = load_errors(path)
    assert [p.split(": ", 2)[:2] for p in problems] == [
        [f"{path}:7", "data.padding_free"],
        [f"{path}:9", "data.augment.multiplier"],
        [f"{path}:11", "loss.type"],
    ]
    assert problems[0].endswith(
        "data.padding_free: only for task.type causal_lm (decoders "
        "whose attention mask follows position_ids); encoder tasks pool or tag per row, and "
        "data.group_by_length already leaves them ~2% padding"
    )


def test_misspelt_section_is_not_also_reported_missing(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("model:", "modle:") + "optim:\n  lr: -1\n")
    assert load_errors(path) == [
        f"{path}:1: unknown key 'modle' (did you mean 'model'?)",
        f"{path}:6: optim.lr: Input should be greater than 0 (got -1)",
    ]


def test_a_union_key_is_one_problem_naming_every_form(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "loss:\n  class_weights: inversee\n")
    assert load_error(path) == (
        f"{path}:6: loss.class_weights: Input should be 'inverse' or 'effective', a valid "
        "list or a valid dictionary (got 'inversee') (did you mean 'inverse'?)"
    )


def test_unknown_key_in_an_optional_section_suggests_the_nearest(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "method:\n  unfreeze:\n    every_step: 2\n")
    assert load_error(path) == (
        f"{path}:7: unknown key 'method.unfreeze.every_step' "
        "(did you mean 'method.unfreeze.every_steps'?)"
    )


def test_literal_choice_suggests_closest(tmp_path: Path) -> None:
    message = load_error(write(tmp_path, MINIMAL + "train:\n  precision: bf61\n"))
    assert "train.precision:" in message
    assert "(did you mean 'bf16'?)" in message


def test_fractions_must_leave_training_rows(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL.replace("train.csv", "t.csv\n  test_fraction: 0.95"))
    message = load_error(path)
    assert message.startswith(f"{path}:3: data: validation_fraction + test_fraction")


def test_malformed_yaml_names_line(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  name_or_path: m\ndata: [unclosed\n  train: x\n")
    message = load_error(path)
    assert re.match(rf"{re.escape(str(path))}:\d+: invalid YAML: ", message)
    path = write(tmp_path, "model:\n  name_or_path: m\n bad_indent: 1\n")
    assert load_error(path).startswith(f"{path}:3: invalid YAML: ")


def test_duplicate_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "optim:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    assert load_error(path) == f"{path}:7: duplicate key 'optim.lr'"


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "nope.yaml"
    assert load_error(path) == f"config file not found: {path}"


def test_top_level_must_be_mapping(tmp_path: Path) -> None:
    for text in ("- a\n- b\n", "", "just text\n"):
        message = load_error(write(tmp_path, text))
        assert "expected a mapping of sections" in message
    with pytest.raises(ConfigError, match="expected a mapping"):
        Config.from_dict([1, 2])  # type: ignore[arg-type]


def test_missing_required_key(tmp_path: Path) -> None:
    path = write(tmp_path, "model:\n  name_or_path: m\ndata:\n  text_column: t\n")
    assert load_error(path) == f"{path}: missing required key 'data.train'"
    path = write(tmp_path, "data:\n  train: t.csv\n")
    assert load_error(path) == f"{path}: missing required key 'model'"


def test_bad_task_type_and_method_suggest_closest(tmp_path: Path) -> None:
    path = write(tmp_path, MINIMAL + "task:\n  type: sequence_clasification\n")
    message = load_error(path)
    assert message.startswith(f"{path}:6: task.type: unknown task type 'sequence_clasification'")
    assert "(did you mean 'sequence_classification'?)" in message
    assert "sequence_classification" in message.split("allowed: ", 1)[1].split(", ")
    message = load_error(write(tmp_path, MINIMAL), ("method.name=ful",))
    assert message.startswith("override 'method.name=ful': method.name: unknown method 'ful'")
    assert "(did you mean 'full'?)" in message


def test_spec_registries_are_read_at_validation_time(monkeypatch: pytest.MonkeyPatch) -> None:
    from tunesmith.config.specs import METHOD_SPECS, MethodSpec

    class Mine(MethodSpec):
        name = "mine"
        keys = frozenset({"r"})

    METHOD_SPECS.names()  # load the built-in specs first
    monkeypatch.setitem(METHOD_SPECS._entries, "mine", Mine)
    cfg = Config.from_dict(
        {"model": {"name_or_path": "m"}, "data": {"train": "t"}, "method": {"name": "mine", "r": 4}}
    )
    assert (cfg.method.name, cfg.method.r) == ("mine", 4)


def test_from_dict_errors_name_the_source() -> None:
    with pytest.raises(ConfigError) as info:
        Config.from_dict({"model": {"name_or_path": "m"}, "data": {"train": "t"}, "optimm": {}})
    assert str(info.value) == "<dict>: unknown key 'optimm' (did you mean 'optim'?)"


@pytest.mark.parametrize(
    ("task", "metric", "explicit", "expected"),
    [
        ({}, "accuracy", None, True),
        ({}, "f1/pos", None, True),
        ({}, "loss", None, False),
        ({"type": "causal_lm"}, "perplexity", None, False),
        ({"problem_type": "regression"}, "rmse", None, False),
        ({"problem_type": "regression"}, "rmse/valence", None, False),
        ({"problem_type": "regression"}, "spearman", None, True),
        ({"problem_type": "multi_label"}, "micro_f1", None, True),
        ({}, "loss", True, True),
        ({}, "accuracy", False, False),
    ],
)
def test_metric_direction_is_declared_by_the_task(
    task: dict[str, str], metric: str, explicit: bool | None, expected: bool
) -> None:
    """The task says which way a metric goes; ``eval.greater_is_better`` overrides it."""
    cfg = Config.from_dict(
        {
            "model": {"name_or_path": "m"},
            "data": {"train": "t"},
            "task": task,
            "eval": {"metric": metric, "greater_is_better": explicit},
        }
    )
    assert cfg.higher_is_better() is expected


def test_names_are_not_guessed() -> None:
    """A metric named like a loss is not lower-is-better unless its task says so."""
    cfg = Config.from_dict(
        {"model": {"name_or_path": "m"}, "data": {"train": "t"}, "eval": {"metric": "my_loss_f1"}}
    )
    assert cfg.higher_is_better() is True


def test_labels_validation() -> None:
    assert DataConfig(train="t", labels=[1, 0]).labels == ["1", "0"]  # type: ignore[list-item]
    with pytest.raises(ValueError, match="distinct"):
        DataConfig(train="t", labels=["a", "a"])
    with pytest.raises(ValueError, match="must not be empty"):
        DataConfig(train="t", labels=[])


def test_field_docs_cover_every_setting() -> None:
    rows = field_docs(Config)
    keys = [key for key, _, _ in rows]
    assert len(keys) == len(set(keys))
    assert {"model.name_or_path", "optim.lr", "train.batch_size", "eval.metric"} <= set(keys)
    docs = {key: (kind, text) for key, kind, text in rows}
    assert docs["model.name_or_path"][0] == "str (required)"
    assert docs["optim.lr"][0] == "float = 5e-05"
    assert docs["train.max_steps"][0] == "int | null = null"
    assert docs["optim.scheduler"][0].startswith('"cosine" | "linear" | "constant"')
    assert all(text for _, _, text in rows), "every field needs a description"

    def leaves(section: type) -> int:  # optional sub-sections: a row of their own too
        count = 0
        for f in section.model_fields.values():
            args = typing.get_args(f.annotation)
            if hasattr(f.annotation, "model_fields"):
                count += leaves(f.annotation)
            elif len(args) == 2 and type(None) in args and hasattr(args[0], "model_fields"):
                count += 1 + leaves(args[0])
            else:
                count += 1
        return count

    assert len(rows) == leaves(Config)  # search (a dict): one row
    assert docs["data.augment.back_translation"][0] == "section | null = null"
    assert docs["data.augment.back_translation.forward"][0] == "str (required)"
    assert docs["data.clean.near_duplicate_threshold"][0] == "float = 0.9"
    assert docs["search"][0].startswith("dict[str, Distribution]")
