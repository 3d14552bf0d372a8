"""Builders shared by the tests: tiny models of several architectures and a wired Trainer."""

from __future__ import annotations

import copy
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from torch import nn

from conftest import tiny_config, toy_rows, write_csv
from tunesmith.cli import main
from tunesmith.config.root import Config
from tunesmith.data.batching import Collator, FeatureDataset
from tunesmith.methods.base import Method, get_method
from tunesmith.models.loading import load_tokenizer
from tunesmith.tasks.base import get_task
from tunesmith.training.loop import Trainer
from tunesmith.training.monitor import MetricsLog
from tunesmith.training.parts import LoopCallbacks, LoopData
from tunesmith.training.precision import new_accelerator

VOCAB = 54


def build_model(kind: str, layers: int = 2, *, decoder_layers: int | None = None) -> nn.Module:
    """A tiny random ``*ForSequenceClassification`` model of the given architecture."""
    import transformers as tf

    torch.manual_seed(0)
    if kind == "bert":
        cfg = tf.BertConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=layers,
            num_attention_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0,
            pad_token_id=0,
        )
        return tf.BertForSequenceClassification(cfg)
    if kind == "distilbert":
        cfg = tf.DistilBertConfig(
            vocab_size=VOCAB,
            dim=16,
            n_layers=layers,
            n_heads=2,
            hidden_dim=32,
            max_position_embeddings=64,
            dropout=0.0,
            attention_dropout=0.0,
            seq_classif_dropout=0.0,
            pad_token_id=0,
        )
        return tf.DistilBertForSequenceClassification(cfg)
    if kind == "llama":
        cfg = tf.LlamaConfig(
            vocab_size=VOCAB,
            hidden_size=16,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=2,
            intermediate_size=32,
            max_position_embeddings=64,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        return tf.LlamaForSequenceClassification(cfg)
    if kind == "gpt2":
        cfg = tf.GPT2Config(
            vocab_size=VOCAB,
            n_embd=16,
            n_layer=layers,
            n_head=2,
            n_positions=64,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            pad_token_id=0,
            bos_token_id=2,
            eos_token_id=3,
        )
        return tf.GPT2ForSequenceClassification(cfg)
    if kind == "t5":
        cfg = tf.T5Config(
            vocab_size=VOCAB,
            d_model=16,
            d_kv=8,
            d_ff=32,
            num_layers=layers,
            num_decoder_layers=decoder_layers if decoder_layers is not None else layers,
            num_heads=2,
            dropout_rate=0.0,
            classifier_dropout=0.0,
            pad_token_id=0,
            eos_token_id=3,
            decoder_start_token_id=0,
        )
        return tf.T5ForSequenceClassification(cfg)
    raise ValueError(kind)


LABELS = ["neg", "pos"]


def bert_config(model: Path, tmp: Path, **sections: dict) -> Config:
    """A config for the Trainer-level tests: fp32, constant LR unless overridden."""
    data = write_csv(tmp / "d.csv", toy_rows(8))  # the Trainer gets its features directly
    base = {
        "optim": {"lr": 1e-2, "warmup_ratio": 0.0, "scheduler": "constant"},
        "train": {"batch_size": 8, "precision": "fp32", "epochs": 1},
    }
    for name, values in sections.items():
        base.setdefault(name, {}).update(values)
    return Config.from_dict(tiny_config(model, data, tmp / "run", **base))


def bert_features(model: Path, n: int = 32, seed: int = 5) -> list[dict[str, Any]]:
    """Tokenised toy rows for ``Trainer`` (no splitting, no validation)."""
    data_cfg = Config.from_dict(tiny_config(model, Path("x.csv"), Path("run")))
    task = get_task(data_cfg)
    return task.encode(
        toy_rows(n, seed=seed), load_tokenizer(str(model)), {lab: i for i, lab in enumerate(LABELS)}
    )


def make_trainer(
    cfg: Config,
    features: Sequence[dict[str, Any]],
    tmp: Path,
    *,
    model: torch.nn.Module | None = None,
    hooks: Sequence[Any] = (),
    log_metrics: bool = False,
) -> tuple[Trainer, Method]:
    """A Trainer wired by ``Trainer.for_method`` like ``api.train`` does (no validation)."""
    task = get_task(cfg)
    if model is None:
        tok = load_tokenizer(cfg.model.name_or_path)
        torch.manual_seed(0)
        model = task.build_model(LABELS, tok)
    method = get_method(cfg)
    model = method.apply(model)
    trainer = Trainer.for_method(
        cfg,
        task,
        model,
        method,
        new_accelerator("no"),
        LoopData(FeatureDataset(list(features)), FeatureDataset([]), Collator(0), LABELS),
        LoopCallbacks(
            MetricsLog(tmp / "metrics.jsonl", enabled=log_metrics), hooks=hooks, progress=False
        ),
    )
    return trainer, method


@dataclass
class Update:
    """What the optimizer saw at one update."""

    step: int
    lr: dict[str, float]
    with_grad: set[str]
    weights: dict[str, torch.Tensor]


@dataclass
class Recorder:
    """Wraps ``trainer.optimizer.step``; also a hook recording ``requires_grad`` per step."""

    updates: list[Update] = field(default_factory=list)
    trainable_at_start: dict[int, set[str]] = field(default_factory=dict)

    def attach(self, trainer: Trainer) -> Recorder:
        # The torch optimizer inside accelerate's wrapper: the LR scheduler keeps its
        # own patch of the outer ``step``.
        inner = trainer.optimizer.optimizer
        original = inner.step
        model = trainer.model

        def step(*args, **kwargs):
            self.updates.append(
                Update(
                    step=trainer.state.step,
                    lr={g["name"]: g["lr"] for g in trainer.optimizer.param_groups},
                    with_grad={n for n, p in model.named_parameters() if p.grad is not None},
                    weights={n: p.detach().clone() for n, p in model.named_parameters()},
                )
            )
            return original(*args, **kwargs)

        inner.step = step
        return self

    def on_step_start(self, trainer: Trainer, step: int) -> None:
        self.trainable_at_start[step] = {
            n for n, p in trainer.model.named_parameters() if p.requires_grad
        }


def write_config(tmp: Path, cfg: dict, name: str = "cfg.yaml") -> Path:
    """Write a config dict as a YAML file for the command line."""
    path = tmp / name
    path.write_text(yaml.safe_dump(cfg))
    return path


def cli_fails(capsys: Any, args: list[str], *fragments: str) -> str:
    """Run the CLI expecting exit 2 and one ``error:`` line (the last) holding ``fragments``."""
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert lines and lines[-1].startswith("error: "), err
    assert sum(line.startswith("error: ") for line in lines) == 1, err
    assert "Traceback" not in err
    for fragment in fragments:
        assert fragment in lines[-1], (fragment, lines[-1])
    return lines[-1]


#: Marks of the tests that train peft adapters: peft still reads a renamed
#: transformers property (not what they are about), and tiny models run faster
#: on one thread.
PEFT_TEST_MARKS = [
    pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing:FutureWarning"),
    pytest.mark.usefixtures("one_thread"),
]


def save_base(folder: Path, model: nn.Module, tokenizer_from: Path) -> Path:
    """A base model folder with the conftest WordPiece tokenizer (same vocabulary size)."""
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    for f in tokenizer_from.iterdir():
        if f.name.startswith(("tokenizer", "special_tokens", "vocab")):
            shutil.copy(f, folder / f.name)
    return folder


def train_spying(cfg: Config, spy: Any) -> tuple[Any, dict[str, Any]]:
    """``api.train`` with ``spy(model, method)`` called on the model handed to the Trainer.

    Why: tests of what trains (adapters, quantized bases) need the very object the
    loop updates, before its first step; ``spy`` returns what to keep of it.
    """
    from tunesmith.runs import train as api

    captured: dict[str, Any] = {}

    class Spy(Trainer):
        @classmethod
        def for_method(cls, cfg, task, model, method, *args, **kwargs):  # type: ignore[override]
            captured.update(spy(model, method))
            return super().for_method(cfg, task, model, method, *args, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(api, "Trainer", Spy)
        result = api.train(cfg, progress=False)
    return result, captured


def train_tiny_methods(
    tiny_bert: Path, tmp: Path, rows: int, lengths: dict[str, dict[str, Any]]
) -> dict[str, Path]:
    """``best/`` per method of fp32 runs on the tiny BERT over ``rows`` toy sentences.

    ``lengths``: method -> its ``train`` overrides (epochs or max_steps). LoRA
    gets lr 1e-2 (its updates start at zero), the others 5e-3 (enough for
    random-order batches). Why shared: the export, quantization and pruning
    tests all need trained runs of several methods.
    """
    from tunesmith.api import train

    data = write_csv(tmp / "train.csv", toy_rows(rows))
    out = {}
    for method, length in lengths.items():
        cfg = tiny_config(
            tiny_bert,
            data,
            tmp / method,
            method={"name": method},
            optim={"lr": 1e-2 if method == "lora" else 5e-3},
            train={**length, "precision": "fp32"},
        )
        result = train(Config.from_dict(cfg), progress=False, test=False)
        assert result.best_dir is not None
        out[method] = result.best_dir
    return out


# -- one tiny run per task: the contract tests' data ------------------------------------------
@dataclass
class TaskData:
    """A tiny model plus data for one task: the run's config and texts to predict."""

    config: dict[str, Any]
    texts: list[str]


def _classification_data(folder: Path) -> TaskData:
    from conftest import build_tiny_bert

    model = build_tiny_bert(folder / "model")
    data = write_csv(folder / "train.csv", toy_rows(40))
    texts = ["the film was superb and fun", "a dull boring story", "it was really poor"]
    return TaskData(tiny_config(model, data, folder / "run"), texts)


def _token_classification_data(folder: Path) -> TaskData:
    from test_ner import build_ner_bert, ner_config, ner_sentences, write_conll

    model = build_ner_bert(folder / "model")
    data = write_conll(folder / "train.conll", ner_sentences(40))
    texts = ["alice lives in paris .", "bob met carol in new york"]
    return TaskData(ner_config(model, data, folder / "run"), texts)


def _causal_lm_data(folder: Path) -> TaskData:
    from chat_fixtures import build_tiny_llama, write_jsonl
    from test_causal_lm import chats, sft_config

    model = build_tiny_llama(folder / "model")
    data = write_jsonl(folder / "chats.jsonl", chats(30))
    cfg = sft_config(model, data, folder / "run", generate={"max_new_tokens": 4})
    return TaskData(cfg.model_dump(mode="json"), ["What is your name? 5", "Tell me a joke. 7"])


def _preference_data(folder: Path) -> TaskData:
    from chat_fixtures import build_tiny_llama, write_jsonl
    from test_preference import pairs, pref_config

    model = build_tiny_llama(folder / "model")
    data = write_jsonl(folder / "pairs.jsonl", pairs(30))
    cfg = pref_config(model, data, folder / "run", method={"name": "full"})
    return TaskData(cfg, ["What is your name? 5", "Tell me a joke. 7"])


def _reward_model_data(folder: Path) -> TaskData:
    from chat_fixtures import build_tiny_llama, write_jsonl
    from test_preference import pairs
    from test_reward_model import rm_config

    model = build_tiny_llama(folder / "model")
    data = write_jsonl(folder / "pairs.jsonl", pairs(30))
    return TaskData(rm_config(model, data, folder / "run"), ["I am a tiny bot.", "hello world"])


def _rl_data(folder: Path) -> TaskData:
    from chat_fixtures import build_tiny_llama, write_jsonl
    from test_rl import rl_config, sums

    model = build_tiny_llama(folder / "model")
    data = write_jsonl(folder / "sums.jsonl", sums(30))
    cfg = rl_config(model, data, folder / "run", method={"name": "full"})
    return TaskData(cfg, ["What is 2 plus 3?", "What is 4 plus 4?"])


def _seq2seq_data(folder: Path) -> TaskData:
    from test_seq2seq import build_tiny_t5, copy_rows, s2s_config, write_jsonl

    model = build_tiny_t5(folder / "model")
    data = write_jsonl(folder / "copy.jsonl", copy_rows(24))
    cfg = s2s_config(model, data, folder / "run", generate={"max_new_tokens": 4})
    return TaskData(cfg, ["a b c", "d e f g"])


def _multitask_data(folder: Path) -> TaskData:
    from test_multitask import build_mt_bert, mt_config
    from test_ner import ner_sentences, write_conll

    model = build_mt_bert(folder / "model")
    data = {
        "sentiment": write_csv(folder / "sentiment.csv", toy_rows(40)),
        "ner": write_conll(folder / "ner.conll", ner_sentences(40)),
    }
    texts = ["alice lives in paris .", "the film was awful"]
    return TaskData(mt_config(model, data, folder / "run"), texts)


#: ``task.type`` -> builder of a tiny model and data for it (in a given empty folder).
#: Every registered task needs one: the contract tests fail for a task without.
TASK_DATA: dict[str, Callable[[Path], TaskData]] = {
    "sequence_classification": _classification_data,
    "token_classification": _token_classification_data,
    "causal_lm": _causal_lm_data,
    "preference": _preference_data,
    "reward_model": _reward_model_data,
    "rl": _rl_data,
    "seq2seq": _seq2seq_data,
    "multitask": _multitask_data,
}

#: The train settings of a contract run: a few fp32 steps, one validation at the end.
CONTRACT_TRAIN = {
    "max_steps": 3,
    "batch_size": 8,
    "eval_steps": 3,
    "log_steps": 1,
    "precision": "fp32",
    "early_stopping_patience": None,
}


def task_data(task: str, folder: Path) -> TaskData:
    """The tiny model and data of ``task`` built in ``folder``; fails naming a missing builder."""
    if task not in TASK_DATA:
        pytest.fail(f"add a data builder for task {task} (helpers.TASK_DATA)", pytrace=False)
    return TASK_DATA[task](folder)


def contract_config(data: TaskData, out: Path, **sections: dict[str, Any]) -> dict[str, Any]:
    """``data``'s config as a contract run into ``out``: ``CONTRACT_TRAIN`` plus ``sections``."""
    cfg = copy.deepcopy(data.config)
    cfg.setdefault("train", {}).update({**CONTRACT_TRAIN, "output_dir": str(out)})
    for name, values in sections.items():
        cfg.setdefault(name, {}).update(values)
    return cfg


#: Tolerances of a contract run's outputs compared across saving, reloading and merging
#: (relative: for metrics far from 1, such as a perplexity of a few hundred).
CONTRACT_ATOL, CONTRACT_RTOL = 1e-5, 1e-6


def assert_outputs_close(got: Any, want: Any, where: str = "output") -> None:
    """Predictions or metrics equal: nested dicts and lists alike, strings and labels
    exactly, floats within ``CONTRACT_ATOL`` or ``CONTRACT_RTOL``."""
    if isinstance(want, dict):
        assert isinstance(got, dict) and set(got) == set(want), (where, got, want)
        for key in want:
            assert_outputs_close(got[key], want[key], f"{where}.{key}")
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), (where, got, want)
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            assert_outputs_close(g, w, f"{where}[{i}]")
    elif isinstance(want, float):
        assert got == pytest.approx(want, abs=CONTRACT_ATOL, rel=CONTRACT_RTOL), (where, got, want)
    else:
        assert got == want, (where, got, want)
