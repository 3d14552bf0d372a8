"""ONNX export: parity with PyTorch on several shapes, real texts, the folder, the refusals.

Three checkpoints are exported once per module: the tiny full and LoRA
(merged) sequence classifiers of ``tiny_runs`` and a tiny NER model trained
for two steps. Parity on inputs of other batch sizes and lengths than the
export example shows that the batch and sequence axes are dynamic; real
texts tokenised by the exported folder's own tokenizer show that a server
without tunesmith predicts what ``tunesmith predict`` does.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch

from test_ner import build_ner_bert, ner_config, ner_sentences, write_conll
from tunesmith.api import predict, train
from tunesmith.config.root import Config
from tunesmith.deploy import onnx_export, onnx_runtime
from tunesmith.deploy.onnx_export import OnnxExport
from tunesmith.errors import ConfigError, ModelError

pytest.importorskip("onnxscript")
ort = pytest.importorskip("onnxruntime")

TEXTS = ["the film was superb and fun and lovely", "a dull boring story", "poor", "it was great"]
NER_TEXTS = ["alice lives in london .", "bob visited new york today !", "the city of paris ,"]
#: Files that may hold pickles (torch.save, joblib): an exported folder has none.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib")
HAS_CUDA_EP = "CUDAExecutionProvider" in ort.get_available_providers()

# Tiny models run many times faster on one thread; peft reads a renamed transformers property.
pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
]


@pytest.fixture(scope="module")
def ner_best(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``best/`` of a two-step token-classification run on a tiny NER BERT."""
    tmp = tmp_path_factory.mktemp("onnx-ner")
    model = build_ner_bert(tmp / "bert")
    data = write_conll(tmp / "train.conll", ner_sentences(24))
    cfg = ner_config(model, data, tmp / "run", train={"epochs": 1, "max_steps": 2})
    best = train(Config.from_dict(cfg), progress=False, test=False).best_dir
    assert best is not None
    return best


@pytest.fixture(scope="module")
def sources(tiny_runs: dict[str, Path], ner_best: Path) -> dict[str, Path]:
    return {"full": tiny_runs["full"], "lora": tiny_runs["lora"], "ner": ner_best}


@pytest.fixture(scope="module")
def exports(
    sources: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, OnnxExport]:
    out = tmp_path_factory.mktemp("onnx-exports")
    return {name: onnx_export.export_onnx(src, out / name) for name, src in sources.items()}


