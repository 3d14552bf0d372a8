"""Path checks that answer False, not raise, for names no file system accepts.

A user's path may be too long for the file system or hold a NUL byte;
``Path.exists()`` raises for those, but to tunesmith they are just paths that
do not exist, reported as such with one clear line.
"""

from __future__ import annotations

from pathlib import Path


def exists(path: Path) -> bool:
    """``path.exists()``, False for impossible names (too long, NUL byte)."""
    try:
        return path.exists()
    except (OSError, ValueError):
        return False


def is_dir(path: Path) -> bool:
    """``path.is_dir()``, False for impossible names (too long, NUL byte)."""
    try:
        return path.is_dir()
    except (OSError, ValueError):
        return False
