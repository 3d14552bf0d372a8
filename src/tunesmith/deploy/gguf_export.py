"""``tunesmith export --format gguf``: a fine-tuned causal LM as one GGUF file, proven twice.

Why GGUF: most fine-tuned small LLMs are run locally through llama.cpp or
Ollama. Why the checks: what users of other tools report is a model that
worked in training and answers gibberish or never stops once exported (a
wrong chat template, EOS token, tokenizer or tensor layout in the file), and
nothing in those tools compares the file with the trained model. Here:

1. the model is made plain (LoRA/DoRA/IA3 merged: ``deploy.plain``) and
   written to a temporary folder (``gguf_write``);
2. check 1 (always, ``gguf_check``) reads the file back with transformers'
   GGUF loader: logits against the trained model rounded as the file is,
   metadata against the trained tokenizer;
3. check 2 (when llama-cpp-python is installed, ``gguf_parity``) runs the
   file in llama.cpp on the check prompts (``gguf_prompts``);
4. only then does the folder appear, with ``model-<type>.gguf``, an Ollama
   ``Modelfile``, ``gguf.json`` (what was written) and ``export_report.json``
   (what was checked). A failed check leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from tunesmith._version import __version__
from tunesmith.config.specs import all_task_specs
from tunesmith.deploy.gguf_check import check_file
from tunesmith.deploy.gguf_parity import check_runtime
from tunesmith.deploy.gguf_prompts import CheckPrompt, check_prompts
from tunesmith.deploy.gguf_runtime import runtime_available
from tunesmith.deploy.gguf_tensors import LlamaShape, check_architecture, llama_tensors
from tunesmith.deploy.gguf_vocab import GgufVocab, build_vocab, end_of_turn
from tunesmith.deploy.gguf_write import DEFAULT_QUANTIZE, Quant, quant, write_gguf
from tunesmith.deploy.plain import plain_model
from tunesmith.deploy.reports import write_report
from tunesmith.errors import ConfigError, DataError, ModelError
from tunesmith.methods.base import METHODS
from tunesmith.models.folders import write_new_folder
from tunesmith.models.loading import checkpoint_manifest
from tunesmith.runs.load import load_checkpoint, records_for
from tunesmith.tasks.chat_template import resolve_template

log = logging.getLogger(__name__)

WHAT = "export --format gguf"
INFO_FILE = "gguf.json"
MODELFILE = "Modelfile"
#: Validation chats used as check prompts by default (the fixed prompts come on top).
DEFAULT_CHECK_PROMPTS = 16


@dataclass
class GgufExport:
    """What ``export_gguf`` wrote and what its checks found."""

    folder: Path
    file: Path
    quantize: str
    #: The content of ``gguf.json``.
    info: dict[str, Any]
    #: The content of ``export_report.json``.
    report: dict[str, Any]


def export_gguf(
    checkpoint: str | Path,
    output: str | Path,
    *,
    quantize: str = DEFAULT_QUANTIZE,
    check: bool = True,
    check_prompts_n: int = DEFAULT_CHECK_PROMPTS,
    threads: int | None = None,
) -> GgufExport:
    """Write ``checkpoint`` as a new folder holding one checked GGUF file.

    Args:
        quantize: ``f32``, ``f16`` or ``q8_0``: the storage type of the matrices.
        check: Run check 1 and (when llama-cpp-python is installed) check 2.
        check_prompts_n: Validation chats to check on, besides the fixed prompts.
        threads: CPU threads of llama.cpp (default: torch's).

    Raises:
        ConfigError: ``output`` exists, an unknown ``quantize``, or a task,
            method, architecture or tokenizer GGUF export cannot take.
        ModelError: A check failed (nothing was written).
    """
    output = Path(output)
    if output.exists():
        raise ConfigError(f"{WHAT}: {output} already exists; choose a new folder")
    q = quant(quantize)
    if check_prompts_n < 0:
        raise ConfigError(f"{WHAT}: --check-prompts must be 0 or more")
    check_task(str(checkpoint_manifest(checkpoint).get("task", "")))
    cfg, task, model, tokenizer, _labels = load_checkpoint(checkpoint)
    model = plain_model(cfg.method.name, model, WHAT).float().cpu().eval()
    check_architecture(model.config)
    shape = LlamaShape.of(model.config)
    template = training_template(tokenizer, cfg.task.chat_template)
    vocab = build_vocab(tokenizer, template, shape.vocab_size)
    prompts: list[CheckPrompt] = []
    if check:
        records = validation_records(task, cfg, checkpoint)
        prompts = check_prompts(tokenizer, template, records, check_prompts_n)
    name = Path(checkpoint).resolve().parent.name or "model"
    file_name = f"model-{q.name}.gguf"
    done: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        path = tmp / file_name
        types = write_gguf(
            path, shape, llama_tensors(model.state_dict(), shape), vocab, q, name=name
        )
        checks = (
            run_checks(path, model, tokenizer, template, prompts, shape, q, threads)
            if check
            else {}
        )
        info = {
            "format": "gguf",
            "file": file_name,
            "quantize": q.name,
            "size_bytes": path.stat().st_size,
            "architecture": "llama",
            "tensor_types": types,
            "shape": asdict(shape),
            "tokenizer": vocab.summary(),
            "modelfile": MODELFILE,
            "merged_from": cfg.method.name if METHODS.get(cfg.method.name).saves_adapter else None,
            "tunesmith_version": __version__,
        }
        report = {"kind": "gguf", "file": file_name, "quantize": q.name, "checked": check, **checks}
        (tmp / MODELFILE).write_text(modelfile(file_name, vocab), encoding="utf-8")
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        write_report(tmp, report)
        done.update(info=info, report=report)

    write_new_folder(output, write)
    return GgufExport(output, output / file_name, q.name, done["info"], done["report"])


def check_task(task: str) -> None:
    """Refuse tasks whose model GGUF cannot hold, saying what to use instead.

    Raises:
        ConfigError: Naming the task and the formats that take it.
    """
    takes = [spec.name for spec in all_task_specs() if spec.gguf_export]
    if task not in takes:
        raise ConfigError(
            f"{WHAT}: task '{task}' cannot be exported to GGUF (only {' and '.join(takes)}: "
            "decoder-only language models); use --quantize int8 or --format onnx instead"
        )


def training_template(tokenizer: Any, configured: str | None) -> str | None:
    """The chat template the run trained with (``task.chat_template`` first); None if none."""
    if not configured and not getattr(tokenizer, "chat_template", None):
        return None
    return resolve_template(tokenizer, configured)


def validation_records(task: Any, cfg: Any, checkpoint: str | Path) -> list[dict[str, Any]]:
    """The run's validation rows (empty when the run recorded none or its data is gone)."""
    try:
        return records_for(task, cfg, checkpoint, None, "validation")
    except (DataError, OSError) as err:
        log.warning("%s: no validation rows to check on (%s); fixed prompts only", WHAT, err)
        return []


def run_checks(
    path: Path,
    model: torch.nn.Module,
    tokenizer: Any,
    template: str | None,
    prompts: Sequence[CheckPrompt],
    shape: LlamaShape,
    q: Quant,
    threads: int | None,
) -> dict[str, Any]:
    """Check 1, then check 2 when llama-cpp-python is installed; raise on the first failure.

    Raises:
        ModelError: A check failed, with its reason (nothing is written).
    """
    first, loaded = check_file(path, model, tokenizer, template, prompts, shape, q)
    if not first.passed:
        raise ModelError(f"{WHAT}: check 1 failed: {first.failure()}; nothing was written")
    checks: dict[str, Any] = {"check_1": first.as_dict()}
    if not runtime_available():
        checks["check_2"] = {
            "skipped": "llama-cpp-python is not installed (pip install 'tunesmith[gguf]')"
        }
        return checks
    ends = {"eot": end_of_turn(tokenizer, template), "eos": tokenizer.eos_token_id}
    stops = {key: token for key, token in ends.items() if token is not None}
    second = check_runtime(
        path,
        loaded,
        tokenizer,
        prompts,
        stops,
        quantize=q.name,
        n_ctx_train=shape.n_ctx,
        threads=threads or torch.get_num_threads(),
    )
    checks["check_2"] = second.as_dict()
    if second.problems():
        raise ModelError(
            f"{WHAT}: check 2 (llama.cpp) failed: {'; '.join(second.problems())}; "
            "nothing was written"
        )
    return checks


def modelfile(file_name: str, vocab: GgufVocab) -> str:
    """A minimal Ollama Modelfile: the file, and stop at the end-of-turn and EOS tokens.

    No TEMPLATE: Ollama takes the chat template from the GGUF metadata.
    """
    stops = dict.fromkeys(
        vocab.tokens[vocab.special[key]] for key in ("eot", "eos") if key in vocab.special
    )
    lines = [
        "# Ollama: `ollama create NAME -f Modelfile` in this folder; the chat template is the",
        "# one in the GGUF metadata (tokenizer.chat_template).",
        f"FROM ./{file_name}",
        *(f"PARAMETER stop {json.dumps(token)}" for token in stops),
    ]
    return "\n".join(lines) + "\n"


def summary(done: GgufExport) -> str:
    """What ``tunesmith export --format gguf`` prints: the file, its size, both checks."""
    size = done.info["size_bytes"] / 1e6
    lines = [f"exported GGUF ({done.quantize}, {size:.1f} MB) to {done.file}"]
    first, second = done.report.get("check_1"), done.report.get("check_2")
    if first is None:
        lines.append("not checked (--no-check)")
        return "\n".join(lines)
    rounding = (
        "the trained model"
        if done.quantize == "f32"
        else f"the trained model rounded to {done.quantize} (the rounding itself moves logits by "
        f"up to {first['rounding_max_abs_diff']:.3g})"
    )
    lines.append(
        f"check 1, transformers' GGUF reader on {first['prompts']} prompts: max |logit "
        f"difference| {first['max_abs_diff']:.3g} against {rounding}, tolerance "
        f"{first['atol']:g}; metadata matches the tokenizer"
    )
    if "skipped" in second:
        lines.append(f"check 2 skipped: {second['skipped']}")
    else:
        lines.append(
            f"check 2, llama.cpp: prompt tokens identical {second['prompt_tokens_identical']}; "
            f"last logits max |difference| {second['last_logits_max_abs_diff']:.3g} (tolerance "
            f"{second['last_logits_atol']:g}); greedy identical {second['greedy_identical']}; "
            f"stops at end of turn {second['eot_stops']}"
        )
        for prompt in second["prompts"]:
            if prompt["first_divergence"]:
                at = prompt["first_divergence"]
                lines.append(
                    f"  {prompt['source']}: greedy differs from token {at['index']} "
                    f"(transformers {at['transformers']}, llama.cpp {at['llama_cpp']})"
                )
    lines.append(f"Ollama: {done.folder / MODELFILE} (written, not run here)")
    return "\n".join(lines)
