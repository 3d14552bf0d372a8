"""GGUF export: the file read back by transformers is the trained model, llama.cpp runs it alike.

A tiny random Llama (hidden 32, 4 query and 2 key/value heads: the Q/K
permutation and grouped-query attention both matter) with a byte-level BPE
tokenizer and a ChatML template is fine-tuned with LoRA for a few steps, so
the export really merges adapters, then exported. Each test breaks one thing
the export must get right and checks that the export notices.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import tunesmith.deploy.gguf_export as gguf_export
import tunesmith.deploy.gguf_tensors as gguf_tensors
from chat_fixtures import CHATML, build_tiny_llama, write_jsonl
from helpers import PEFT_TEST_MARKS
from test_causal_lm import chats, sft_config
from tunesmith.api import load_checkpoint, train
from tunesmith.cli import main
from tunesmith.deploy.gguf_check import load_file_model
from tunesmith.deploy.gguf_export import check_task, export_gguf
from tunesmith.deploy.gguf_prompts import FIXED_PROMPTS
from tunesmith.deploy.gguf_runtime import runtime_available
from tunesmith.deploy.gguf_tensors import LlamaShape, check_architecture, llama_tensors
from tunesmith.deploy.gguf_vocab import build_vocab, pre_tokenizer_name
from tunesmith.deploy.gguf_write import quant, write_gguf
from tunesmith.errors import ConfigError, ModelError

pytestmark = PEFT_TEST_MARKS
needs_llama_cpp = pytest.mark.skipif(
    not runtime_available(),
    reason="llama-cpp-python is not installed (pip install tunesmith[gguf])",
)


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """best/ of a 3-step LoRA SFT run of the tiny Llama (LoRA B far from zero: lr 5e-2)."""
    tmp = tmp_path_factory.mktemp("gguf-run")
    model = build_tiny_llama(tmp / "model")
    data = write_jsonl(tmp / "chats.jsonl", chats(30))
    cfg = sft_config(
        model,
        data,
        tmp / "run",
        method={"name": "lora", "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"]},
        optim={"lr": 5e-2},
        train={"max_steps": 3, "eval_steps": 3, "precision": "fp32"},
    )
    best = train(cfg).best_dir
    assert best is not None
    return best


def merged_logits(checkpoint: Path, ids: list[int]) -> torch.Tensor:
    """The trained model's logits, adapters merged (what the file must reproduce)."""
    _cfg, _task, model, _tok, _labels = load_checkpoint(checkpoint)
    model = model.merge_and_unload().float().eval()
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0]


