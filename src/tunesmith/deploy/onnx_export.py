"""ONNX export of classifiers, checked against PyTorch and timed against it.

Why ONNX: an encoder classifier served from ``model.onnx`` needs only
onnxruntime and its tokenizer (no torch, peft or tunesmith), and onnxruntime's
fused kernels are often faster on CPU. Why the parity check: an exporter can
silently bake a traced shape or branch into the graph, so the export runs
PyTorch and onnxruntime on random inputs of several batch sizes and lengths
(with padding) and compares the logits: that shows both that the numbers match
and that the batch and sequence axes really are dynamic.

The exported folder holds ``model.onnx``, the tokenizer files, ``config.json``
and ``onnx.json`` (task, labels, input names, lengths, parity), and no pickle:
everything a server needs to tokenise, run the graph and name its outputs.
Adapters (LoRA, DoRA, IA3) are merged first; methods that cannot be merged
are refused, since the graph must be one plain model.
"""

from __future__ import annotations

import inspect
import json
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from tunesmith._version import __version__
from tunesmith.config.specs import all_task_specs
from tunesmith.data.batching import Collator
from tunesmith.deploy.onnx_runtime import (
    PARITY_ATOL,
    Parity,
    check_parity,
    import_onnx_package,
    latency_pair,
    model_positions,
    model_vocab,
    random_inputs,
    require_onnx,
)
from tunesmith.deploy.plain import plain_model
from tunesmith.errors import ConfigError, ModelError
from tunesmith.methods.base import METHODS
from tunesmith.models.folders import write_new_folder
from tunesmith.models.loading import checkpoint_manifest, max_positions
from tunesmith.runs.load import load_checkpoint
from tunesmith.tasks.encoding import effective_limit

ONNX_FILE = "model.onnx"
#: What a server needs besides the graph and the tokenizer (labels, inputs, lengths).
INFO_FILE = "onnx.json"
DEFAULT_OPSET = 18
#: LayerNormalization is one operator from opset 17 on; older opsets split it up.
MIN_OPSET = 17
#: A protobuf file holds at most 2 GiB: bigger graphs keep their weights in ``model.onnx.data``.
_INLINE_WEIGHTS_LIMIT = 2**31 - 2**27
#: Exporter warnings that say nothing about the exported graph (names of shared dynamic
#: axes, a deprecation inside torch's own pytree code).
_EXPORTER_NOISE = (r"# The axis name: .* will not be used", r".*isinstance\(treespec, LeafSpec\)")


@dataclass
class OnnxExport:
    """What ``export_onnx`` wrote: the folder, the graph file and what it was checked for."""

    folder: Path
    model_file: Path
    task: str
    input_names: list[str]
    opset: int
    parity: Parity | None
    #: The content of ``onnx.json``.
    info: dict[str, Any]
    #: The model the graph was exported from (for timing it without loading it again).
    served: ServedModel = field(repr=False)