def tokenize(folder: Path, texts: list[str]) -> dict[str, torch.Tensor]:
    """What a server does: the exported folder's own tokenizer, no tunesmith."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)(texts, padding=True, return_tensors="pt")


# -- parity ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", ["full", "lora", "ner"])
def test_onnx_matches_pytorch_on_several_shapes(name, exports, sources):
    done = exports[name]
    parity = done.parity
    assert parity is not None and parity.passed, parity
    assert parity.max_abs_diff <= 1e-4 and parity.atol == 1e-4
    assert parity.provider == "CPUExecutionProvider"
    # The tiny BERT has 64 positions: the longest case is cut to them.
    shapes = [(c["batch"], c["length"]) for c in parity.cases]
    assert shapes == [(1, 7), (4, 33), (2, 64)]
    assert parity.max_abs_diff == max(c["max_abs_diff"] for c in parity.cases)
    # Again on shapes the export never saw, odd lengths and left padding included.
    model = onnx_export.load_served_model(sources[name]).model
    again = onnx_export.check_parity(
        model, done.model_file, done.input_names, shapes=[(3, 2), (1, 64), (5, 19)], seed=7
    )
    assert again.passed and again.max_abs_diff <= 1e-4, again
    left = onnx_export.check_parity(
        model, done.model_file, done.input_names, shapes=[(3, 11)], padding_side="left"
    )
    assert left.passed, left


def test_graph_axes_are_symbolic(exports):
    import onnx

    graph = onnx.load(str(exports["ner"].model_file)).graph
    dims = {
        v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
        for v in [*graph.input, *graph.output]
    }
    assert dims["input_ids"] == ["batch", "sequence"]
    assert dims["logits"] == ["batch", "sequence", len(exports["ner"].info["labels"])]


@pytest.mark.parametrize("name", ["full", "lora"])
def test_served_folder_predicts_what_tunesmith_predicts(name, exports, sources):
    done = exports[name]
    info = json.loads((done.folder / "onnx.json").read_text())
    runner = onnx_runtime.OrtRunner(onnx_runtime.ort_session(done.model_file))
    logits = torch.from_numpy(runner(**tokenize(done.folder, TEXTS)))
    served = [info["id2label"][str(i)] for i in logits.argmax(-1).tolist()]
    rows = predict(sources[name], TEXTS)
    assert served == [r["label"] for r in rows]
    expected = torch.tensor([[r["probabilities"][lab] for lab in info["labels"]] for r in rows])
    torch.testing.assert_close(logits.softmax(-1), expected, atol=1e-5, rtol=0)


def test_token_classification_argmax_matches_pytorch_on_real_texts(exports, sources):
    done = exports["ner"]
    inputs = tokenize(done.folder, NER_TEXTS)
    model = onnx_export.load_served_model(sources["ner"]).model
    expected = onnx_runtime.TorchRunner(model)(**inputs)
    got = onnx_runtime.OrtRunner(onnx_runtime.ort_session(done.model_file))(**inputs)
    real = inputs["attention_mask"].bool().numpy()
    assert got.shape == expected.shape == (*real.shape, len(done.info["labels"]))
    assert (got.argmax(-1)[real] == expected.argmax(-1)[real]).all()
    assert abs(got - expected)[real].max() <= 1e-4


# -- the folder -----------------------------------------------------------------------------------
def test_folder_has_graph_tokenizer_and_info_and_no_pickle(exports):
    for name, done in exports.items():
        files = {f.name for f in done.folder.iterdir()}
        assert {"model.onnx", "onnx.json", "config.json", "tokenizer.json"} <= files, name
        assert not [f for f in files if f.endswith(PICKLE_SUFFIXES)], files
        assert not [f for f in done.folder.iterdir() if f.read_bytes()[:1] == b"\x80"], name
        assert not list(done.folder.parent.glob("*.tmp"))
        info = json.loads((done.folder / "onnx.json").read_text())
        assert info == done.info and info["task"] == done.task
        assert info["input_names"] == ["input_ids", "token_type_ids", "attention_mask"]
        assert info["input_names"] == done.input_names
        assert info["output_names"] == ["logits"] and info["opset"] == done.opset >= 17
        assert info["max_length"] == 32 and info["max_positions"] == 64
        assert info["padding_side"] == "right" and info["dtype"] == "float32"
        assert info["parity"] == done.parity.as_dict()
    full, lora, ner = (exports[k].info for k in ("full", "lora", "ner"))
    assert (full["task"], full["labels"], full["merged_from"]) == (
        "sequence_classification",
        ["neg", "pos"],
        None,
    )
    assert full["id2label"] == {"0": "neg", "1": "pos"}
    assert full["logits_axes"] == ["batch", "label"]
    assert lora["merged_from"] == "lora"
    assert ner["task"] == "token_classification" and ner["labels"][0] == "O"
    assert ner["logits_axes"] == ["batch", "sequence", "label"] and "word_tags" in ner


# -- refusals -------------------------------------------------------------------------------------
def test_refuses_an_existing_output_folder(sources, tmp_path):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(ConfigError, match="already exists; choose a new folder"):
        onnx_export.export_onnx(sources["full"], taken)
    assert [f.name for f in taken.iterdir()] == ["keep.txt"]


def test_refuses_tasks_other_than_classification(sources, tmp_path):
    # A generative checkpoint is costly to train: the manifest alone decides, before loading.
    fake = shutil.copytree(sources["full"], tmp_path / "seq2seq")
    manifest = json.loads((fake / "tunesmith.json").read_text())
    (fake / "tunesmith.json").write_text(json.dumps({**manifest, "task": "seq2seq"}))
    with pytest.raises(ConfigError) as info:
        onnx_export.export_onnx(fake, tmp_path / "out")
    message = str(info.value)
    assert "task 'seq2seq' cannot be exported to ONNX" in message
    assert "sequence_classification and token_classification" in message
    assert "\n" not in message
    assert not (tmp_path / "out").exists()


def test_refuses_methods_that_cannot_be_merged(tiny_runs, tmp_path):
    with pytest.raises(ConfigError, match="method 'bottleneck' cannot be merged into the base"):
        onnx_export.export_onnx(tiny_runs["bottleneck"], tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_refuses_old_opsets_and_foreign_folders(sources, tiny_bert, tmp_path):
    with pytest.raises(ConfigError, match="opset 13 is too old; use 17 or newer"):
        onnx_export.export_onnx(sources["full"], tmp_path / "out", opset=13)
    with pytest.raises(ModelError, match="not a tunesmith checkpoint"):
        onnx_export.export_onnx(tiny_bert, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def fixed_axes(graph: Path, path: Path) -> None:
    """``graph`` with its batch and sequence axes frozen at the export example's 2 x 16."""
    import onnx

    proto = onnx.load(str(graph))
    for value in [*proto.graph.input, *proto.graph.output]:
        for dim, size in zip(value.type.tensor_type.shape.dim, (2, 16), strict=False):
            dim.dim_value = size
    onnx.save(proto, str(path))


