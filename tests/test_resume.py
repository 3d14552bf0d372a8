"""Exact resume: a run killed at a random step and resumed ends with bit-identical weights.

The interrupted runs are real ``tunesmith train`` processes killed with SIGKILL
(or stopped with SIGTERM); the resumed and the uninterrupted runs use the same
config on a tiny BERT with dropout on, so RNG state, data order, optimizer
moments and the LR schedule all have to be restored for the weights to match.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file

from conftest import build_tiny_bert, tiny_config, toy_rows, write_csv
from tunesmith.api import train
from tunesmith.config.root import Config
from tunesmith.errors import CheckpointError
from tunesmith.training import resume as resume_mod
from tunesmith.training.monitor import read_metrics
from tunesmith.training.resume import list_checkpoints, read_state

#: Every training step writes a checkpoint and nothing is pruned, so a test can
#: pick any step the killed process reached.
SAVE_ALL = {"save_steps": 1, "save_minutes": None, "save_total_limit": 1000}
CASES = {
    "full": {"train": {"grad_accum": 1}},
    "full-accum": {"train": {"grad_accum": 2}},
    "lora-accum": {"train": {"grad_accum": 2}, "method": {"name": "lora", "r": 4}},
    "progressive": {"method": {"unfreeze": {"every_steps": 4, "warmup_steps": 2}}},
}


@pytest.fixture(scope="module")
def dropout_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny BERT with dropout on: resuming must restore the RNG to match."""
    return build_tiny_bert(tmp_path_factory.mktemp("bert-dropout"), dropout=0.1)


@pytest.fixture(scope="module")
def data_csv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_csv(tmp_path_factory.mktemp("resume-data") / "toy.csv", toy_rows(120))


def run_config(model: Path, data: Path, out: Path, case: str, **train: Any) -> dict[str, Any]:
    """3 epochs of 14 micro-batches, cosine schedule with warmup, evaluation every 4 steps."""
    extra = CASES[case]
    cfg = tiny_config(
        model,
        data,
        out,
        optim={"warmup_ratio": 0.2, "scheduler": "cosine", **extra.get("optim", {})},
        method=extra.get("method", {}),
        train={
            "epochs": 3,
            "batch_size": 8,
            "eval_steps": 4,
            "log_steps": 3,
            "num_threads": 1,
            "precision": "fp32",
            **SAVE_ALL,
            **extra.get("train", {}),
            **train,
        },
    )
    return cfg


@pytest.fixture(scope="module")
def reference(dropout_bert: Path, data_csv: Path, tmp_path_factory: pytest.TempPathFactory):
    """Uninterrupted runs, one per case, computed on first use."""
    done: dict[str, Path] = {}

    def get(case: str) -> Path:
        if case not in done:
            out = tmp_path_factory.mktemp(f"ref-{case}") / "run"
            train(Config.from_dict(run_config(dropout_bert, data_csv, out, case)), progress=False)
            done[case] = out
        return done[case]

    return get


