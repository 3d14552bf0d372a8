"""Behaviour is pinned: a seeded tiny run gives the recorded losses, LRs, metrics and weights.

A refactor (moving modules, reshaping the loop) must not change a single number.
The expected values below were recorded on an AVX2 CPU with one thread (last
when the length-sorting window became bounded by the data size, which makes
these 57-example runs use random batches), and again on an AVX-512 CPU. On
a CPU of a recorded capability every float and the weights' digest must be
identical (bit for bit); on another capability the matmul kernels round
differently, so the floats are compared with the AVX2 recording within 1e-4
relative and the digest is not compared.

To re-record after an intended change of behaviour, run
``python tests/test_golden_run.py`` on each CPU kind and paste its output over
``EXPECTED`` (AVX2) or ``EXPECTED_AVX512``.
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
    from tunesmith.config.root import Config

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
    recorded = RECORDED.get(str(torch.backends.cpu.get_cpu_capability()))
    exact = recorded is not None
    want = recorded[name] if exact else want
    _same(got["lines"], want["lines"], exact, name)
    if exact:
        assert got["weights_sha256"] == want["weights_sha256"]


EXPECTED_CAPABILITY = "AVX2"
EXPECTED: dict[str, Any] = {
    "full_llrd": {
        "lines": [
            {
                "epoch": 0.25,
                "grad_norm": 1.59739026,
                "grad_norm/block.0": 0.05537413,
                "grad_norm/block.1": 0.05614143,
                "grad_norm/embeddings": 0.92993283,
                "grad_norm/head": 1.29640365,
                "loss": 0.65286732,
                "lr/block.0": 0.00128,
                "lr/block.1": 0.0016,
                "lr/embeddings": 0.001024,
                "lr/head": 0.002,
                "split": "train",
                "step": 1,
            },
            {
                "epoch": 0.5,
                "grad_norm": 2.45170012,
                "grad_norm/block.0": 0.08560711,
                "grad_norm/block.1": 0.0956846,
                "grad_norm/embeddings": 1.41200161,
                "grad_norm/head": 2.0001502,
                "loss": 0.77145278,
                "lr/block.0": 0.00121662,
                "lr/block.1": 0.00152078,
                "lr/embeddings": 0.0009733,
                "lr/head": 0.00190097,
                "split": "train",
                "step": 2,
            },
            {
                "epoch": 0.75,
                "grad_norm": 3.85906583,
                "grad_norm/block.0": 0.13078539,
                "grad_norm/block.1": 0.14618227,
                "grad_norm/embeddings": 2.15952206,
                "grad_norm/head": 3.19223738,
                "loss": 0.85726666,
                "lr/block.0": 0.00103903,
                "lr/block.1": 0.00129879,
                "lr/embeddings": 0.00083123,
                "lr/head": 0.00162349,
                "split": "train",
                "step": 3,
            },
            {
                "epoch": 1.0,
                "grad_norm": 2.9088517,
                "grad_norm/block.0": 0.09678986,
                "grad_norm/block.1": 0.10389478,
                "grad_norm/embeddings": 1.60832798,
                "grad_norm/head": 2.41961503,
                "loss": 0.78337736,
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
                "loss": 0.70349344,
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
                "grad_norm": 0.12754414,
                "grad_norm/block.0": 0.00561845,
                "grad_norm/block.1": 0.00559006,
                "grad_norm/embeddings": 0.07097383,
                "grad_norm/head": 0.10567596,
                "loss": 0.68545675,
                "lr/block.0": 0.00049759,
                "lr/block.1": 0.00062198,
                "lr/embeddings": 0.00039807,
                "lr/head": 0.00077748,
                "split": "train",
                "step": 5,
            },
            {
                "epoch": 1.5,
                "grad_norm": 2.72487579,
                "grad_norm/block.0": 0.0910302,
                "grad_norm/block.1": 0.09160341,
                "grad_norm/embeddings": 1.51004577,
                "grad_norm/head": 2.26451588,
                "loss": 0.6632055,
                "lr/block.0": 0.00024097,
                "lr/block.1": 0.00030121,
                "lr/embeddings": 0.00019277,
                "lr/head": 0.00037651,
                "split": "train",
                "step": 6,
            },
            {
                "epoch": 1.75,
                "grad_norm": 3.40262685,
                "grad_norm/block.0": 0.1127613,
                "grad_norm/block.1": 0.11327051,
                "grad_norm/embeddings": 1.86623657,
                "grad_norm/head": 2.84068394,
                "loss": 0.71818459,
                "lr/block.0": 6.338e-05,
                "lr/block.1": 7.922e-05,
                "lr/embeddings": 5.07e-05,
                "lr/head": 9.903e-05,
                "split": "train",
                "step": 7,
            },
            {
                "epoch": 2.0,
                "grad_norm": 1.44030722,
                "grad_norm/block.0": 0.0478876,
                "grad_norm/block.1": 0.04802025,
                "grad_norm/embeddings": 0.78952277,
                "grad_norm/head": 1.20272171,
                "loss": 0.69990411,
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
                "f1/neg": 0.66666667,
                "f1/pos": 0.0,
                "loss": 0.69312119,
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
        "weights_sha256": "57aff45c46f36da5235278dbbb6e678c78449c3f9813041dfb59bdd01f0a1c7c",
    },
    "lora": {
        "lines": [
            {
                "epoch": 0.25,
                "grad_norm": 0.22435629,
                "grad_norm/block.0": 0.00309138,
                "grad_norm/block.1": 0.00216844,
                "grad_norm/head": 0.22432451,
                "loss": 0.65286738,
                "lr/block.0": 0.00192388,
                "lr/block.1": 0.00192388,
                "lr/head": 0.00192388,
                "split": "train",
                "step": 1,
            },
            {
                "epoch": 0.5,
                "grad_norm": 0.12611925,
                "grad_norm/block.0": 0.00188036,
                "grad_norm/block.1": 0.00059804,
                "grad_norm/head": 0.12610382,
                "loss": 0.70271397,
                "lr/block.0": 0.00170711,
                "lr/block.1": 0.00170711,
                "lr/head": 0.00170711,
                "split": "train",
                "step": 2,
            },
            {
                "epoch": 0.75,
                "grad_norm": 0.35595628,
                "grad_norm/block.0": 0.00525697,
                "grad_norm/block.1": 0.00193278,
                "grad_norm/head": 0.35591221,
                "loss": 0.73833972,
                "lr/block.0": 0.00138268,
                "lr/block.1": 0.00138268,
                "lr/head": 0.00138268,
                "split": "train",
                "step": 3,
            },
            {
                "epoch": 1.0,
                "grad_norm": 0.30721788,
                "grad_norm/block.0": 0.00400528,
                "grad_norm/block.1": 0.00115883,
                "grad_norm/head": 0.30718958,
                "loss": 0.73005433,
                "lr/block.0": 0.001,
                "lr/block.1": 0.001,
                "lr/head": 0.001,
                "split": "train",
                "step": 4,
            },
            {
                "epoch": 1.25,
                "grad_norm": 0.00771328,
                "grad_norm/block.0": 0.00197893,
                "grad_norm/block.1": 0.0015832,
                "grad_norm/head": 0.00728505,
                "loss": 0.68532562,
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
                "loss": 0.70153936,
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
                "grad_norm": 0.33694047,
                "grad_norm/block.0": 0.00308868,
                "grad_norm/block.1": 0.00135138,
                "grad_norm/head": 0.3369236,
                "loss": 0.63607723,
                "lr/block.0": 0.00029289,
                "lr/block.1": 0.00029289,
                "lr/head": 0.00029289,
                "split": "train",
                "step": 6,
            },
            {
                "epoch": 1.75,
                "grad_norm": 0.57464101,
                "grad_norm/block.0": 0.00613143,
                "grad_norm/block.1": 0.00328518,
                "grad_norm/head": 0.57459891,
                "loss": 0.76705962,
                "lr/block.0": 7.612e-05,
                "lr/block.1": 7.612e-05,
                "lr/head": 7.612e-05,
                "split": "train",
                "step": 7,
            },
            {
                "epoch": 2.0,
                "grad_norm": 0.30056179,
                "grad_norm/block.0": 0.00326778,
                "grad_norm/block.1": 0.00185066,
                "grad_norm/head": 0.30053833,
                "loss": 0.72758899,
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
                "loss": 0.70140266,
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
        "weights_sha256": "7125d06818ed579d5e1a5476a96e6f04f85e010b57aa461ecd9e83e5035daac2",
    },
}


#: The same runs recorded on an AVX-512 CPU (one thread): its kernels round differently
#: from AVX2's, so each capability with a recording is compared bit for bit.
EXPECTED_AVX512: dict[str, Any] = {
    "full_llrd": {
        "lines": [
            {
                "epoch": 0.25,
                "grad_norm": 1.58969667,
                "grad_norm/block.0": 0.05508069,
                "grad_norm/block.1": 0.0558318,
                "grad_norm/embeddings": 0.92461693,
                "grad_norm/head": 1.29076254,
                "loss": 0.65277481,
                "lr/block.0": 0.00128,
                "lr/block.1": 0.0016,
                "lr/embeddings": 0.001024,
                "lr/head": 0.002,
                "split": "train",
                "step": 1,
            },
            {
                "epoch": 0.5,
                "grad_norm": 2.46710255,
                "grad_norm/block.0": 0.08613157,
                "grad_norm/block.1": 0.09634694,
                "grad_norm/embeddings": 1.42188668,
                "grad_norm/head": 2.01199698,
                "loss": 0.77179289,
                "lr/block.0": 0.00121662,
                "lr/block.1": 0.00152078,
                "lr/embeddings": 0.0009733,
                "lr/head": 0.00190097,
                "split": "train",
                "step": 2,
            },
            {
                "epoch": 0.75,
                "grad_norm": 3.85503942,
                "grad_norm/block.0": 0.13062608,
                "grad_norm/block.1": 0.14603703,
                "grad_norm/embeddings": 2.1584208,
                "grad_norm/head": 3.18812776,
                "loss": 0.85740966,
                "lr/block.0": 0.00103903,
                "lr/block.1": 0.00129879,
                "lr/embeddings": 0.00083123,
                "lr/head": 0.00162349,
                "split": "train",
                "step": 3,
            },
            {
                "epoch": 1.0,
                "grad_norm": 2.89102845,
                "grad_norm/block.0": 0.09633047,
                "grad_norm/block.1": 0.10340123,
                "grad_norm/embeddings": 1.6015712,
                "grad_norm/head": 2.40271592,
                "loss": 0.78341398,
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
                "loss": 0.70342978,
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
                "grad_norm": 0.12580346,
                "grad_norm/block.0": 0.00563308,
                "grad_norm/block.1": 0.00560936,
                "grad_norm/embeddings": 0.07151295,
                "grad_norm/head": 0.10319501,
                "loss": 0.68536055,
                "lr/block.0": 0.00049759,
                "lr/block.1": 0.00062198,
                "lr/embeddings": 0.00039807,
                "lr/head": 0.00077748,
                "split": "train",
                "step": 5,
            },
            {
                "epoch": 1.5,
                "grad_norm": 2.7398952,
                "grad_norm/block.0": 0.09148244,
                "grad_norm/block.1": 0.09209359,
                "grad_norm/embeddings": 1.51975965,
                "grad_norm/head": 2.2760725,
                "loss": 0.66330177,
                "lr/block.0": 0.00024097,
                "lr/block.1": 0.00030121,
                "lr/embeddings": 0.00019277,
                "lr/head": 0.00037651,
                "split": "train",
                "step": 6,
            },
            {
                "epoch": 1.75,
                "grad_norm": 3.40018017,
                "grad_norm/block.0": 0.11269807,
                "grad_norm/block.1": 0.11326793,
                "grad_norm/embeddings": 1.86757648,
                "grad_norm/head": 2.83687377,
                "loss": 0.71808088,
                "lr/block.0": 6.338e-05,
                "lr/block.1": 7.922e-05,
                "lr/embeddings": 5.07e-05,
                "lr/head": 9.903e-05,
                "split": "train",
                "step": 7,
            },
            {
                "epoch": 2.0,
                "grad_norm": 1.43759184,
                "grad_norm/block.0": 0.04787816,
                "grad_norm/block.1": 0.04802438,
                "grad_norm/embeddings": 0.7902,
                "grad_norm/head": 1.19902277,
                "loss": 0.69972277,
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
                "f1/neg": 0.66666667,
                "f1/pos": 0.0,
                "loss": 0.6932013,
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
        "weights_sha256": "401cf0739ed1304b056542e7f2fc42aae5af36c0dff1e30b0a9bfb16a5f96d41",
    },
    "lora": {
        "lines": [
            {
                "epoch": 0.25,
                "grad_norm": 0.22353727,
                "grad_norm/block.0": 0.00308348,
                "grad_norm/block.1": 0.00216219,
                "grad_norm/head": 0.22350554,
                "loss": 0.65277487,
                "lr/block.0": 0.00192388,
                "lr/block.1": 0.00192388,
                "lr/head": 0.00192388,
                "split": "train",
                "step": 1,
            },
            {
                "epoch": 0.5,
                "grad_norm": 0.12754395,
                "grad_norm/block.0": 0.0018909,
                "grad_norm/block.1": 0.00060309,
                "grad_norm/head": 0.1275285,
                "loss": 0.70276189,
                "lr/block.0": 0.00170711,
                "lr/block.1": 0.00170711,
                "lr/head": 0.00170711,
                "split": "train",
                "step": 2,
            },
            {
                "epoch": 0.75,
                "grad_norm": 0.35628037,
                "grad_norm/block.0": 0.00525476,
                "grad_norm/block.1": 0.00193871,
                "grad_norm/head": 0.35623634,
                "loss": 0.73853248,
                "lr/block.0": 0.00138268,
                "lr/block.1": 0.00138268,
                "lr/head": 0.00138268,
                "split": "train",
                "step": 3,
            },
            {
                "epoch": 1.0,
                "grad_norm": 0.30670634,
                "grad_norm/block.0": 0.00402005,
                "grad_norm/block.1": 0.00115437,
                "grad_norm/head": 0.30667782,
                "loss": 0.73015366,
                "lr/block.0": 0.001,
                "lr/block.1": 0.001,
                "lr/head": 0.001,
                "split": "train",
                "step": 4,
            },
            {
                "epoch": 1.25,
                "grad_norm": 0.00758228,
                "grad_norm/block.0": 0.00197597,
                "grad_norm/block.1": 0.001587,
                "grad_norm/head": 0.00714619,
                "loss": 0.6852864,
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
                "loss": 0.70160937,
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
                "grad_norm": 0.33531101,
                "grad_norm/block.0": 0.00308458,
                "grad_norm/block.1": 0.00134476,
                "grad_norm/head": 0.33529413,
                "loss": 0.63596928,
                "lr/block.0": 0.00029289,
                "lr/block.1": 0.00029289,
                "lr/head": 0.00029289,
                "split": "train",
                "step": 6,
            },
            {
                "epoch": 1.75,
                "grad_norm": 0.5767999,
                "grad_norm/block.0": 0.00615798,
                "grad_norm/block.1": 0.00328618,
                "grad_norm/head": 0.57675767,
                "loss": 0.7672897,
                "lr/block.0": 7.612e-05,
                "lr/block.1": 7.612e-05,
                "lr/head": 7.612e-05,
                "split": "train",
                "step": 7,
            },
            {
                "epoch": 2.0,
                "grad_norm": 0.29961853,
                "grad_norm/block.0": 0.00327923,
                "grad_norm/block.1": 0.00184963,
                "grad_norm/head": 0.29959488,
                "loss": 0.7273056,
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
                "loss": 0.70140982,
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
        "weights_sha256": "db75f5dfa4c4f6ea58372f138a3503c1b4d181db46ab404b3a729dff8949c27b",
    },
}
RECORDED = {EXPECTED_CAPABILITY: EXPECTED, "AVX512": EXPECTED_AVX512}


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
