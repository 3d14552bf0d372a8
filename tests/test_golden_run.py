"""Behaviour is pinned: a seeded tiny run gives the recorded losses, LRs, metrics and weights.

A refactor (moving modules, reshaping the loop) must not change a single number.
The expected values below were recorded before the layered restructuring on an
AVX2 CPU with one thread. On a CPU of the recorded capability every float and
the weights' digest must be identical (bit for bit); on another capability the
matmul kernels round differently, so the floats are compared within 1e-4
relative and the digest is not compared.

To re-record after an intended change of behaviour, run
``python tests/test_golden_run.py`` and paste its output over ``EXPECTED``.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from conftest import build_tiny_bert, tiny_config, toy_rows, write_csv

#: Keys that measure the machine, not the training.
MACHINE_KEYS = {"tokens_per_s", "rss_mb", "samples_per_s", "time", "elapsed_s", "seconds"}

RUNS: dict[str, dict[str, Any]] = {
    "full_llrd": {
        "method": {"name": "full", "llrd": 0.8},
        "optim": {"lr": 2e-3, "warmup_ratio": 0.1, "scheduler": "cosine"},
        "train": {"epochs": 2, "eval_steps": 4, "grad_accum": 2, "batch_size": 8},
    },
    "lora": {
        "method": {"name": "lora", "r": 4},
        "train": {"epochs": 2, "eval_steps": 5},
    },
}


def _record(name: str, root: Path) -> dict[str, Any]:
    """Train one seeded tiny run; its metric lines (machine keys dropped) and weights digest."""
    from safetensors.torch import load_file

    from tunesmith.api import train
    from tunesmith.config import Config

    model = build_tiny_bert(root / "model")
    data = write_csv(root / "toy.csv", toy_rows(64))
    cfg = tiny_config(model, data, root / "run", **RUNS[name])
    cfg["train"]["log_steps"] = 1
    result = train(Config.from_dict(cfg), progress=False)
    lines = []
    for line in (result.output_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        lines.append(
            {
                k: v
                for k, v in sorted(rec.items())
                if k not in MACHINE_KEYS and not k.startswith(("time", "rss", "mem"))
            }
        )
    digest = hashlib.sha256()
    for folder in ("final",):
        for file in sorted((result.output_dir / folder).glob("*.safetensors")):
            tensors = load_file(file)
            for key in sorted(tensors):
                digest.update(key.encode())
                digest.update(tensors[key].contiguous().numpy().tobytes())
    return {"lines": lines, "weights_sha256": digest.hexdigest()}


def _same(got: Any, want: Any, exact: bool, where: str) -> None:
    if isinstance(want, dict):
        assert sorted(got) == sorted(want), where
        for key in want:
            _same(got[key], want[key], exact, f"{where}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), where
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _same(g, w, exact, f"{where}[{i}]")
    elif isinstance(want, float) and not exact:
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), where
    else:
        assert got == want, where


@pytest.mark.parametrize("name", sorted(RUNS))
def test_seeded_run_is_unchanged(name: str, tmp_path: Path, one_thread) -> None:
    got = _record(name, tmp_path)
    want = EXPECTED[name]
    exact = torch.backends.cpu.get_cpu_capability() == EXPECTED_CAPABILITY
    _same(got["lines"], want["lines"], exact, name)
    if exact:
        assert got["weights_sha256"] == want["weights_sha256"]


EXPECTED_CAPABILITY = "AVX2"
EXPECTED: dict[str, Any] = {
    "full_llrd": {
        "lines": [
            {
                "epoch": 0.25,
                "grad_norm": 0.78554429,
                "grad_norm/block.0": 0.02738101,
                "grad_norm/block.1": 0.02773181,
                "grad_norm/embeddings": 0.4571715,
                "grad_norm/head": 0.63761687,
                "loss": 0.66906619,
                "lr/block.0": 0.00128,
                "lr/block.1": 0.0016,
                "lr/embeddings": 0.001024,
                "lr/head": 0.002,
                "split": "train",
                "step": 1,
            },
            {
                "epoch": 0.5,
                "grad_norm": 2.45147238,
                "grad_norm/block.0": 0.08543255,
                "grad_norm/block.1": 0.0956239,
                "grad_norm/embeddings": 1.41193628,
                "grad_norm/head": 1.99992752,
                "loss": 0.77154082,
                "lr/block.0": 0.00121662,
                "lr/block.1": 0.00152078,
                "lr/embeddings": 0.0009733,
                "lr/head": 0.00190097,
                "split": "train",
                "step": 2,
            },
            {
                "epoch": 0.75,
                "grad_norm": 2.1128326,
                "grad_norm/block.0": 0.07193423,
                "grad_norm/block.1": 0.07923167,
                "grad_norm/embeddings": 1.1861527,
                "grad_norm/head": 1.74517941,
                "loss": 0.7520808,
                "lr/block.0": 0.00103903,
                "lr/block.1": 0.00129879,
                "lr/embeddings": 0.00083123,
                "lr/head": 0.00162349,
                "split": "train",
                "step": 3,
            },
            {
                "epoch": 1.0,
                "grad_norm": 3.86205463,
                "grad_norm/block.0": 0.12872973,
                "grad_norm/block.1": 0.1352699,
                "grad_norm/embeddings": 2.14061141,
                "grad_norm/head": 3.20910883,
                "loss": 0.80412788,
                "lr/block.0": 0.00078241,
                "lr/block.1": 0.00097802,
                "lr/embeddings": 0.00062593,
                "lr/head": 0.00122252,
                "split": "train",
                "step": 4,
            },
            {
                "accuracy": 0.5,
                "epoch": 1.0,
                "f1/neg": 0.66666667,
                "f1/pos": 0.0,
                "loss": 0.69574165,
                "macro_f1": 0.33333333,
                "precision/neg": 0.5,
                "precision/pos": 0.0,
                "recall/neg": 1.0,
                "recall/pos": 0.0,
                "split": "validation",
                "step": 4,
                "support/neg": 3,
                "support/pos": 3,
            },
            {
                "epoch": 1.25,
                "grad_norm": 1.28266511,
                "grad_norm/block.0": 0.04292303,
                "grad_norm/block.1": 0.04334425,
                "grad_norm/embeddings": 0.71215355,
                "grad_norm/head": 1.0650568,
                "loss": 0.70611644,
                "lr/block.0": 0.00049759,
                "lr/block.1": 0.00062198,
                "lr/embeddings": 0.00039807,
                "lr/head": 0.00077748,
                "split": "train",
                "step": 5,
            },
            {
                "epoch": 1.5,
                "grad_norm": 1.79933806,
                "grad_norm/block.0": 0.06132974,
                "grad_norm/block.1": 0.06110704,
                "grad_norm/embeddings": 1.00639546,
                "grad_norm/head": 1.48905683,
                "loss": 0.7027216,
                "lr/block.0": 0.00024097,
                "lr/block.1": 0.00030121,
                "lr/embeddings": 0.00019277,
                "lr/head": 0.00037651,
                "split": "train",
                "step": 6,
            },
            {
                "epoch": 1.75,
                "grad_norm": 0.4421174,
                "grad_norm/block.0": 0.01544014,
                "grad_norm/block.1": 0.01525217,
                "grad_norm/embeddings": 0.24582103,
                "grad_norm/head": 0.36683619,
                "loss": 0.69547057,
                "lr/block.0": 6.338e-05,
                "lr/block.1": 7.922e-05,
                "lr/embeddings": 5.07e-05,
                "lr/head": 9.903e-05,
                "split": "train",
                "step": 7,
            },
            {
                "epoch": 2.0,
                "grad_norm": 0.75019924,
                "grad_norm/block.0": 0.0256471,
                "grad_norm/block.1": 0.02547459,
                "grad_norm/embeddings": 0.41551065,
                "grad_norm/head": 0.62357283,
                "loss": 0.68026009,
                "lr/block.0": 0.0,
                "lr/block.1": 0.0,
                "lr/embeddings": 0.0,
                "lr/head": 0.0,
                "split": "train",
                "step": 8,
            },
            {
                "accuracy": 0.5,
                "epoch": 2.0,
                "f1/neg": 0.0,
                "f1/pos": 0.66666667,
                "loss": 0.6959823,
                "macro_f1": 0.33333333,
                "precision/neg": 0.0,
                "precision/pos": 0.5,
                "recall/neg": 0.0,
                "recall/pos": 1.0,
                "split": "validation",
                "step": 8,
                "support/neg": 3,
                "support/pos": 3,
            },
        ],
        "weights_sha256": "180c2480c39a30bc1d2e09912df7aea59016147f2dbb80b330a5b822eb9a3881",
    },
    "lora": {
        "lines": [
            {
                "epoch": 0.25,
                "grad_norm": 0.23155397,
                "grad_norm/block.0": 0.00257052,
                "grad_norm/block.1": 0.0013096,
                "grad_norm/head": 0.231536,
                "loss": 0.71768421,
                "lr/block.0": 0.00192388,
                "lr/block.1": 0.00192388,
                "lr/head": 0.00192388,
                "split": "train",
                "step": 1,
            },
            {
                "epoch": 0.5,
                "grad_norm": 0.33742149,
                "grad_norm/block.0": 0.00492077,
                "grad_norm/block.1": 0.0021946,
                "grad_norm/head": 0.33737847,
                "loss": 0.73049146,
                "lr/block.0": 0.00170711,
                "lr/block.1": 0.00170711,
                "lr/head": 0.00170711,
                "split": "train",
                "step": 2,
            },
            {
                "epoch": 0.75,
                "grad_norm": 0.12669872,
                "grad_norm/block.0": 0.00190498,
                "grad_norm/block.1": 0.00119578,
                "grad_norm/head": 0.12667875,
                "loss": 0.67146218,
                "lr/block.0": 0.00138268,
                "lr/block.1": 0.00138268,
                "lr/head": 0.00138268,
                "split": "train",
                "step": 3,
            },
            {
                "epoch": 1.0,
                "grad_norm": 0.08538432,
                "grad_norm/block.0": 0.00338371,
                "grad_norm/block.1": 0.00198404,
                "grad_norm/head": 0.08529417,
                "loss": 0.67740498,
                "lr/block.0": 0.001,
                "lr/block.1": 0.001,
                "lr/head": 0.001,
                "split": "train",
                "step": 4,
            },
            {
                "epoch": 1.25,
                "grad_norm": 0.20912217,
                "grad_norm/block.0": 0.00256474,
                "grad_norm/block.1": 0.00107911,
                "grad_norm/head": 0.20910366,
                "loss": 0.7117005,
                "lr/block.0": 0.00061732,
                "lr/block.1": 0.00061732,
                "lr/head": 0.00061732,
                "split": "train",
                "step": 5,
            },
            {
                "accuracy": 0.5,
                "epoch": 1.25,
                "f1/neg": 0.66666667,
                "f1/pos": 0.0,
                "loss": 0.69835981,
                "macro_f1": 0.33333333,
                "precision/neg": 0.5,
                "precision/pos": 0.0,
                "recall/neg": 1.0,
                "recall/pos": 0.0,
                "split": "validation",
                "step": 5,
                "support/neg": 3,
                "support/pos": 3,
            },
            {
                "epoch": 1.5,
                "grad_norm": 0.13457239,
                "grad_norm/block.0": 0.00181183,
                "grad_norm/block.1": 0.00121247,
                "grad_norm/head": 0.13455473,
                "loss": 0.67268336,
                "lr/block.0": 0.00029289,
                "lr/block.1": 0.00029289,
                "lr/head": 0.00029289,
                "split": "train",
                "step": 6,
            },
            {
                "epoch": 1.75,
                "grad_norm": 0.32068556,
                "grad_norm/block.0": 0.00510255,
                "grad_norm/block.1": 0.00240496,
                "grad_norm/head": 0.32063594,
                "loss": 0.72378826,
                "lr/block.0": 7.612e-05,
                "lr/block.1": 7.612e-05,
                "lr/head": 7.612e-05,
                "split": "train",
                "step": 7,
            },
            {
                "epoch": 2.0,
                "grad_norm": 0.09058331,
                "grad_norm/block.0": 0.00208243,
                "grad_norm/block.1": 0.00261528,
                "grad_norm/head": 0.0905216,
                "loss": 0.67790699,
                "lr/block.0": 0.0,
                "lr/block.1": 0.0,
                "lr/head": 0.0,
                "split": "train",
                "step": 8,
            },
            {
                "accuracy": 0.5,
                "epoch": 2.0,
                "f1/neg": 0.66666667,
                "f1/pos": 0.0,
                "loss": 0.69820372,
                "macro_f1": 0.33333333,
                "precision/neg": 0.5,
                "precision/pos": 0.0,
                "recall/neg": 1.0,
                "recall/pos": 0.0,
                "split": "validation",
                "step": 8,
                "support/neg": 3,
                "support/pos": 3,
            },
        ],
        "weights_sha256": "53b997b14b31034670266409bac4390c815fd9f14dda579c544ebd4aaf579293",
    },
}


if __name__ == "__main__":  # re-record
    import pprint
    import tempfile

    torch.set_num_threads(1)
    out = {}
    for run in sorted(RUNS):
        with tempfile.TemporaryDirectory() as tmp:
            out[run] = _record(run, Path(tmp))
    print(f"EXPECTED_CAPABILITY = {torch.backends.cpu.get_cpu_capability()!r}")
    print("EXPECTED: dict[str, Any] = " + pprint.pformat(out, width=96, sort_dicts=True))
