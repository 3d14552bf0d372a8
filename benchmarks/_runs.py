"""One ``tunesmith train`` of the sentiment example in its own process (peak memory per run)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIG = ROOT / "examples" / "sentiment.yaml"


def train_run(overrides: list[str], run_dir: Path) -> dict:
    """Train ``examples/sentiment.yaml`` with ``overrides``; returns its ``summary.json``."""
    cmd = [
        sys.executable,
        "-m",
        "tunesmith",
        "--quiet",
        "train",
        str(CONFIG),
        *overrides,
        f"train.output_dir={run_dir}",
        "train.overwrite=true",
        "--no-progress",
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"error": proc.stderr.strip().splitlines()[-1] if proc.stderr else "failed"}
    return json.loads((run_dir / "summary.json").read_text())
