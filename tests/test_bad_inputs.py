"""Bad inputs through the command line: one clear line, exit code 2, no outputs touched.

Each case is a row of docs/errors.md; inputs already covered elsewhere
(test_cli, test_config, test_data_loading) are referenced there, not repeated.
Two inputs are not errors but must be handled: a tokenizer without a pad token
and texts longer than the model's position table.
"""

from __future__ import annotations

import gzip
import json
import shutil
from pathlib import Path

import pytest

from conftest import build_tiny_bert, tiny_config, toy_rows, write_csv
from helpers import build_model, cli_fails, write_config
from tunesmith.cli import main
from tunesmith.config.root import Config
from tunesmith.errors import DataError
from tunesmith.tasks.base import get_task

HEAD = "model:\n  name_or_path: m\ndata:\n  train: t.csv\n"  # lines 1-4
ROWS = toy_rows(40)


@pytest.fixture
def base(tiny_bert: Path, tmp_path: Path) -> dict:
    """A config that trains for one epoch on 40 toy rows (each test breaks one thing)."""
    data = write_csv(tmp_path / "train.csv", ROWS)
    return tiny_config(tiny_bert, data, tmp_path / "run", train={"epochs": 1})


def rebased(checkpoint: Path, base_model: Path, dest: Path) -> Path:
    """A copy of ``checkpoint`` whose manifest names ``base_model`` as its base."""
    shutil.copytree(checkpoint, dest)
    manifest = json.loads((dest / "tunesmith.json").read_text())
    manifest["base_model"] = manifest["config"]["model"]["name_or_path"] = str(base_model)
    (dest / "tunesmith.json").write_text(json.dumps(manifest))
    return dest


def no_outputs(out: Path) -> bool:
    """A failed run leaves no run files behind (at most the empty folder)."""
    return not out.exists() or not any(out.iterdir())


# -- config -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "fragments"),
    [
        pytest.param(HEAD + "optim: [0.1\n", ("cfg.yaml:5: invalid YAML",), id="unclosed-bracket"),
        pytest.param(
            HEAD + "train:\n  output_dir: a\x07b\n",
            ("cfg.yaml:6: invalid YAML", "unacceptable character #x0007"),
            id="control-character",
        ),
        pytest.param(
            HEAD + "train:\n  output_dir: 2020-13-45\n",
            ("cfg.yaml:6: invalid YAML", "cannot read '2020-13-45' as a timestamp"),
            id="impossible-date",
        ),
        pytest.param(
            (HEAD + "train:\n  output_dir: caf\xe9\n").encode("latin-1"),
            ("cfg.yaml:6: not valid UTF-8 text (byte 0xe9)",),
            id="not-utf8",
        ),
        pytest.param(
            HEAD + "train:\n  epochs: [1]\n",
            ("cfg.yaml:6: train.epochs: Input should be a valid integer (got [1])",),
            id="wrong-type",
        ),
        pytest.param(
            HEAD + "optim: 0.1\n", ("cfg.yaml:5: optim: expected a section",), id="not-a-section"
        ),
        pytest.param(
            HEAD + "method:\n  name: lora\n  r: 0\n",
            ("cfg.yaml:7: method.r: Input should be greater than or equal to 1 (got 0)",),
            id="lora-r-0",
        ),
        pytest.param(
            HEAD + "train:\n  early_stopping_patience: -1\n",
            ("cfg.yaml:6: train.early_stopping_patience: Input should be greater than or equal",),
            id="negative-patience",
        ),
    ],
)
def test_config_errors(capsys, tmp_path: Path, text: str | bytes, fragments: tuple[str, ...]):
    path = tmp_path / "cfg.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    cli_fails(capsys, ["config", "validate", str(path)], *fragments)


# -- data files ---------------------------------------------------------------


def jsonl(rows: list[dict]) -> bytes:
    return "".join(json.dumps(r) + "\n" for r in rows).encode("utf-8")


def csv_bytes(rows: list[dict]) -> bytes:
    return ("text,label\n" + "".join(f"{r['text']},{r['label']}\n" for r in rows)).encode()


