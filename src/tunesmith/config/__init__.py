"""The config: pydantic sections, YAML loading with line-numbered errors, overrides.

``from tunesmith.config import Config`` is the public import; nothing here
imports torch, so validating a file stays fast.
"""

from tunesmith.config.root import Config

__all__ = ["Config"]