# -- export -------------------------------------------------------------------------------------
def export_onnx(
    checkpoint: str | Path,
    output: str | Path,
    *,
    opset: int = DEFAULT_OPSET,
    check: bool = True,
    atol: float = PARITY_ATOL,
    trust_remote_code: bool = False,
    allow_unsafe_weights: bool = False,
) -> OnnxExport:
    """Write ``checkpoint`` as a new folder with ``model.onnx`` and what serving it needs.

    The graph has dynamic batch and sequence axes and float32 weights. With
    ``check`` the parity check runs before the folder appears, and a graph
    that does not reproduce the model is never written.

    Raises:
        ConfigError: ``output`` exists, the task or method cannot be exported,
            ``opset`` is too old, or the ONNX packages are missing.
        ModelError: The checkpoint cannot be loaded, or the parity check failed.
    """
    output = Path(output)
    if output.exists():
        raise ConfigError(f"export --format onnx: {output} already exists; choose a new folder")
    if opset < MIN_OPSET:
        raise ConfigError(
            f"export --format onnx: opset {opset} is too old; use {MIN_OPSET} or newer"
        )
    require_onnx()
    onnx = import_onnx_package("onnx")
    served = load_served_model(
        checkpoint, trust_remote_code=trust_remote_code, allow_unsafe_weights=allow_unsafe_weights
    )
    model, tokenizer = served.model, served.tokenizer
    names = input_names(model, tokenizer)
    written: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        graph = tmp / ONNX_FILE
        export_graph(model, names, graph, opset=opset)
        onnx.checker.check_model(str(graph))
        parity = None
        if check:
            parity = check_parity(model, graph, names, atol=atol, padding_side=served.padding_side)
            if not parity.passed:
                raise ModelError(
                    "export --format onnx: the ONNX graph does not reproduce the model "
                    f"({_worst_case(parity)}); nothing was written"
                )
        tokenizer.save_pretrained(tmp)
        model.config.save_pretrained(tmp)
        info = served.info(names, opset, parity)
        (tmp / INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        written.update(parity=parity, info=info)

    write_new_folder(output, write)
    return OnnxExport(
        folder=output,
        model_file=output / ONNX_FILE,
        task=served.task.name,
        input_names=names,
        opset=opset,
        parity=written["parity"],
        info=written["info"],
        served=served,
    )


@dataclass
class ServedModel:
    """A checkpoint as it is served: one plain model (adapters merged) in float32 eval mode."""

    model: nn.Module
    tokenizer: Any
    task: Any
    labels: list[str]
    #: The checkpoint's config (its data section says where its splits come from).
    cfg: Any
    #: Length training truncated to (and the model's position table, if smaller).
    max_length: int
    #: Method the adapters were merged from (None: the checkpoint was a plain model).
    merged_from: str | None

    @property
    def padding_side(self) -> str:
        return str(self.tokenizer.padding_side)

    def info(self, names: Sequence[str], opset: int, parity: Parity | None) -> dict[str, Any]:
        """``onnx.json``: how to feed the graph and read its output, without tunesmith."""
        per_token = self.task.name == "token_classification"
        info: dict[str, Any] = {
            "format": "onnx",
            "file": ONNX_FILE,
            "task": self.task.name,
            "labels": self.labels,
            "id2label": {str(i): lab for i, lab in enumerate(self.labels)},
            "input_names": list(names),
            "output_names": ["logits"],
            "logits_axes": ["batch", "sequence", "label"] if per_token else ["batch", "label"],
            "max_length": self.max_length,
            "max_positions": max_positions(self.model.config.to_dict()),
            "padding_side": self.padding_side,
            "dtype": "float32",
            "opset": opset,
            "merged_from": self.merged_from,
            "tunesmith_version": __version__,
            "parity": parity.as_dict() if parity is not None else None,
        }
        if per_token:
            info["word_tags"] = "the tag of a word is the one predicted at its first sub-token"
        return info


def load_served_model(
    checkpoint: str | Path, *, trust_remote_code: bool = False, allow_unsafe_weights: bool = False
) -> ServedModel:
    """Load a classification checkpoint as the one plain model an export serves.

    The task is checked on the manifest before any weights load.

    Raises:
        ConfigError: The task is not a classification, or the method cannot be merged.
        ModelError: The folder is no loadable checkpoint.
    """

    manifest = checkpoint_manifest(checkpoint)
    check_task(str(manifest.get("task", "")))
    cfg, task, model, tokenizer, labels = load_checkpoint(
        checkpoint, trust_remote_code=trust_remote_code, allow_unsafe_weights=allow_unsafe_weights
    )
    model = plain_model(cfg.method.name, model, "export --format onnx")
    return ServedModel(
        cfg=cfg,
        model=model.float().cpu().eval(),
        tokenizer=tokenizer,
        task=task,
        labels=labels,
        max_length=effective_limit(tokenizer, cfg.data.max_length),
        merged_from=cfg.method.name if METHODS.get(cfg.method.name).saves_adapter else None,
    )


def check_task(task: str) -> None:
    """Refuse tasks whose model is not a single encoder pass with a ``logits`` output.

    Raises:
        ConfigError: Naming the task and the ones that can be exported.
    """
    exportable = [spec.name for spec in all_task_specs() if spec.onnx_export]
    if task not in exportable:
        raise ConfigError(
            f"export --format onnx: task '{task}' cannot be exported to ONNX (only "
            f"{' and '.join(exportable)}, whose model is one pass with one logits output); "
            "export it without --format onnx"
        )


def input_names(model: nn.Module, tokenizer: Any) -> list[str]:
    """The tokenizer's outputs that the model's ``forward`` takes, in the tokenizer's order.

    Why not a fixed list: BERT takes ``token_type_ids``, RoBERTa and DistilBERT do not.
    """
    accepted = inspect.signature(model.forward).parameters
    return [name for name in tokenizer.model_input_names if name in accepted]


def export_graph(model: nn.Module, names: Sequence[str], path: Path, *, opset: int) -> Path:
    """Export ``model`` to ``path`` with torch's dynamo exporter, batch and sequence dynamic.

    Why dynamo rather than the TorchScript tracer: ``torch.export`` records the
    shape conditions it relies on instead of freezing traced Python branches
    (the tracer warns about several in BERT's attention mask code), and it is
    the exporter torch maintains. The example batch is 2 x 16 with padding,
    so neither axis is specialised to 1 and the mask path is the padded one.
    """
    example = random_inputs(
        names, 2, min(16, model_positions(model)), vocab_size=model_vocab(model)
    )
    axes = {name: {0: "batch", 1: "sequence"} for name in names}
    inline = sum(p.numel() * p.element_size() for p in model.parameters()) < _INLINE_WEIGHTS_LIMIT
    # The exporter lists the vision operators it skips when torchvision is absent.
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)
    with warnings.catch_warnings():
        for message in _EXPORTER_NOISE:
            warnings.filterwarnings("ignore", message=message)
        torch.onnx.export(
            model,
            (),
            str(path),
            kwargs=example,
            input_names=list(names),
            output_names=["logits"],
            dynamic_shapes=axes,
            opset_version=opset,
            dynamo=True,
            external_data=not inline,
            verbose=False,
        )
    return path