MIXED = [{**r, "label": 1} if i in (1, 7) else r for i, r in enumerate(ROWS)]


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        pytest.param(
            "binary.csv",
            b"\x89PNG\r\n\x1a\n" + bytes(range(256)),
            ("binary.csv:1: not valid UTF-8 text (byte 0x89",),
            id="binary-garbage",
        ),
        pytest.param(
            "utf16.csv",
            csv_bytes(ROWS).decode().encode("utf-16"),
            ("utf16.csv:1", "UTF-16"),
            id="utf16",
        ),
        pytest.param(
            "nul.csv", csv_bytes(ROWS[:3]) + b"ba\x00d,neg\n", ("nul.csv:5: NUL byte",), id="nul"
        ),
        pytest.param(
            "cut.jsonl",
            jsonl(ROWS) + b'{"text": "the film was',
            ("cut.jsonl:41: invalid JSON (Unterminated string starting at column 10)",),
            id="truncated-jsonl",
        ),
        pytest.param(
            "train.csv.gz",
            gzip.compress(csv_bytes(ROWS))[:40],
            ("train.csv.gz: cannot decompress .gz data",),
            id="truncated-gzip",
        ),
        pytest.param(
            "mixed.jsonl",
            jsonl(MIXED),
            ("mixed.jsonl:2: label 1 is a number", "column 'label' also holds text", "data.labels"),
            id="mixed-label-types-jsonl",
        ),
        pytest.param(
            "mixed.csv",
            csv_bytes(MIXED),
            ("mixed.csv:3: label '1' is a number", "data.labels"),
            id="mixed-label-types-csv",
        ),
    ],
)
def test_data_file_errors(capsys, tmp_path, base, name: str, content: bytes, fragments):
    (tmp_path / name).write_bytes(content)
    base["data"]["train"] = str(tmp_path / name)
    cli_fails(capsys, ["train", str(write_config(tmp_path, base))], *fragments)
    assert no_outputs(Path(base["train"]["output_dir"]))


def test_mixed_label_types_are_accepted_when_listed(tmp_path, base):
    path = tmp_path / "mixed.jsonl"
    path.write_bytes(jsonl(MIXED))
    base["data"].update(train=str(path), labels=["neg", "pos", 1])
    splits = get_task(Config.from_dict(base)).load_splits()
    assert splits.labels == ["neg", "pos", "1"]
    base["data"]["labels"] = None
    with pytest.raises(DataError, match="label 1 is a number"):
        get_task(Config.from_dict(base)).load_splits()


def test_test_file_label_unseen_in_training(capsys, tmp_path, base):
    test = write_csv(tmp_path / "test.csv", [ROWS[0], {"text": "a dull film", "label": "meh"}])
    base["data"]["test"] = str(test)
    args = ["train", str(write_config(tmp_path, base))]
    cli_fails(capsys, args, "test.csv:3: label 'meh' in test never appears in training")
    assert no_outputs(Path(base["train"]["output_dir"]))


def test_eval_on_labels_unseen_in_training(capsys, tmp_path, tiny_runs):
    dev = write_csv(tmp_path / "dev.csv", [ROWS[0], {"text": "a dull film", "label": "meh"}])
    args = ["eval", str(tiny_runs["full"]), "--data", str(dev)]
    cli_fails(capsys, args, "dev.csv:3: label 'meh' in evaluation never appears in training")


def test_failed_predict_keeps_the_previous_output(capsys, tmp_path, tiny_runs):
    target = tmp_path / "preds.jsonl"
    target.write_text("previous\n")
    (tmp_path / "in.jsonl").write_text('{"text": "fine"}\n{"text": \n')
    args = ["predict", str(tiny_runs["full"]), "--input", str(tmp_path / "in.jsonl")]
    cli_fails(capsys, [*args, "--output", str(target)], "in.jsonl:2: invalid JSON")
    assert target.read_text() == "previous\n"


# -- model folders ------------------------------------------------------------