def test_f32_file_gives_the_trained_models_logits(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "gguf"
    args = ["export", str(tiny_run), str(out), "--format", "gguf", "--quantize", "f32"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "exported GGUF (f32, " in printed and "check 1, transformers' GGUF reader" in printed
    file = out / "model-f32.gguf"
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["model-f32.gguf", "Modelfile", "gguf.json", "export_report.json"]
    )
    # Independently of the export's own check: transformers' GGUF loader, then the logits.
    _cfg, _task, _model, tokenizer, _labels = load_checkpoint(tiny_run)
    ids = tokenizer("<|im_start|>user\nWhat is your name? 42<|im_end|>\n")["input_ids"]
    with torch.no_grad():
        read = load_file_model(file)(torch.tensor([ids])).logits[0]
    trained = merged_logits(tiny_run, ids)
    assert (read - trained).abs().max() < 1e-4
    report = json.loads((out / "export_report.json").read_text())
    assert report["check_1"]["passed"] and report["check_1"]["max_abs_diff"] < 1e-4
    # Validation chats (run's split) plus the four fixed prompts.
    assert report["check_1"]["prompts"] == 6 + len(FIXED_PROMPTS)


def test_skipped_qk_permutation_fails_check_1(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(gguf_tensors, "permute_qk", lambda weight, n_head: weight)
    monkeypatch.setattr(gguf_export, "runtime_available", lambda: False)
    out = tmp_path / "gguf"
    with pytest.raises(ModelError, match="check 1 failed: transformers reads logits"):
        export_gguf(tiny_run, out, quantize="f32")
    assert not out.exists() and not out.with_name("gguf.tmp").exists()


def test_metadata_holds_template_pre_tokenizer_and_special_ids(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from gguf import GGUFReader

    monkeypatch.setattr(gguf_export, "runtime_available", lambda: False)
    done = export_gguf(tiny_run, tmp_path / "gguf", quantize="q8_0")
    fields = GGUFReader(done.file).fields
    meta = {key: fields[key].contents() for key in fields if not key.startswith("tokenizer.ggml.t")}
    assert meta["tokenizer.chat_template"] == CHATML
    assert meta["tokenizer.ggml.pre"] == "gpt-2"
    assert meta["tokenizer.ggml.model"] == "gpt2"
    # The tiny tokenizer: <pad> 0, <|im_start|> 1 (BOS), <|im_end|> 2 (EOS, and ends a turn).
    assert [meta[f"tokenizer.ggml.{k}_token_id"] for k in ("bos", "eos", "eot", "padding")] == [
        1,
        2,
        2,
        0,
    ]
    assert meta["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.ggml.token_type"].contents()[:3] == [3, 3, 3]  # CONTROL
    assert done.info["tensor_types"] == {"Q8_0": 15, "F32": 5}
    assert (done.folder / "Modelfile").read_text().splitlines()[2:] == [
        "FROM ./model-q8_0.gguf",
        'PARAMETER stop "<|im_end|>"',
    ]
    # q8_0 against the trained model rounded the same way: equal to float noise.
    assert done.report["check_1"]["max_abs_diff"] < 1e-4
    assert done.report["check_1"]["rounding_max_abs_diff"] > 1e-4


@pytest.mark.parametrize(
    ("broken", "message"),
    [
        ({"special": "eos"}, "eos_token_id is 0, the trained tokenizer's is 2"),
        ({"chat_template": "{{ messages[0]['content'] }}"}, "tokenizer.chat_template is"),
    ],
    ids=["eos", "template"],
)
def test_wrong_eos_or_template_fails_and_writes_nothing(
    tiny_run: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    broken: dict[str, str],
    message: str,
) -> None:
    real = gguf_export.build_vocab

    def wrong(*args: object, **kwargs: object):
        vocab = real(*args, **kwargs)
        if "special" in broken:
            return dataclasses.replace(vocab, special={**vocab.special, broken["special"]: 0})
        return dataclasses.replace(vocab, chat_template=broken["chat_template"])

    monkeypatch.setattr(gguf_export, "build_vocab", wrong)
    out = tmp_path / "gguf"
    with pytest.raises(ModelError, match="check 1 failed") as err:
        export_gguf(tiny_run, out, quantize="f32")
    assert message in str(err.value) and "nothing was written" in str(err.value)
    assert not out.exists() and not out.with_name("gguf.tmp").exists()


def test_tasks_gguf_cannot_hold_are_refused_in_one_line(
    tiny_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigError, match="use --quantize int8 or --format onnx instead"):
        check_task("sequence_classification")
    check_task("causal_lm")
    out = tmp_path / "x"
    assert main(["export", str(tiny_run), str(out), "--format", "gguf", "--quantize", "int8"]) != 0
    assert "--format gguf takes --quantize f32, f16, q8_0, not 'int8'" in capsys.readouterr().err
    assert not out.exists()


def test_unsupported_architectures_and_tokenizers_are_refused() -> None:
    from transformers import LlamaConfig, Qwen2Config

    with pytest.raises(ConfigError, match="model type 'qwen2' is not supported"):
        check_architecture(Qwen2Config())
    rope = {"rope_type": "llama3", "factor": 8.0, "rope_theta": 5e5}
    rope |= {"low_freq_factor": 1.0, "high_freq_factor": 4.0}
    rope |= {"original_max_position_embeddings": 8192}
    scaled = LlamaConfig(rope_scaling=rope)
    with pytest.raises(ConfigError, match="RoPE scaling 'llama3'"):
        check_architecture(scaled)
    sentencepiece = {"model": {"type": "BPE", "byte_fallback": True}, "normalizer": None}
    with pytest.raises(ConfigError, match="SentencePiece-style"):
        pre_tokenizer_name(sentencepiece)
    split = {"type": "Split", "pattern": {"Regex": "x"}, "behavior": "Isolated"}
    with pytest.raises(ConfigError, match="not recognised"):
        pre_tokenizer_name({"model": {"type": "BPE"}, "pre_tokenizer": split})


def tiny_gguf(folder: Path, digits: bool) -> tuple[Path, object, object]:
    """The tiny Llama written straight to GGUF (no run): its file, model and tokenizer."""
    from tokenizers import pre_tokenizers
    from transformers import AutoModelForCausalLM, AutoTokenizer

    build_tiny_llama(folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if digits:  # SmolLM2's own layout: every digit on its own, then byte-level
        tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(False)]
        )
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    shape = LlamaShape.of(model.config)
    vocab = build_vocab(tokenizer, CHATML, shape.vocab_size)
    assert vocab.pre == ("smollm" if digits else "gpt-2")
    path = folder / "tiny.gguf"
    write_gguf(path, shape, llama_tensors(model.state_dict(), shape), vocab, quant("f32"), name="t")
    return path, model, tokenizer


@needs_llama_cpp
@pytest.mark.parametrize("digits", [False, True], ids=["gpt-2", "smollm"])
def test_llama_cpp_tokenises_like_the_trained_tokenizer(tmp_path: Path, digits: bool) -> None:
    from tunesmith.deploy.gguf_runtime import LlamaCpp

    path, _model, tokenizer = tiny_gguf(tmp_path, digits)
    texts = [*FIXED_PROMPTS, "<|im_start|>user\n2024 + 17 = 2041<|im_end|>\n"]
    with LlamaCpp(path, n_ctx=128) as runtime:
        for text in texts:
            assert runtime.tokenize(text) == tokenizer(text)["input_ids"], text
        assert runtime.is_eog(2) and not runtime.add_bos


@needs_llama_cpp
def test_llama_cpp_runs_the_export_like_transformers(tiny_run: Path, tmp_path: Path) -> None:
    done = export_gguf(tiny_run, tmp_path / "gguf", quantize="f32")
    second = done.report["check_2"]
    n = 6 + len(FIXED_PROMPTS)
    assert second["passed"], second["problems"]
    assert second["prompt_tokens_identical"] == f"{n}/{n}"
    assert second["greedy_identical"] == f"{n}/{n}"
    assert second["last_logits_max_abs_diff"] < 1e-3
    assert all(second["stops_end_generation"].values())
    greedy = [p for p in second["prompts"] if p["greedy_equal"]]
    assert len(greedy) == n and all(p["first_divergence"] is None for p in greedy)


def test_rounding_is_what_the_file_holds() -> None:
    from gguf import GGMLQuantizationType, quants

    from tunesmith.deploy.gguf_write import encode, rounded

    array = np.random.default_rng(0).standard_normal((4, 64)).astype(np.float32)
    for name in ("f16", "q8_0"):
        data, qtype = encode("blk.0.attn_q.weight", array, quant(name))
        assert qtype.name == name.upper()
        back = quants.dequantize(data, qtype).reshape(array.shape)
        assert np.array_equal(rounded("blk.0.attn_q.weight", array, quant(name)), back)
    norm, qtype = encode("blk.0.attn_norm.weight", array[0], quant("q8_0"))
    assert qtype == GGMLQuantizationType.F32 and np.array_equal(norm, array[0])


@pytest.mark.slow
def test_smollm2_lora_sft_exports_to_f16_proven_by_both_checks(tmp_path: Path) -> None:
    """The offline SmolLM2 after a short LoRA SFT run, exported as users would, both checks on."""
    from tunesmith.config.root import Config

    example = Path(__file__).parent.parent / "examples" / "sft_smollm2.yaml"
    overrides = [
        "train.max_steps=1",
        "train.batch_size=4",
        "train.eval_steps=1",
        "train.eval_at_start=false",
        f"train.output_dir={tmp_path / 'run'}",
    ]
    best = train(Config.load(example, overrides=overrides)).best_dir
    assert best is not None
    done = export_gguf(best, tmp_path / "gguf", quantize="f16", check_prompts_n=6)
    first = done.report["check_1"]
    assert first["passed"] and first["max_abs_diff"] <= 1e-4 and first["prompts"] == 10
    assert done.info["tokenizer"]["pre"] == "gpt-2"  # the prepared tokenizer: docs/deploy.md
    assert done.info["tokenizer"]["special_tokens"]["eot"] == "<|im_end|>"
    assert 250e6 < done.info["size_bytes"] < 290e6
    if runtime_available():
        second = done.report["check_2"]
        assert second["passed"] and second["prompt_tokens_identical"] == "10/10"
        assert int(second["greedy_identical"].split("/")[0]) >= 9
