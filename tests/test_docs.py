"""The README and the manual (docs/) stay true.

Runnable examples: a fenced ``bash`` or ``python`` block in README.md or docs/*.md
preceded, on the line right before its fence, by an HTML comment ::

    <!-- runnable -->
    <!-- runnable: slow -->
    <!-- runnable: train.max_steps=2 data.max_train_samples=64 -->

is run as a new user would run it: in a fresh copy of the repository (so nothing
it writes lands in the checkout), python blocks with ``.venv/bin/python`` and
bash blocks with ``bash -e -o pipefail``, ``.venv/bin`` on the PATH. The comment
may add, separated by spaces, ``slow`` (the block runs with the slow tests only)
and config overrides ``key.path=value``: they are appended to the overrides of
every ``Config.load`` in every Python process the block starts (``tunesmith
train``, ``config show``, the Python API, ...), by a start-up hook this module
puts on ``PYTHONPATH``, so that a real run shown in the docs can be made short
here without changing what the reader sees.

A block of any language preceded by ``<!-- file: NAME -->`` is written to NAME in
the copy before every later runnable block of the same page runs, so a page can
show a config and then use it.

Links: every relative link of the README must name an existing file, and a
``#anchor`` an existing heading (GitHub's heading ids, which mkdocs.yml makes the
site use too). Links inside docs/ are checked by ``mkdocs build --strict``.

The config reference (docs/config.md) must be what scripts/config_reference.py
renders from the config models now.
"""

from __future__ import annotations

import json
import os
import re
import runpy
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md"))]
RUNNABLE = re.compile(r"^<!--\s*runnable(?::(?P<options>.*?))?\s*-->$")
FILE = re.compile(r"^<!--\s*file:\s*(?P<name>[\w./-]+)\s*-->$")
FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})\s*(?P<lang>[\w+-]*)")
OVERRIDE = re.compile(r"^[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+=\S*$")
LANGUAGES = ("bash", "python")
#: Top-level entries a fresh copy of the repository leaves out (ignored outputs).
NOT_COPIED = {".git", ".venv", "runs", "site", "build", "dist", ".cache"}
#: Seconds one runnable block may take.
BLOCK_TIMEOUT = 900
#: What a runnable block must show somewhere: the README's promises to a new user.
PROMISED = (
    "from tunesmith import",
    "tunesmith config validate",
    "tunesmith config show",
    "tunesmith doctor",
    "tunesmith train",
    "tunesmith eval",
    "tunesmith predict",
)


@dataclass(frozen=True)
class Block:
    """One fenced code block of a page, with the marker comment right before it."""

    page: Path
    line: int  # 1-based line of the opening fence
    lang: str
    code: str
    marker: str  # the comment line before the fence, or ""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT).as_posix()}:{self.line}"


@dataclass(frozen=True)
class Runnable:
    """A runnable block with its options and the files its page gave before it."""

    block: Block
    slow: bool
    overrides: tuple[str, ...]
    files: tuple[tuple[str, str], ...]


def fenced_blocks(page: Path) -> list[Block]:
    """Every fenced code block of ``page``, in order."""
    lines = page.read_text(encoding="utf-8").splitlines()
    blocks: list[Block] = []
    index = 0
    while index < len(lines):
        opening = FENCE.match(lines[index])
        if opening is None:
            index += 1
            continue
        fence = opening["fence"]
        end = index + 1
        while end < len(lines) and not _closes(lines[end], fence):
            end += 1
        marker = lines[index - 1].strip() if index > 0 else ""
        code = "\n".join(lines[index + 1 : end]) + "\n"
        blocks.append(Block(page, index + 1, opening["lang"], code, marker))
        index = end + 1
    return blocks


def _closes(line: str, fence: str) -> bool:
    """True when ``line`` closes a block opened by ``fence`` (as long or longer)."""
    line = line.strip()
    return line.startswith(fence) and not line.strip(fence[0])


