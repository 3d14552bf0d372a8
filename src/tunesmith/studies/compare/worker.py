"""One method of ``tunesmith compare``, run in its own process: train, evaluate, report.

A separate process per method keeps the comparison honest and robust: peak
memory is the method's own (``VmHWM`` starts afresh), no state leaks from one
method to the next (thread settings, caches, monkey-patching by peft), and a
method that crashes, even hard, cannot take the others down. The worker
writes ``result.json`` in its folder, ``status`` ``ok`` or ``failed`` with the
error; the parent reads it (``runner.py``).

    python -m tunesmith.studies.compare.worker SPEC.json
"""

from __future__ import annotations

import json
import sys
import traceback
from pathlib import Path
from typing import Any

from tunesmith.config.root import Config
from tunesmith.evaluation.evaluator import EvalOptions, evaluate_checkpoint, write_evaluation
from tunesmith.evaluation.report import render_report
from tunesmith.runs.train import train

RESULT_FILE = "result.json"


def run_method(spec: dict[str, Any]) -> dict[str, Any]:
    """Train and evaluate one method as ``spec`` says; returns what goes in ``result.json``."""

    folder = Path(spec["folder"])
    run_dir = folder / "run"
    overrides = [*spec["overrides"], f"train.output_dir={run_dir}", "train.overwrite=true"]
    cfg = Config.load(spec["config"], overrides)
    # The evaluator scores the test split itself: the run need not do it too.
    result = train(cfg, progress=False, test=False)
    checkpoint = result.best_dir or result.final_dir
    split = "test" if has_split(run_dir, "test") else "validation"
    evaluation = evaluate_checkpoint(
        checkpoint, split=split, options=EvalOptions(**spec["eval_options"])
    )
    write_evaluation(evaluation, checkpoint)
    report = render_report(run_dir)
    summary = json.loads((run_dir / "summary.json").read_text(encoding="utf-8"))
    return {
        "status": "ok",
        "lr": cfg.optim.lr,
        "split": split,
        "summary": summary,
        "evaluation": evaluation,
        "report": report.relative_to(folder.parent).as_posix(),
    }


def has_split(run_dir: Path, split: str) -> bool:
    """Whether the run's ``splits.json`` lists rows for ``split`` (any task of a multi-task run)."""
    provenance = json.loads((run_dir / "splits.json").read_text(encoding="utf-8"))
    parts = [provenance, *(provenance.get("tasks") or {}).values()]
    return any(bool((part.get("rows") or {}).get(split)) for part in parts)


def main(argv: list[str] | None = None) -> int:
    """Run the spec file given as the only argument; exit 0 on success, 1 on failure."""
    args = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(args[0]).read_text(encoding="utf-8"))
    folder = Path(spec["folder"])
    base = {"method": spec["method"], "key": spec["key"], "overrides": spec["overrides"]}
    try:
        outcome = run_method(spec)
        code = 0
    except Exception as err:  # recorded, not raised: the other methods go on
        traceback.print_exc()
        outcome = {"status": "failed", "error": f"{type(err).__name__}: {err}"}
        code = 1
    (folder / RESULT_FILE).write_text(json.dumps(base | outcome, indent=1) + "\n", encoding="utf-8")
    return code


if __name__ == "__main__":
    sys.exit(main())