def _worst_case(parity: Parity) -> str:
    """The failed parity case that is furthest off, in words."""
    worst = max(parity.cases, key=lambda c: c["max_abs_diff"])
    where = f"batch {worst['batch']}, length {worst['length']}"
    if "error" in worst:
        return f"onnxruntime at {where}: {worst['error']}"
    return f"max |onnx - pytorch| {worst['max_abs_diff']:.3g} > atol {parity.atol:g} at {where}"


# -- latency --------------------------------------------------------------------------------------
def onnx_latency(
    checkpoint: str | Path | ServedModel,
    onnx_file: str | Path,
    texts: Sequence[str] | None = None,
    *,
    records: Sequence[dict[str, Any]] | None = None,
    trust_remote_code: bool = False,
    allow_unsafe_weights: bool = False,
    **timing: Any,
) -> dict[str, Any]:
    """p50 latency at batch 1 and throughput at a batch size: PyTorch fp32 vs onnxruntime.

    Both run the same tokenised ``texts``, or data ``records`` of the task
    (a test split: real lengths), encoded as the task encodes them,
    turn by turn on every batch (``forward_latency``), with the same number
    of threads, so the ratio holds on a busy machine. PyTorch is the served
    model, adapters merged, as the graph was exported from it. ``timing``:
    ``latency_pair``'s batch size, batches, warm-up, threads, device and level.

    Returns:
        ``{"device", "threads", "level", "latency_bs1": {...}, "throughput": {...}}``,
        the last two with a ``Latency`` dict per runtime (``pytorch``, ``onnxruntime``).
    """
    if (texts is None) == (records is None):
        raise ConfigError("onnx_latency: give texts or records, not both")
    served = (
        checkpoint
        if isinstance(checkpoint, ServedModel)
        else load_served_model(
            checkpoint,
            trust_remote_code=trust_remote_code,
            allow_unsafe_weights=allow_unsafe_weights,
        )
    )
    if records is None:
        records = served.task.text_records(list(texts or []))
    features = served.task.encode(records, served.tokenizer, None)
    collator = Collator(served.tokenizer.pad_token_id, served.padding_side)
    return latency_pair(served.model, onnx_file, features, collator, **timing)