def broken_model(tiny_bert: Path, folder: Path, kind: str) -> Path:
    """A copy of the tiny BERT broken in one way."""
    shutil.copytree(tiny_bert, folder)
    config = json.loads((folder / "config.json").read_text())
    if kind == "no-tokenizer":
        for f in folder.glob("tokenizer*"):
            f.unlink()
    elif kind == "corrupt-weights":
        (folder / "model.safetensors").write_bytes(b"\x00" * 64)
    elif kind == "shapes-differ":
        config["hidden_size"] = 64
    elif kind == "unknown-architecture":
        config["model_type"] = "no_such_arch"
    (folder / "config.json").write_text(json.dumps(config))
    return folder


@pytest.mark.parametrize(
    ("kind", "fragment"),
    [
        ("no-tokenizer", "no tokenizer files"),
        ("corrupt-weights", "cannot load model"),
        ("shapes-differ", "the weights do not fit the model its config.json describes"),
        ("unknown-architecture", "cannot load model"),
    ],
    ids=["no-tokenizer", "corrupt-weights", "shapes-differ", "unknown-architecture"],
)
def test_model_folder_errors(capsys, tmp_path, base, tiny_bert, kind: str, fragment: str):
    base["model"]["name_or_path"] = str(broken_model(tiny_bert, tmp_path / kind, kind))
    cli_fails(capsys, ["train", str(write_config(tmp_path, base))], kind, fragment)
    assert no_outputs(Path(base["train"]["output_dir"]))


@pytest.mark.parametrize(
    ("name", "fragment"),
    [("gone", "model not found: "), ("train.csv", "model path is a file, not a model folder: ")],
    ids=["missing", "a-file"],
)
def test_model_path_missing_or_a_file(capsys, tmp_path, base, name: str, fragment: str):
    base["model"]["name_or_path"] = str(tmp_path / name)
    cli_fails(capsys, ["train", str(write_config(tmp_path, base))], fragment + str(tmp_path / name))


# -- handled, not refused -----------------------------------------------------


