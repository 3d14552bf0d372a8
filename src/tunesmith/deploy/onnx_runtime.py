"""Running an exported ONNX graph: onnxruntime sessions, parity with PyTorch, latency.

Why its own module: serving code and the checks need the runtime side
(sessions, runners that take the same keyword tensors as a transformers
model, random padded inputs) without the exporter; ``onnx_export`` writes the
graph and calls ``check_parity`` before the folder appears.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from tunesmith.data.batching import Collator
from tunesmith.errors import ConfigError, ModelError
from tunesmith.evaluation.speed import forward_latency, make_batches
from tunesmith.models.loading import first_line, max_positions

PARITY_ATOL = 1e-4
#: (batch, length) of the parity inputs; lengths above the model's positions are cut to them.
PARITY_SHAPES: tuple[tuple[int, int], ...] = ((1, 7), (4, 33), (2, 128))
#: onnxruntime's graph optimisation levels by name.
LEVELS = ("disable", "basic", "extended", "all")
DEVICES = ("cpu", "cuda")


@dataclass
class Parity:
    """How far onnxruntime's logits are from PyTorch's on random inputs.

    Attributes:
        atol: The largest absolute difference allowed.
        max_abs_diff: The largest absolute difference found, over all cases.
        passed: ``max_abs_diff <= atol``.
        provider: The onnxruntime execution provider compared.
        cases: ``{"batch", "length", "max_abs_diff"}`` for each input shape, and
            ``error`` where onnxruntime could not run it (the difference is then inf).
    """

    atol: float
    max_abs_diff: float
    passed: bool
    provider: str
    cases: list[dict[str, Any]] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# -- running the graph ---------------------------------------------------------------------------
def require_onnx() -> None:
    """Fail with the install line when the optional ONNX packages are missing.

    Raises:
        ConfigError: Naming the missing package.
    """
    for package in ("onnx", "onnxscript", "onnxruntime"):
        import_onnx_package(package)


def import_onnx_package(package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise ConfigError(
            f"ONNX export needs {package} (with onnx, onnxscript and onnxruntime): "
            "pip install 'tunesmith[onnx]'"
        ) from None


def ort_session(
    path: str | Path,
    *,
    device: str = "cpu",
    threads: int | None = None,
    level: str = "all",
    spin: bool = True,
) -> Any:
    """An onnxruntime session on ``device`` with graph optimisation ``level``.

    Args:
        path: The ``model.onnx`` file.
        device: ``cpu``, or ``cuda`` (needs the onnxruntime-gpu build).
        threads: Intra-op threads (None: onnxruntime's default, one per physical core).
        level: ``disable``, ``basic``, ``extended`` or ``all`` (onnxruntime's default).
        spin: Let idle worker threads busy-wait for the next run (onnxruntime's
            default, best for a server that does nothing else). Off when PyTorch
            runs in the same process in between: spinning threads take the
            cores its own threads need.

    Raises:
        ConfigError: Unknown device or level, or no CUDA provider in this onnxruntime.
    """
    ort = import_onnx_package("onnxruntime")
    if level not in LEVELS:
        raise ConfigError(f"unknown onnxruntime optimisation level '{level}'; use one of {LEVELS}")
    options = ort.SessionOptions()
    options.graph_optimization_level = {
        "disable": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[level]
    options.log_severity_level = 3  # errors only: no per-session notes on stderr
    if threads:
        options.intra_op_num_threads = threads
    if not spin:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    return ort.InferenceSession(str(path), sess_options=options, providers=providers(device))


def providers(device: str) -> list[str]:
    """onnxruntime execution providers for ``device``, CPU last as the fallback for odd ops.

    Raises:
        ConfigError: Unknown device, or ``cuda`` without onnxruntime's CUDA provider.
    """
    if device == "cpu":
        return ["CPUExecutionProvider"]
    if device != "cuda":
        raise ConfigError(f"unknown device '{device}'; use one of {DEVICES}")
    available = import_onnx_package("onnxruntime").get_available_providers()
    if "CUDAExecutionProvider" not in available:
        raise ConfigError(
            "this onnxruntime has no CUDAExecutionProvider (providers: "
            f"{', '.join(available)}); install onnxruntime-gpu to run ONNX models on a GPU"
        )
    return ["CUDAExecutionProvider", "CPUExecutionProvider"]


class OrtRunner:
    """An onnxruntime session called like a transformers model: keyword tensors in, logits out.

    Why: parity and latency then drive PyTorch and onnxruntime with the same
    code on the same batches (``forward_latency`` only needs ``eval`` and a call).
    """

    def __init__(self, session: Any) -> None:
        self.session = session
        self.names = [i.name for i in session.get_inputs()]

    def eval(self) -> OrtRunner:
        return self

    def __call__(self, **inputs: torch.Tensor) -> np.ndarray:
        feed = {name: inputs[name].detach().cpu().numpy() for name in self.names}
        return self.session.run(["logits"], feed)[0]


class TorchRunner:
    """A PyTorch model giving its logits on the host, as a server returns them.

    Why the copy to the host: on a GPU it waits for the result, so the time
    measured is the forward pass and not only its launch, as for onnxruntime.
    """

    def __init__(self, model: nn.Module, device: str = "cpu") -> None:
        self.model = model.to(device)
        self.device = torch.device(device)

    def eval(self) -> TorchRunner:
        self.model.eval()
        return self

    @torch.no_grad()
    def __call__(self, **inputs: torch.Tensor) -> np.ndarray:
        moved = {name: value.to(self.device) for name, value in inputs.items()}
        return self.model(**moved).logits.float().cpu().numpy()


# -- parity ---------------------------------------------------------------------------------------
def random_inputs(
    names: Sequence[str],
    batch: int,
    length: int,
    *,
    vocab_size: int,
    padding_side: str = "right",
    seed: int = 0,
) -> dict[str, torch.Tensor]:
    """Random token ids with a valid mask: the first row full, the others padded at random.

    Raises:
        ModelError: The model takes an input that is not text (no way to make it up).
    """
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, length), generator=gen)
    real = torch.randint(1, length + 1, (batch, 1), generator=gen)
    real[0] = length
    position = torch.arange(length).expand(batch, length)
    keep = position < real if padding_side == "right" else position >= length - real
    made = {
        "input_ids": ids,
        "attention_mask": keep.long(),
        "token_type_ids": torch.zeros_like(ids),
    }
    unknown = [name for name in names if name not in made]
    if unknown:
        raise ModelError(f"export --format onnx: the model takes {unknown[0]!r}, not a text input")
    return {name: made[name] for name in names}


def check_parity(
    model: nn.Module,
    onnx_file: str | Path,
    names: Sequence[str],
    *,
    shapes: Sequence[tuple[int, int]] = PARITY_SHAPES,
    atol: float = PARITY_ATOL,
    padding_side: str = "right",
    device: str = "cpu",
    seed: int = 0,
) -> Parity:
    """Largest logit difference, PyTorch vs onnxruntime, over random inputs of several shapes.

    Lengths beyond the model's position table are cut to it. Each shape is a
    different batch size and length, so a graph whose axes were fixed at
    export fails here instead of in serving: a case onnxruntime cannot run
    counts as an infinite difference, with its ``error``.
    """
    session = ort_session(onnx_file, device=device, threads=torch.get_num_threads(), spin=False)
    runners = (TorchRunner(model, device).eval(), OrtRunner(session))
    limit = model_positions(model)
    cases = []
    for i, (batch, length) in enumerate(shapes):
        length = min(length, limit)
        inputs = random_inputs(
            names,
            batch,
            length,
            vocab_size=model_vocab(model),
            padding_side=padding_side,
            seed=seed + i,
        )
        case: dict[str, Any] = {"batch": batch, "length": length, "max_abs_diff": float("inf")}
        expected = runners[0](**inputs)
        try:
            got = runners[1](**inputs)
        except _ort_errors() as err:  # a fixed axis, or an op the runtime cannot run
            case["error"] = first_line(err)
        else:
            if got.shape == expected.shape:
                case["max_abs_diff"] = float(np.abs(expected - got).max())
            else:
                case["error"] = f"logits of shape {got.shape}, expected {expected.shape}"
        cases.append(case)
    worst = max(c["max_abs_diff"] for c in cases)
    return Parity(
        atol=atol,
        max_abs_diff=worst,
        passed=worst <= atol,
        provider=session.get_providers()[0],
        cases=cases,
    )


def _ort_errors() -> tuple[type[Exception], ...]:
    """What ``InferenceSession.run`` raises on inputs the graph refuses (not RuntimeErrors)."""
    from onnxruntime.capi import onnxruntime_pybind11_state as state

    return (state.InvalidArgument, state.Fail, state.RuntimeException, state.NotImplemented)


def model_positions(model: nn.Module) -> int:
    """The longest input the model embeds (a large bound for models without a position table)."""
    return max_positions(model.config.to_dict()) or 4096


def model_vocab(model: nn.Module) -> int:
    return int(model.config.vocab_size)


def latency_pair(
    model: nn.Module,
    onnx_file: str | Path,
    features: Sequence[Mapping[str, Any]],
    collator: Collator,
    *,
    batch_size: int = 32,
    batches: int = 20,
    warmup: int = 2,
    threads: int | None = None,
    device: str = "cpu",
    level: str = "all",
) -> dict[str, Any]:
    """``onnx_latency`` on already encoded features (see there)."""
    held = torch.get_num_threads()
    threads = threads or held
    torch.set_num_threads(threads)
    try:
        session = ort_session(onnx_file, device=device, threads=threads, level=level, spin=False)
        onnx_runner = OrtRunner(session)
        runners = {"pytorch": TorchRunner(model, device), "onnxruntime": onnx_runner}

        def graph_inputs(batch: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
            return {name: batch[name] for name in onnx_runner.names}

        out: dict[str, Any] = {"device": device, "threads": threads, "level": level}
        for key, size in (("latency_bs1", 1), ("throughput", batch_size)):
            timed = make_batches(features, collator, size, batches)
            times = forward_latency(runners, timed, graph_inputs, warmup=warmup)  # type: ignore[arg-type]
            out[key] = {name: latency.as_dict() for name, latency in times.items()}
        return out
    finally:
        torch.set_num_threads(held)
