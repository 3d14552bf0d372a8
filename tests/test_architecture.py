"""The package's shape is checked, not hoped for: layers, cycles, top-level modules, sizes.

``lint-imports`` (import-linter, contracts in pyproject.toml) enforces the
layers and the absence of cycles, function-local imports included. The
injection test proves the contracts bite: one upward import added to a copy
of the package must make ``lint-imports`` fail.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "src" / "tunesmith"
LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")

#: What may sit at the top of the package besides subpackages.
TOP_LEVEL = {"__init__.py", "__main__.py", "_version.py", "api.py", "errors.py", "testing.py"}
#: The public names of ``tunesmith``; no subpackage may be called like one of them,
#: or importing it would replace the function on the package (``tunesmith.train``).
PUBLIC = {"Config", "TrainResult", "train", "evaluate", "predict"}
MAX_LINES = 600


def _lint(cwd: Path, pythonpath: Path) -> subprocess.CompletedProcess[str]:
    if not LINT_IMPORTS.exists():
        pytest.fail("lint-imports is not installed: install the dev extra (pip install -e .[dev])")
    env = {**os.environ, "PYTHONPATH": str(pythonpath)}
    return subprocess.run(
        [str(LINT_IMPORTS), str(cwd / "pyproject.toml"), "--no-cache"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_the_package_keeps_its_import_contracts() -> None:
    result = _lint(ROOT, ROOT / "src")
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "broken" not in result.stdout.lower().replace("0 broken", "")


@pytest.mark.parametrize(
    ("module", "upward"),
    [
        ("core/registry.py", "tunesmith.tasks.base"),  # the bottom layer reaching up
        ("tasks/base.py", "tunesmith.runs.load"),  # a function-local import counts too
    ],
)
def test_an_upward_import_breaks_the_contract(tmp_path: Path, module: str, upward: str) -> None:
    src = tmp_path / "src"
    shutil.copytree(PACKAGE, src / "tunesmith", ignore=shutil.ignore_patterns("__pycache__"))
    shutil.copy(ROOT / "pyproject.toml", tmp_path / "pyproject.toml")
    target = src / "tunesmith" / module
    if module.startswith("tasks"):
        injected = f"\n\ndef _injected() -> None:\n    import {upward}  # noqa: F401\n"
    else:
        injected = f"\nimport {upward}  # noqa: E402, F401\n"
    target.write_text(target.read_text() + injected)
    result = _lint(tmp_path, src)
    assert result.returncode != 0, result.stdout[-3000:]
    importer = "tunesmith." + module.removesuffix(".py").replace("/", ".")
    assert f"{importer} -> {upward}" in result.stdout


def test_top_of_the_package_holds_only_the_entry_modules() -> None:
    files = {p.name for p in PACKAGE.glob("*.py")}
    assert files == TOP_LEVEL
    subpackages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").is_file()}
    assert not subpackages & PUBLIC


def test_public_names_are_the_functions_after_any_subpackage_import() -> None:
    code = (
        "import tunesmith.training.loop, tunesmith.evaluation.evaluator, tunesmith.config\n"
        "from tunesmith import Config, TrainResult, evaluate, predict, train\n"
        "assert all(callable(f) and not hasattr(f, '__path__') "
        "for f in (Config, TrainResult, evaluate, predict, train))\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_no_module_is_over_the_size_limit() -> None:
    sizes = {
        str(p.relative_to(PACKAGE)): len(p.read_text(encoding="utf-8").splitlines())
        for p in PACKAGE.rglob("*.py")
    }
    assert {k: v for k, v in sizes.items() if v > MAX_LINES} == {}