def start_cli(cfg: dict[str, Any], folder: Path) -> subprocess.Popen:
    """``tunesmith train`` on ``cfg`` in a child process."""
    path = folder / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "tunesmith", "train", str(path), "--no-progress"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def wait_for(condition, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    """Poll ``condition()`` until true; fail if the process ends or time runs out first."""
    end = time.monotonic() + timeout
    while not condition():
        if proc.poll() is not None:
            pytest.fail(f"training ended before the interruption point:\n{proc.stderr.read()}")
        if time.monotonic() > end:
            proc.kill()
            pytest.fail("timed out waiting for the interruption point")
        time.sleep(0.005)


def weights_of(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in a saved folder."""
    tensors = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update({f"{file.name}:{k}": v for k, v in load_file(file).items()})
    assert tensors, f"no weights in {folder}"
    return tensors


def assert_bit_identical(resumed: Path, ref: Path) -> None:
    """final/ and best/ weights equal bit for bit; the validation log matches too."""
    for sub in ("final", "best"):
        a, b = weights_of(resumed / sub), weights_of(ref / sub)
        assert a.keys() == b.keys()
        different = [k for k in a if not torch.equal(a[k], b[k])]
        assert not different, f"{sub}/: {len(different)} tensors differ, e.g. {different[:3]}"

    def validation(run: Path) -> list[tuple[int, float, float]]:
        recs = read_metrics(run / "metrics.jsonl")
        return [(r["step"], r["loss"], r["accuracy"]) for r in recs if r["split"] == "validation"]

    assert validation(resumed) == validation(ref)
    steps = [r["step"] for r in read_metrics(resumed / "metrics.jsonl") if r["split"] == "train"]
    assert steps == sorted(steps), "records after the checkpoint were not dropped on resume"


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_at_a_random_step_then_resume_is_bit_identical(
    case, reference, dropout_bert, data_csv, tmp_path
):
    out = tmp_path / "run"
    cfg = run_config(dropout_bert, data_csv, out, case)
    accum = cfg["train"].get("grad_accum", 1)
    per_epoch = -(-14 // accum)
    rng = random.Random(f"{case}-{os.getpid()}")
    # A step strictly inside an epoch (not its last), after the first evaluation.
    kill_at = rng.choice([s for s in range(5, 2 * per_epoch) if s % per_epoch])
    proc = start_cli(cfg, tmp_path)
    wait_for(lambda: (out / "checkpoints" / f"step-{kill_at:07d}").is_dir(), proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    # Resume from exactly kill_at: as if the kill came right after that checkpoint.
    for step, path in list_checkpoints(out):
        if step > kill_at:
            shutil.rmtree(path)
    state = read_state(out / "checkpoints" / f"step-{kill_at:07d}")
    assert state["batches_in_epoch"] not in (0, 14), "the interruption is mid-epoch"
    train(Config.from_dict(cfg), progress=False, resume="latest")
    assert_bit_identical(out, reference(case))


def test_resume_from_wherever_sigkill_landed(reference, dropout_bert, data_csv, tmp_path):
    """No tidying: whatever the killed process left (maybe a half-written .tmp) resumes."""
    out = tmp_path / "run"
    cfg = run_config(dropout_bert, data_csv, out, "full", save_total_limit=2)
    proc = start_cli(cfg, tmp_path)
    wait_for(lambda: len(list_checkpoints(out)) >= 1 and random.random() < 0.02, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    train(Config.from_dict(cfg), progress=False, resume="latest")
    assert_bit_identical(out, reference("full"))


def test_sigterm_writes_a_resumable_checkpoint(reference, dropout_bert, data_csv, tmp_path):
    out = tmp_path / "run"
    cfg = run_config(dropout_bert, data_csv, out, "full", save_steps=None, log_steps=1)
    proc = start_cli(cfg, tmp_path)

    def logged_steps() -> int:
        path = out / "metrics.jsonl"
        return len(path.read_text().splitlines()) if path.is_file() else 0

    wait_for(lambda: logged_steps() >= 6, proc)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signal.SIGTERM, stderr
    assert "interrupted: training interrupted by SIGTERM" in stderr
    assert "--resume latest" in stderr
    assert not (out / "final").exists()
    ((step, _),) = list_checkpoints(out)
    assert 0 < step < 42
    cfg["train"]["save_steps"] = 1  # checkpoint settings may change on resume
    train(Config.from_dict(cfg), progress=False, resume=str(out))
    assert_bit_identical(out, reference("full"))


def test_second_signal_aborts_at_once(tmp_path):
    code = (
        "import os, signal, time\n"
        "from tunesmith.training.interrupt import GracefulInterrupt\n"
        "with GracefulInterrupt() as it:\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    assert it.requested == signal.SIGTERM\n"
        "    print('first handled', flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "    time.sleep(5)\n"
        "    print('survived')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "first handled"
    assert done.returncode == -signal.SIGTERM


def test_crash_while_writing_a_checkpoint_leaves_the_previous_one(
    reference, dropout_bert, data_csv, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    cfg = run_config(dropout_bert, data_csv, out, "full", save_steps=5, save_total_limit=1)
    real_save, calls = resume_mod.save_file, []

    def crash_in_second_checkpoint(tensors, path):
        calls.append(path)
        if len(calls) == 5:  # checkpoint 2: weights written, optimizer half-way
            Path(path).write_bytes(b"partial")
            raise OSError(28, "No space left on device")
        real_save(tensors, path)

    monkeypatch.setattr(resume_mod, "save_file", crash_in_second_checkpoint)
    with pytest.raises(OSError, match="No space left"):
        train(Config.from_dict(cfg), progress=False)
    monkeypatch.setattr(resume_mod, "save_file", real_save)
    assert [s for s, _ in list_checkpoints(out)] == [5]
    assert (out / "checkpoints" / "step-0000010.tmp").is_dir()  # the torn write, ignored
    train(Config.from_dict(cfg), progress=False, resume="latest")
    assert_bit_identical(out, reference("full"))


def test_keeps_the_newest_checkpoints_and_the_best(dropout_bert, data_csv, tmp_path):
    out = tmp_path / "run"
    cfg = run_config(dropout_bert, data_csv, out, "full", save_steps=2, save_total_limit=2)
    cfg["optim"]["lr"] = 5e-2  # unstable: the best step is usually not the last
    result = train(Config.from_dict(cfg), progress=False)
    kept = [s for s, _ in list_checkpoints(out)]
    written = list(range(2, result.loop.steps, 2))
    best = result.loop.best_step
    expected = set(written[-2:]) | ({best} if best in written else set())
    assert set(kept) == expected


def test_changed_config_is_refused_with_a_diff_unless_forced(dropout_bert, data_csv, tmp_path):
    out = tmp_path / "run"
    cfg = run_config(dropout_bert, data_csv, out, "full", max_steps=4, save_steps=2)
    train(Config.from_dict(cfg), progress=False)
    changed = json.loads(json.dumps(cfg))
    changed["train"]["batch_size"] = 4
    changed["method"] = {"name": "freeze", "train_layers": 1}
    with pytest.raises(CheckpointError) as err:
        train(Config.from_dict(changed), progress=False, resume="latest")
    message = str(err.value)
    assert "train.batch_size: 8 -> 4" in message
    assert "method.name: 'full' -> 'freeze'" in message
    assert "--force" in message and "\n" not in message
    other_data = write_csv(tmp_path / "other.csv", toy_rows(120, seed=3))
    cfg_data = {**cfg, "data": {**cfg["data"], "train": str(other_data)}}
    with pytest.raises(CheckpointError, match="training data"):
        train(Config.from_dict(cfg_data), progress=False, resume="latest")
    forced = {**cfg, "train": {**cfg["train"], "batch_size": 4}}
    result = train(Config.from_dict(forced), progress=False, resume="latest", force=True)
    assert (result.final_dir / "model.safetensors").is_file()


def test_resume_without_a_checkpoint_is_one_clear_error(tmp_path, dropout_bert, data_csv):
    from tunesmith.cli import main

    cfg = run_config(dropout_bert, data_csv, tmp_path / "empty", "full")
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert main(["train", str(path), "--resume", "latest"]) == 2
    assert main(["train", str(path), "--resume", str(tmp_path / "nope")]) == 2


def test_too_little_disk_space_fails_before_training(dropout_bert, data_csv, tmp_path, monkeypatch):
    out = tmp_path / "run"
    cfg = run_config(dropout_bert, data_csv, out, "full")
    real = shutil.disk_usage
    monkeypatch.setattr(
        resume_mod.shutil,
        "disk_usage",
        lambda p: real(p)._replace(free=10 * 2**20),
    )
    with pytest.raises(CheckpointError, match=r"not enough disk space .* 10 MB free"):
        train(Config.from_dict(cfg), progress=False)
    assert not (out / "metrics.jsonl").exists() or not read_metrics(out / "metrics.jsonl")


def test_atomic_folder_write_never_leaves_a_mix(tmp_path):
    from tunesmith.models.folders import atomic_dir_write, read_manifest

    target = tmp_path / "best"

    def writer(version: str, crash: bool = False):
        def write(folder: Path) -> None:
            (folder / "tunesmith.json").write_text(json.dumps({"v": version}))
            if crash:
                raise OSError("disk full")
            (folder / "weights.safetensors").write_text(version)

        return write

    atomic_dir_write(target, writer("1"))
    with pytest.raises(OSError):
        atomic_dir_write(target, writer("2", crash=True))
    assert read_manifest(target) == {"v": "1"}
    assert (target / "weights.safetensors").read_text() == "1"
    # A crash between moving the old folder aside and renaming the new one in:
    target.rename(tmp_path / "best.old")
    assert read_manifest(target) == {"v": "1"}  # readers put the old folder back
    atomic_dir_write(target, writer("3"))
    assert read_manifest(target) == {"v": "3"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best"]


def test_checkpoints_are_due_by_steps_or_by_minutes(tmp_path, monkeypatch):
    from tunesmith.training.resume import Checkpointer

    now = [1000.0]
    monkeypatch.setattr(resume_mod.time, "monotonic", lambda: now[0])
    by_steps = Checkpointer(tmp_path, every_steps=5, every_minutes=None)
    assert [s for s in range(1, 16) if by_steps.due(s)] == [5, 10, 15]
    by_time = Checkpointer(tmp_path, every_steps=None, every_minutes=2.0)
    assert not by_time.due(1)
    now[0] += 119.0
    assert not by_time.due(2)
    now[0] += 2.0
    assert by_time.due(3)
    assert not Checkpointer(tmp_path).due(7)  # nothing configured


def test_a_bad_input_with_overwrite_keeps_the_previous_run(dropout_bert, data_csv, tmp_path):
    from tunesmith.errors import DataError

    out = tmp_path / "run"
    cfg = run_config(dropout_bert, data_csv, out, "full", max_steps=2)
    train(Config.from_dict(cfg), progress=False)
    before = sorted(p.name for p in out.iterdir())
    broken = tmp_path / "broken.csv"
    broken.write_text("text,label\n")  # a header and no rows
    bad = {**cfg, "data": {**cfg["data"], "train": str(broken)}, "train": {**cfg["train"]}}
    bad["train"]["overwrite"] = True
    with pytest.raises(DataError):
        train(Config.from_dict(bad), progress=False)
    assert sorted(p.name for p in out.iterdir()) == before


@pytest.mark.parametrize("where", ["inside-run", "holds-data"])
def test_output_dir_cannot_reach_into_other_runs_or_inputs(where, dropout_bert, data_csv, tmp_path):
    from tunesmith.errors import ConfigError

    first = tmp_path / "runs" / "a"
    cfg = run_config(dropout_bert, data_csv, first, "full", max_steps=1)
    train(Config.from_dict(cfg), progress=False)
    if where == "inside-run":
        target, needle = tmp_path / "runs" / "b" / ".." / "a" / "nested", "inside the run folder"
    else:  # the data was kept in the run folder it would replace
        target, needle = first, "contains data.train"
        cfg["data"]["train"] = str(shutil.copy(data_csv, first / "kept.csv"))
    cfg["train"].update(output_dir=str(target), overwrite=True)
    with pytest.raises(ConfigError, match=needle):
        train(Config.from_dict(cfg), progress=False)
    assert (first / "final" / "model.safetensors").is_file()
    assert Path(cfg["data"]["train"]).is_file()


def test_cli_resume_with_relative_paths(dropout_bert, tmp_path, monkeypatch):
    from tunesmith.cli import main

    monkeypatch.chdir(tmp_path)
    write_csv(tmp_path / "toy.csv", toy_rows(60))
    cfg = run_config(dropout_bert, Path("toy.csv"), Path("run"), "full", max_steps=4, save_steps=2)
    Path("cfg.yaml").write_text(yaml.safe_dump(json.loads(json.dumps(cfg, default=str))))
    assert main(["train", "cfg.yaml", "--no-progress"]) == 0
    assert [s for s, _ in list_checkpoints(Path("run"))] == [2]
    assert main(["train", "cfg.yaml", "--no-progress", "--resume", "latest"]) == 0
    assert (tmp_path / "run" / "final" / "model.safetensors").is_file()