def runnables(page: Path) -> tuple[list[Runnable], list[str]]:
    """The runnable blocks of ``page``, and what is wrong with its markers."""
    found: list[Runnable] = []
    problems: list[str] = []
    files: list[tuple[str, str]] = []
    blocks = fenced_blocks(page)
    for block in blocks:
        named = FILE.match(block.marker)
        if named is not None:
            files.append((named["name"], block.code))
            continue
        marked = RUNNABLE.match(block.marker)
        if marked is None:
            continue
        if block.lang not in LANGUAGES:
            problems.append(f"{block.where}: runnable blocks are {LANGUAGES}, not {block.lang!r}")
            continue
        slow, overrides = False, []
        for option in (marked["options"] or "").split():
            if option == "slow":
                slow = True
            elif OVERRIDE.match(option):
                overrides.append(option)
            else:
                problems.append(
                    f"{block.where}: unknown runnable option {option!r} "
                    "(slow, or a config override key.path=value)"
                )
        found.append(Runnable(block, slow, tuple(overrides), tuple(files)))
    before_fence = {b.line - 1 for b in blocks}  # the line a block's marker must be on
    lines = page.read_text(encoding="utf-8").splitlines()
    for number, line in enumerate(lines, start=1):
        line = line.strip()
        if not (line.startswith("<!--") and re.search(r"runnable|file:", line)):
            continue
        where = f"{page.relative_to(ROOT).as_posix()}:{number}"
        if not (RUNNABLE.match(line) or FILE.match(line)):
            problems.append(f"{where}: malformed marker {line!r}")
        elif number not in before_fence:
            problems.append(f"{where}: a marker must be the line right before a fence")
    return found, problems


def _collect() -> list:
    params = []
    for page in PAGES:
        for runnable in runnables(page)[0]:
            marks = [pytest.mark.slow] if runnable.slow else []
            params.append(pytest.param(runnable, id=runnable.block.where, marks=marks))
    return params


# --- running a block --------------------------------------------------------------

#: ``sitecustomize`` for the block's processes: appends $TUNESMITH_DOC_OVERRIDES (a
#: JSON list) to the overrides of every ``Config.load``, patching ``Config`` as soon
#: as ``tunesmith.config`` is imported (and not importing it before that).
SITECUSTOMIZE = """\
import importlib.machinery
import importlib.util
import inspect
import json
import os
import sys

_EXTRA = json.loads(os.environ.get("TUNESMITH_DOC_OVERRIDES") or "[]")


def _patch(module):
    cls = module.Config
    load = inspect.getattr_static(cls, "load").__func__

    def load_with_doc_overrides(klass, path, overrides=()):
        given = [overrides] if isinstance(overrides, str) else list(overrides)
        return load(klass, path, [*given, *_EXTRA])

    cls.load = classmethod(load_with_doc_overrides)


class _PatchConfigOnImport:
    @staticmethod
    def find_spec(name, path, target=None):
        if name != "tunesmith.config":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return spec
        execute = spec.loader.exec_module

        def exec_module(module):
            execute(module)
            _patch(module)

        spec.loader.exec_module = exec_module
        return spec


if _EXTRA:
    sys.meta_path.insert(0, _PatchConfigOnImport)

# Run the environment's own sitecustomize, if any, as Python would have.
_HERE = os.path.dirname(os.path.abspath(__file__))
_OTHERS = [p for p in sys.path if os.path.abspath(p or ".") != _HERE]
_SPEC = importlib.machinery.PathFinder.find_spec("sitecustomize", _OTHERS)
if _SPEC is not None and _SPEC.loader is not None:
    _SPEC.loader.exec_module(importlib.util.module_from_spec(_SPEC))
"""


