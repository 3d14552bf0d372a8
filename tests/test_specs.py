"""Task and method specs: one per implementation, and config validation without torch."""

from __future__ import annotations

import subprocess
import sys
from inspect import getattr_static
from pathlib import Path

import pytest

from tunesmith.config.root import Config
from tunesmith.config.specs import METHOD_SPECS, TASK_SPECS, MethodSpec, TaskSpec
from tunesmith.methods.base import METHODS
from tunesmith.tasks.base import TASKS

EXAMPLES = sorted((Path(__file__).parent.parent / "examples").glob("*.yaml"))
HEAVY = ("torch", "peft", "transformers")


def _spec_attributes(base: type) -> list[str]:
    """The names a spec class declares: its capability flags and its config hooks."""
    return [name for name in vars(base) if not name.startswith("_")]


@pytest.mark.parametrize(
    ("specs", "implementations", "base"),
    [(TASK_SPECS, TASKS, TaskSpec), (METHOD_SPECS, METHODS, MethodSpec)],
    ids=["tasks", "methods"],
)
def test_every_implementation_is_its_registered_spec(specs, implementations, base) -> None:
    assert specs.names() == implementations.names()
    for name in specs.names():
        spec, implementation = specs.get(name), implementations.get(name)
        assert issubclass(implementation, spec), f"{implementation.__name__} is not a {spec}"
        # The spec decides: the implementation may not change a flag or a check.
        for attribute in _spec_attributes(base):
            found, declared = (getattr_static(c, attribute) for c in (implementation, spec))
            assert found == declared, (
                f"{implementation.__name__}.{attribute} differs from {spec.__name__}'s"
            )


def test_capabilities_are_read_from_the_registered_classes() -> None:
    flags = {name: TASK_SPECS.get(name) for name in TASK_SPECS.names()}
    assert [n for n, s in flags.items() if s.has_classes] == [
        "sequence_classification",
        "token_classification",
    ]
    assert [n for n, s in flags.items() if s.packable] == ["causal_lm"]
    assert [n for n, s in flags.items() if s.sub_tasks] == ["multitask"]
    assert [n for n, s in flags.items() if s.gguf_export] == ["causal_lm", "preference", "rl"]
    assert [n for n, s in flags.items() if s.online] == ["rl"]
    assert TASKS.get("causal_lm").packable and not TASKS.get("seq2seq").packable
    unpackable = [n for n in METHOD_SPECS.names() if not METHOD_SPECS.get(n).packable]
    assert unpackable == ["prefix", "prompt"]
    assert not METHODS.get("prompt").packable and not METHODS.get("prompt").multitask_encoder


def _python(*args: str) -> subprocess.CompletedProcess[str]:
    """Run this Python in a fresh process (nothing imported yet)."""
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_loading_a_config_imports_neither_torch_nor_peft(path: Path) -> None:
    # An ``asset:`` path may convert its asset once (which may use torch); the
    # conversion is cached, so do it here first and check only validation below.
    Config.load(path)
    code = (
        "import sys\n"
        "from tunesmith.config import Config\n"
        f"Config.load({str(path)!r})\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
    )
    result = _python("-c", code)
    assert result.returncode == 0, result.stderr


def test_config_validate_command_imports_neither_torch_nor_peft() -> None:
    path = next(p for p in EXAMPLES if p.name == "sentiment.yaml")
    Config.load(path)  # its assets prepared (see above)
    result = _python("-X", "importtime", "-m", "tunesmith", "config", "validate", str(path))
    assert result.returncode == 0, result.stderr
    assert f"{path}: valid" in result.stdout
    imported = {
        line.rsplit("|", 1)[-1].strip()
        for line in result.stderr.splitlines()
        if line.startswith("import time:")
    }
    assert "tunesmith.config.root" in imported  # the measure works
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert not heavy, heavy[:5]
