"""Task and method specs: one per implementation, the capabilities read from them."""

from __future__ import annotations

from inspect import getattr_static

import pytest

from tunesmith.config.specs import METHOD_SPECS, TASK_SPECS, MethodSpec, TaskSpec
from tunesmith.methods.base import METHODS
from tunesmith.tasks.base import TASKS


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
    assert TASKS.get("causal_lm").packable and not TASKS.get("seq2seq").packable
    unpackable = [n for n in METHOD_SPECS.names() if not METHOD_SPECS.get(n).packable]
    assert unpackable == ["prefix", "prompt"]
    assert not METHODS.get("prompt").packable and not METHODS.get("prompt").multitask_encoder