def save_decoder_without_pad(folder: Path, kind: str, specials: bool = True) -> Path:
    """A tiny GPT-2/Llama base whose tokenizer (and config) has no pad token.

    Without ``specials`` the tokenizer has no eos or unk token either.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoModel, PreTrainedTokenizerFast

    from conftest import FILLER, NEGATIVE, POSITIVE

    words = ["<unk>", "<s>", "</s>", *sorted(set(POSITIVE + NEGATIVE + FILLER))]
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    named = {"unk_token": "<unk>", "bos_token": "<s>", "eos_token": "</s>"} if specials else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **named)
    assert tokenizer.pad_token is None
    tokenizer.save_pretrained(folder)
    config = build_model(kind).config
    config.pad_token_id, config.bos_token_id, config.eos_token_id = None, 1, 2
    AutoModel.from_config(config).save_pretrained(folder)
    return folder


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_tokenizer_without_pad_token_trains_and_predicts(capsys, tmp_path, base, kind: str):
    base["model"]["name_or_path"] = str(save_decoder_without_pad(tmp_path / kind, kind))
    assert main(["train", str(write_config(tmp_path, base)), "--no-progress"]) == 0
    best = Path(base["train"]["output_dir"]) / "best"
    saved = json.loads((best / "tokenizer_config.json").read_text())
    assert saved["pad_token"] == "</s>"
    capsys.readouterr()
    texts = ["a fun film", "the plot was really very dull and weak"]  # padding needed
    assert main(["predict", str(best), *(f"--text={t}" for t in texts)]) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["text"] for r in rows] == texts


def test_tokenizer_without_any_token_to_pad_with(capsys, tmp_path, base):
    folder = save_decoder_without_pad(tmp_path / "bare", "gpt2", specials=False)
    base["model"]["name_or_path"] = str(folder)
    args = ["train", str(write_config(tmp_path, base))]
    cli_fails(capsys, args, "bare: tokenizer has no pad, eos or unk token to pad with")


def test_texts_longer_than_the_model_are_truncated_with_a_warning(capsys, tmp_path, base):
    long_rows = [
        {**r, "text": " ".join([r["text"]] * 30)} if i < 5 else r for i, r in enumerate(ROWS)
    ]
    base["data"]["train"] = str(write_csv(tmp_path / "long.csv", long_rows))
    base["data"]["validation"] = str(write_csv(tmp_path / "dev.csv", toy_rows(8, seed=3)))
    base["data"]["max_length"] = 512  # the tiny BERT has 64 positions
    assert main(["train", str(write_config(tmp_path, base)), "--no-progress"]) == 0
    err = capsys.readouterr().err
    assert (
        "5 of 40 rows are longer than the model's 64 positions (data.max_length is 512) "
        "and were truncated to 64 tokens"
    ) in err


# -- checkpoints and their base model -----------------------------------------


def other_base(tiny_bert: Path, folder: Path, kind: str) -> Path:
    """A base model unlike the tiny BERT: one layer more, or another architecture."""
    if kind == "deeper":
        return build_tiny_bert(folder, num_layers=3)
    from transformers import AutoModel

    AutoModel.from_config(build_model("distilbert").config).save_pretrained(folder)
    for f in tiny_bert.glob("tokenizer*"):
        shutil.copy(f, folder / f.name)
    return folder


@pytest.mark.parametrize("command", ["eval", "predict"])
@pytest.mark.parametrize("method", ["lora", "bottleneck"])
def test_adapter_checkpoint_whose_base_is_gone(capsys, tmp_path, tiny_runs, method, command):
    ckpt = rebased(tiny_runs[method], tmp_path / "gone", tmp_path / "ckpt")
    extra = ["--data", str(write_csv(tmp_path / "d.csv", ROWS))] if command == "eval" else []
    args = [command, str(ckpt), *extra, *(["--text", "fine"] if command == "predict" else [])]
    cli_fails(capsys, args, "ckpt: an adapter checkpoint needs the base model", "gone")


@pytest.mark.parametrize(
    ("kind", "change"),
    [("deeper", "num_hidden_layers 2 -> 3"), ("distilbert", "model_type bert -> distilbert")],
    ids=["deeper", "distilbert"],
)
def test_adapter_checkpoint_on_another_base(capsys, tmp_path, tiny_runs, tiny_bert, kind, change):
    other = other_base(tiny_bert, tmp_path / kind, kind)
    for method in ("lora", "bottleneck"):
        ckpt = rebased(tiny_runs[method], other, tmp_path / method)
        message = f"{method}: trained on a different base model than {other} holds now"
        cli_fails(capsys, ["predict", str(ckpt), "--text", "fine"], message, change)
    library = ["--library", str(tmp_path / "lib")]
    cli_fails(capsys, ["adapters", "add", "a", str(tmp_path / "lora"), *library], change)
    assert not (tmp_path / "lib").exists()


def test_library_refuses_an_adapter_of_another_base(capsys, tmp_path, tiny_runs, tiny_bert):
    copy = shutil.copytree(tiny_bert, tmp_path / "copy-of-base")
    library = ["--library", str(tmp_path / "lib")]
    assert main(["adapters", "add", "first", str(tiny_runs["lora"]), *library]) == 0
    other = rebased(tiny_runs["lora"], copy, tmp_path / "other")
    args = ["adapters", "add", "second", str(other), *library]
    cli_fails(capsys, args, f"base model {copy} differs from the library's ({tiny_bert})")
    assert sorted(p.name for p in (tmp_path / "lib").iterdir()) == ["first"]
    # The same base path, but the library's adapter was trained on an older model there.
    manifest_path = tmp_path / "lib" / "first" / "tunesmith.json"
    manifest = json.loads(manifest_path.read_text())
    manifest["base_signature"]["num_hidden_layers"] = 1
    manifest_path.write_text(json.dumps(manifest))
    args = ["adapters", "add", "second", str(tiny_runs["lora"]), *library]
    cli_fails(capsys, args, "trained on another version of", "(differs in: num_hidden_layers)")