@pytest.fixture(scope="session")
def startup_hook(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("doc-hook")
    (folder / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    return folder


def fresh_copy(folder: Path) -> Path:
    """A copy of the repository's files in ``folder``, ``.venv`` this test's environment."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "*.egg-info", ".*_cache")
    for entry in ROOT.iterdir():
        if entry.name in NOT_COPIED or entry.name.endswith("_cache"):
            continue
        if entry.is_dir():
            shutil.copytree(entry, folder / entry.name, ignore=ignore, symlinks=True)
        else:
            shutil.copy2(entry, folder / entry.name)
    venv = folder / ".venv"
    if sys.prefix != sys.base_prefix:  # running in a virtual environment: the same one
        venv.symlink_to(Path(sys.prefix), target_is_directory=True)
    else:  # no venv: commands that stand in for .venv/bin/python and .venv/bin/tunesmith
        (venv / "bin").mkdir(parents=True)
        for name, command in (("python", ""), ("tunesmith", " -m tunesmith")):
            shim = venv / "bin" / name
            shim.write_text(f'#!/bin/sh\nexec "{sys.executable}"{command} "$@"\n')
            shim.chmod(0o755)
    return folder


def run_block(runnable: Runnable, tmp_path: Path, hook: Path) -> subprocess.CompletedProcess:
    repo = fresh_copy(tmp_path / "repo")
    for name, content in runnable.files:
        (repo / name).parent.mkdir(parents=True, exist_ok=True)
        (repo / name).write_text(content, encoding="utf-8")
    block = runnable.block
    script = tmp_path / ("block.py" if block.lang == "python" else "block.sh")
    script.write_text(block.code, encoding="utf-8")
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(hook), str(repo / "src"), env.get("PYTHONPATH", "")) if p
    )
    env["PATH"] = os.pathsep.join([str(repo / ".venv" / "bin"), env.get("PATH", "")])
    env["TUNESMITH_DOC_OVERRIDES"] = json.dumps(list(runnable.overrides))
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if block.lang == "python":
        command = [str(repo / ".venv" / "bin" / "python"), str(script)]
    else:
        command = ["bash", "-e", "-o", "pipefail", str(script)]
    return subprocess.run(
        command,
        cwd=repo,
        env=env,
        capture_output=True,
        text=True,
        timeout=BLOCK_TIMEOUT,
        check=False,
    )


@pytest.mark.parametrize("runnable", _collect())
def test_runnable_block(runnable: Runnable, tmp_path: Path, startup_hook: Path):
    """The block runs to the end, exit status 0, in a fresh copy of the repository."""
    done = run_block(runnable, tmp_path, startup_hook)
    if done.returncode != 0:
        overrides = " ".join(runnable.overrides) or "none"
        pytest.fail(
            f"{runnable.block.where}: the {runnable.block.lang} block exited "
            f"{done.returncode} (overrides: {overrides})\n"
            f"--- block\n{runnable.block.code}"
            f"--- stdout (end)\n{done.stdout[-3000:]}\n--- stderr (end)\n{done.stderr[-5000:]}",
            pytrace=False,
        )


def test_marker_overrides_reach_every_config_load(tmp_path: Path, startup_hook: Path):
    """The overrides of a marker apply in the CLI and the API, after the block's own."""
    code = (
        ".venv/bin/tunesmith config show examples/sentiment.yaml train.max_steps=9"
        ' | grep -qx "  max_steps: 2"\n'
        'python -c "from tunesmith.config import Config; import sys; c = Config.load('
        "'examples/sentiment.yaml', overrides=['train.seed=5']); "
        'sys.exit(0 if (c.train.max_steps, c.train.seed) == (2, 5) else 3)"\n'
    )
    block = Block(README, 0, "bash", code, "<!-- runnable: train.max_steps=2 -->")
    done = run_block(Runnable(block, False, ("train.max_steps=2",), ()), tmp_path, startup_hook)
    assert done.returncode == 0, done.stderr[-3000:]


def test_markers_are_well_formed():
    problems = [problem for page in PAGES for problem in runnables(page)[1]]
    assert not problems, "\n".join(problems)


def test_the_promised_examples_are_runnable():
    """What the README promises a new user is shown in blocks the tests run."""
    code = "".join(r.block.code for page in PAGES for r in runnables(page)[0] if not r.slow)
    missing = [command for command in PROMISED if command not in code]
    assert not missing, f"no fast runnable block shows {missing}"
    readme_python = [r for r in runnables(README)[0] if r.block.lang == "python"]
    assert readme_python, "the README's Python example is not marked runnable"


# --- links and anchors ----------------------------------------------------------------

LINK = re.compile(r"(?<!!)\[[^\]]*\]\((?P<target>[^)\s]+)\)")
HEADING = re.compile(r"^(?P<hashes>#{1,6})\s+(?P<text>.+?)\s*#*\s*$")


def github_slug(text: str) -> str:
    """GitHub's heading id (also the site's: mkdocs.yml uses pymdownx's equivalent)."""
    text = re.sub(r"<[^>]+>", "", text).strip().lower()
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def prose_lines(page: Path) -> list[tuple[int, str]]:
    """``(line number, line)`` outside fenced code blocks."""
    lines = page.read_text(encoding="utf-8").splitlines()
    inside = {
        n for b in fenced_blocks(page) for n in range(b.line, b.line + 2 + b.code.count("\n"))
    }
    return [(n, line) for n, line in enumerate(lines, start=1) if n not in inside]


def headings(page: Path) -> list[str]:
    return [github_slug(m["text"]) for _, line in prose_lines(page) if (m := HEADING.match(line))]


def anchors(page: Path) -> set[str]:
    """Every heading id of ``page``, repeats numbered as GitHub does (``-1``, ``-2``)."""
    seen: dict[str, int] = {}
    ids = set()
    for slug in headings(page):
        count = seen.get(slug, 0)
        ids.add(slug if count == 0 else f"{slug}-{count}")
        seen[slug] = count + 1
    return ids


def relative_links(page: Path) -> list[tuple[int, str]]:
    """``(line, target)`` of every link of ``page`` that is not a URL."""
    found = []
    for number, line in prose_lines(page):
        line = re.sub(r"`[^`]*`", "", line)  # code spans hold no links
        for match in LINK.finditer(line):
            target = match["target"]
            if not re.match(r"[a-z][a-z0-9+.-]*:", target):
                found.append((number, target))
    return found


def test_readme_links_and_anchors_resolve():
    problems = []
    links = relative_links(README)
    assert any(target.startswith("docs/") for _, target in links)
    for number, target in links:
        path, _, anchor = target.partition("#")
        file = (README.parent / path) if path else README
        if not file.exists():
            problems.append(f"README.md:{number}: {target}: no file {path}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            problems.append(
                f"README.md:{number}: {target}: {path or 'README.md'} has no heading #{anchor}"
            )
    assert not problems, "\n".join(problems)


def test_headings_are_unique_within_each_page():
    """Repeated headings get different ids on GitHub (-1) and on the site (_1): avoid them."""
    problems = []
    for page in PAGES:
        slugs = headings(page)
        repeated = sorted({slug for slug in slugs if slugs.count(slug) > 1})
        if repeated:
            problems.append(f"{page.relative_to(ROOT)}: {', '.join(repeated)}")
    assert not problems, "\n".join(problems)


def test_github_slugs():
    assert github_slug("Against HF Trainer (+ peft)") == "against-hf-trainer--peft"
    assert github_slug("Instruction tuning (`task.type: causal_lm`)") == (
        "instruction-tuning-tasktype-causal_lm"
    )


# --- the generated config reference -----------------------------------------------------


def test_config_reference_is_current():
    script = runpy.run_path(str(ROOT / "scripts" / "config_reference.py"))
    current = (ROOT / "docs" / "config.md").read_text(encoding="utf-8")
    assert current == script["render"](), (
        "docs/config.md is stale: regenerate it with `python scripts/config_reference.py`"
    )
