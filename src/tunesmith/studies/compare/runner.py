"""``tunesmith compare``: every method on the same data and budget, one process each, cached.

Methods run one after another (the machine's cores go to one method at a
time, so times compare); each in its own process (``worker.py``). A method's
finished result is kept in ``OUT/<method>/result.json`` with a key of
everything that determines it (config file text, overrides, evaluation
options): a second ``compare`` with the same inputs reuses it, a changed
input retrains, and a failed method is tried again.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from tunesmith.config.root import Config
from tunesmith.evaluation.evaluator import EvalOptions
from tunesmith.studies.compare.presets import method_overrides
from tunesmith.studies.compare.worker import RESULT_FILE
from tunesmith.training.trackers import end_parent_run, parent_run

log = logging.getLogger(__name__)


def result_key(config_text: str, overrides: Sequence[str], options: Mapping[str, Any]) -> str:
    """A digest of every input that decides a method's result."""
    blob = json.dumps([config_text, list(overrides), dict(options)], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def cached_result(folder: Path, key: str) -> dict[str, Any] | None:
    """The finished result in ``folder`` when it was made from the same inputs, else None."""
    path = folder / RESULT_FILE
    if not path.is_file():
        return None
    try:
        result = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return result if result.get("status") == "ok" and result.get("key") == key else None


def run_compare(
    config: str | Path,
    methods: Sequence[str],
    out: str | Path,
    *,
    overrides: Sequence[str] = (),
    sets: Mapping[str, Sequence[str]] | None = None,
    options: EvalOptions | None = None,
    fresh: bool = False,
    on_event: Callable[[str], None] = log.info,
) -> list[dict[str, Any]]:
    """Train and evaluate each of ``methods``; returns one result per method, in order.

    Args:
        config: The user's config file: data, model, budget, seed.
        methods: Method names (``presets.py``).
        out: Folder of the comparison: one sub-folder per method.
        overrides: Dotted overrides for every method (after the config file).
        sets: Per-method extra overrides (after the method's preset).
        options: What the evaluation measures.
        fresh: Ignore cached results.
        on_event: Receives one line per started/finished/cached method.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config_text = Path(config).read_text(encoding="utf-8")
    eval_options = asdict(options or EvalOptions())
    eval_options["kinds"] = list(eval_options["kinds"])
    eval_options["strengths"] = list(eval_options["strengths"])
    parent = parent_run(Config.load(config, list(overrides)), out, "compare")
    results = []
    for i, method in enumerate(methods, 1):
        folder = out / method
        folder.mkdir(exist_ok=True)
        all_overrides = [
            *overrides,
            *method_overrides(method),
            *((sets or {}).get(method, ())),
            *([f"train.tracker_parent={parent}"] if parent else []),
        ]
        key = result_key(config_text, all_overrides, eval_options)
        cached = None if fresh else cached_result(folder, key)
        if cached is not None:
            on_event(f"[{i}/{len(methods)}] {method}: cached result reused")
            results.append(cached | {"cached": True})
            continue
        on_event(f"[{i}/{len(methods)}] {method}: training and evaluating")
        began = time.perf_counter()
        result = _run_worker(
            {
                "method": method,
                "key": key,
                "config": str(Path(config).resolve()),
                "folder": str(folder.resolve()),
                "overrides": all_overrides,
                "eval_options": eval_options,
            },
            folder,
        )
        result["wall_seconds"] = round(time.perf_counter() - began, 1)
        state = "done" if result["status"] == "ok" else f"FAILED ({result['error']})"
        on_event(f"[{i}/{len(methods)}] {method}: {state} in {result['wall_seconds']:.0f} s")
        results.append(result)
    end_parent_run(parent)
    return results


def _run_worker(spec: dict[str, Any], folder: Path) -> dict[str, Any]:
    """Run one method's worker process; a crash without a result becomes a failed result."""
    spec_path = folder / "spec.json"
    spec_path.write_text(json.dumps(spec, indent=1) + "\n", encoding="utf-8")
    (folder / RESULT_FILE).unlink(missing_ok=True)
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false")
    with open(folder / "log.txt", "w", encoding="utf-8") as logfile:
        proc = subprocess.run(
            [sys.executable, "-m", "tunesmith.studies.compare.worker", str(spec_path)],
            stdout=logfile,
            stderr=subprocess.STDOUT,
            env=env,
            check=False,
        )
    path = folder / RESULT_FILE
    if path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    tail = (folder / "log.txt").read_text(encoding="utf-8", errors="replace").strip()
    last = tail.splitlines()[-1] if tail else ""
    return {
        "method": spec["method"],
        "key": spec["key"],
        "overrides": spec["overrides"],
        "status": "failed",
        "error": f"worker exited with code {proc.returncode} without a result: {last}",
    }
