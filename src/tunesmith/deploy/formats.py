"""The deployment formats of ``tunesmith export``, in one table.

Why a table: the command reads ``--format`` and ``--quantize`` once, finds the
format here and calls its exporter, which returns what to print; a new format
is one entry (its ``--quantize`` values and its exporter), not a new branch
in the command. ``--quantize int8`` without ``--format`` is the int8
checkpoint format, as it always was.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from tunesmith.deploy.gguf_export import DEFAULT_CHECK_PROMPTS, export_gguf, summary
from tunesmith.deploy.gguf_write import DEFAULT_QUANTIZE, QUANTIZE_CHOICES
from tunesmith.deploy.reports import int8_export_report, onnx_export_report
from tunesmith.errors import ConfigError
from tunesmith.evaluation.evaluator import EvalOptions


@dataclass(frozen=True)
class ExportRequest:
    """The options of one ``export`` command (each format reads those it uses)."""

    quantize: str | None = None
    data: str | None = None
    split: str | None = None
    options: EvalOptions = field(default_factory=EvalOptions)
    check: bool = True
    check_prompts: int = DEFAULT_CHECK_PROMPTS


@dataclass(frozen=True)
class ExportFormat:
    """One format: the ``--quantize`` values it takes and the exporter that prints its report."""

    name: str
    #: Accepted ``--quantize`` values (empty: none).
    quantize: tuple[str, ...]
    #: ``--quantize`` when none is given (None: not quantized).
    default_quantize: str | None
    run: Callable[[Path, Path, ExportRequest], str]


def _int8(checkpoint: Path, output: Path, req: ExportRequest) -> str:
    return int8_export_report(
        checkpoint, output, data=req.data, split=req.split, options=req.options
    )


def _onnx(checkpoint: Path, output: Path, req: ExportRequest) -> str:
    return onnx_export_report(
        checkpoint, output, data=req.data, split=req.split, options=req.options
    )


def _gguf(checkpoint: Path, output: Path, req: ExportRequest) -> str:
    done = export_gguf(
        checkpoint,
        output,
        quantize=req.quantize or DEFAULT_QUANTIZE,
        check=req.check,
        check_prompts_n=req.check_prompts,
        threads=req.options.threads,
    )
    return summary(done)


#: ``--format`` name -> format; ``int8`` is chosen by ``--quantize int8`` alone.
FORMATS = {
    "int8": ExportFormat("int8", ("int8",), None, _int8),
    "onnx": ExportFormat("onnx", (), None, _onnx),
    "gguf": ExportFormat("gguf", QUANTIZE_CHOICES, DEFAULT_QUANTIZE, _gguf),
}
#: Formats named with ``--format`` (int8 is a ``--quantize`` of the checkpoint format).
NAMED = ("onnx", "gguf")


def export_format(fmt: str | None, quantize: str | None) -> ExportFormat | None:
    """The format ``--format`` and ``--quantize`` ask for (None: a plain copy or merge).

    Raises:
        ConfigError: An unknown format or quantization, or one the format does not take.
    """
    if fmt is None:
        if quantize is None:
            return None
        if quantize not in FORMATS["int8"].quantize:
            raise ConfigError(
                f"export: unknown --quantize '{quantize}'; use int8 (or --format gguf "
                f"--quantize {'|'.join(QUANTIZE_CHOICES)})"
            )
        return FORMATS["int8"]
    if fmt not in NAMED:
        raise ConfigError(f"export: unknown --format '{fmt}'; use {' or '.join(NAMED)}")
    chosen = FORMATS[fmt]
    if quantize is not None and quantize not in chosen.quantize:
        if not chosen.quantize:
            raise ConfigError(
                f"export: --format {fmt} takes no --quantize; give --quantize int8 or "
                f"--format {fmt}, not both"
            )
        raise ConfigError(
            f"export: --format {fmt} takes --quantize {', '.join(chosen.quantize)}, "
            f"not '{quantize}'"
        )
    return chosen
