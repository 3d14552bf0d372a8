"""The loop's state: one dataclass that round-trips through a checkpoint's JSON exactly.

Why: resuming is bit-equal only if every value the loop mutates comes back
exactly, and the loop's modules must not depend on each other in a circle.
"""

from __future__ import annotations

import ast
import json
from pathlib import Path

import tunesmith.training as train_pkg
from tunesmith.training.early_stop import EarlyStopping
from tunesmith.training.state import LogWindow, TrainState


def _state() -> TrainState:
    return TrainState(EarlyStopping(higher_is_better=True, patience=3))


def test_state_dict_round_trips_through_json_exactly():
    state = _state()
    state.step, state.epoch, state.batches_in_epoch, state.bad_steps = 7, 1, 3, 1
    state.window = LogWindow(0.1 + 0.2, 12.0, 345, 1 / 3, {"kd": 2.0 / 7}, 2)
    state.last_eval_step, state.stopped_early = 4, True
    state.last_validation = {"loss": 0.6931471805599453, "accuracy": 0.5}
    state.real_tokens, state.train_seconds, state.cache_seconds = 999, 12.345678901234567, 0.25
    state.stopper.update(0.75, 4)
    state.stopper.update(0.5, 6)

    restored = _state()
    restored.load_state_dict(json.loads(json.dumps(state.state_dict())))

    assert restored == state
    assert restored.stopper.bad_evals == 1 and restored.stopper.best_step == 4
    # Loading copies: the loop mutating one state cannot change the other.
    restored.window.parts["kd"] += 1
    assert state.window.parts["kd"] == 2.0 / 7


def test_checkpoints_of_the_earlier_layout_still_load():
    """``window`` was a list of four sums and the totals sat under ``result``."""
    old = {
        "step": 5,
        "epoch": 1,
        "batches_in_epoch": 2,
        "bad_steps": 0,
        "window": [1.5, 16.0, 200, 0.75],
        "last_eval_step": 4,
        "result": {
            "steps": 5,
            "epochs": 1.25,
            "train_seconds": 3.5,
            "real_tokens": 1000,
            "best_metric": 0.6,
            "best_step": 4,
            "stopped_early": False,
            "peak_rss_mb": 0.0,
            "last_validation": {"accuracy": 0.6},
            "cache_seconds": 0.5,
        },
        "stopper": {"best": 0.6, "best_step": 4, "bad_evals": 0},
        "scheduler": {"last_epoch": 5},
    }
    state = _state()
    state.load_state_dict(old)
    assert (state.step, state.epoch, state.batches_in_epoch, state.last_eval_step) == (5, 1, 2, 4)
    assert state.window == LogWindow(1.5, 16.0, 200, 0.75)
    assert (state.real_tokens, state.train_seconds, state.cache_seconds) == (1000, 3.5, 0.5)
    assert state.last_validation == {"accuracy": 0.6}
    assert (state.stopper.best, state.stopper.best_step) == (0.6, 4)
    result = state.result(steps_per_epoch=4)
    assert (result.steps, result.epochs, result.best_metric) == (5, 1.25, 0.6)


def test_only_the_loop_imports_the_loop():
    """One-way dependencies: no other module of tunesmith.training imports train.loop."""
    folder = Path(train_pkg.__file__).parent
    for path in sorted(folder.glob("*.py")):
        if path.name == "loop.py":
            continue
        tree = ast.parse(path.read_text(encoding="utf-8"))
        imported = set()
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom):
                imported |= {node.module, *(f"{node.module}.{a.name}" for a in node.names)}
            elif isinstance(node, ast.Import):
                imported |= {alias.name for alias in node.names}
        assert "tunesmith.training.loop" not in imported, path.name
