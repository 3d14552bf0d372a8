"""Reading chat rows for the tasks that take them: layouts, splits, no label vocabulary.

Causal-LM tasks (SFT, preference) and reward models read the same layouts
(``data.format``, ``data/formats``) and split them the same way (every chat
starting with the same question on one side); this mixin is that shared part.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from tunesmith.data.chat import read_chat_file, read_options
from tunesmith.tasks.base import DataSplits


class ChatRows:
    """Chat-row reading for a ``Task`` (uses its ``cfg`` and ``split_free_text``)."""

    cfg: Any
    split_free_text: Any

    def read_layout(
        self, path: str, *, labelled: bool, dropped: list[str] | None, fmt: str | None = None
    ) -> tuple[str, list[dict[str, Any]]]:
        """The file's layout (``fmt``, else ``data.format`` or the one detected) and its records."""
        return read_chat_file(
            path,
            read_options(self.cfg.data, labelled=labelled),
            fmt=fmt or self.cfg.data.format,
            system_prompt=self.cfg.task.system_prompt,
            dropped=dropped,
        )

    def load_splits(self) -> DataSplits:
        """Read and split; every chat starting with the same question stays on one side."""
        return self.split_free_text("with an empty prompt or reply")

    def check_labels(
        self, records: Sequence[Mapping[str, Any]], label2id: Mapping[str, int], split: str
    ) -> None:
        """Chats have no label vocabulary."""