@pytest.mark.parametrize(
    ("source", "graph", "why"),
    [
        # The full run's graph for the LoRA model: same shapes, other weights.
        ("lora", lambda g, p: shutil.copy(g["full"], p), r"pytorch\| \S+ > atol 0.0001 at batch"),
        # The NER graph for a sequence classifier: logits of another shape.
        ("full", lambda g, p: shutil.copy(g["ner"], p), r"length 7: logits of shape \(1, 7, \d\)"),
        # A graph whose axes were not exported as dynamic: onnxruntime refuses other shapes.
        ("full", lambda g, p: fixed_axes(g["full"], p), "invalid dimensions for input"),
    ],
    ids=["other-weights", "other-shape", "fixed-axes"],
)
def test_a_graph_that_does_not_reproduce_the_model_is_not_written(
    source, graph, why, exports, sources, tmp_path, monkeypatch
):
    graphs = {name: done.model_file for name, done in exports.items()}

    def wrong_graph(model, names, path, *, opset):
        graph(graphs, path)
        return path

    monkeypatch.setattr(onnx_export, "export_graph", wrong_graph)
    with pytest.raises(ModelError, match="does not reproduce the model") as info:
        onnx_export.export_onnx(sources[source], tmp_path / "out")
    message = str(info.value)
    assert re.search(why, message), message
    assert message.endswith("nothing was written") and "\n" not in message
    assert list(tmp_path.iterdir()) == []


def test_cuda_needs_the_gpu_build_of_onnxruntime():
    if HAS_CUDA_EP:
        assert onnx_runtime.providers("cuda")[0] == "CUDAExecutionProvider"
    else:
        with pytest.raises(ConfigError, match="install onnxruntime-gpu"):
            onnx_runtime.providers("cuda")
    with pytest.raises(ConfigError, match="unknown device 'tpu'"):
        onnx_runtime.providers("tpu")
    with pytest.raises(ConfigError, match="unknown onnxruntime optimisation level"):
        onnx_runtime.ort_session("model.onnx", level="max")


@pytest.mark.skipif(not HAS_CUDA_EP, reason="onnxruntime has no CUDA provider here")
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_parity_on_cuda(exports, sources):
    done = exports["full"]
    model = onnx_export.load_served_model(sources["full"]).model
    parity = onnx_export.check_parity(model, done.model_file, done.input_names, device="cuda")
    assert parity.provider == "CUDAExecutionProvider" and parity.passed, parity


# -- latency --------------------------------------------------------------------------------------
def test_latency_of_both_runtimes_on_real_texts(exports, sources):
    threads = torch.get_num_threads()
    report = onnx_export.onnx_latency(
        sources["full"], exports["full"].model_file, TEXTS * 3, batch_size=4, batches=2, warmup=1
    )
    assert torch.get_num_threads() == threads
    assert (report["device"], report["threads"], report["level"]) == ("cpu", threads, "all")
    for key, size in (("latency_bs1", 1), ("throughput", 4)):
        assert set(report[key]) == {"pytorch", "onnxruntime"}
        for entry in report[key].values():
            assert entry["batch_size"] == size and entry["batches"] == 2
            assert 0 < entry["p50_ms"] <= entry["p95_ms"] and entry["examples_per_s"] > 0


# -- the command ----------------------------------------------------------------------------------
def test_export_command_prints_parity_and_latency(sources, tmp_path, capsys):
    from tunesmith.cli import main

    out = tmp_path / "served"
    args = ["export", str(sources["full"]), str(out), "--format", "onnx", "--batch-size", "4"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert f"exported ONNX graph to {out / 'model.onnx'} (opset 18)" in printed
    assert re.search(r"parity with PyTorch on random inputs \(1x7, 4x33, 2x64\): max", printed)
    # The tiny run has no test split: latency is timed on its validation rows.
    assert "latency on validation split" in printed and "throughput batch 4" in printed
    report = json.loads((out / "export_report.json").read_text())
    assert report["kind"] == "onnx" and report["parity"]["passed"]
    assert set(report["throughput"]) == {"pytorch", "onnxruntime"}
    args = ["export", str(sources["full"]), str(tmp_path / "x"), "--format", "tflite"]
    assert main(args) != 0
    assert "unknown --format 'tflite'; use onnx" in capsys.readouterr().err
    assert main([*args[:3], "--format", "onnx", "--quantize", "int8"]) != 0
    assert "not both" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
