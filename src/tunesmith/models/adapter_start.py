"""Starting a run from a folder that holds a peft adapter: merged into its base first.

The usual post-training pipeline trains an SFT adapter, then continues from it
(preference optimisation, a reward model, more SFT). Loading such a folder
gives the base model with the adapter merged in, so the new run starts from
the SFT model, and under a new adapter "adapter off" is the SFT model, never
the pre-SFT base.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from torch import nn

from tunesmith.models.loading import adapter_base, load_pretrained

log = logging.getLogger(__name__)


def load_merged(auto_cls: Any, folder: str | Path, **kwargs: Any) -> nn.Module:
    """The adapter's base (under ``auto_cls``, with ``kwargs``) with the adapter merged in."""
    from peft import PeftModel  # heavy; only for runs that start from an adapter

    base = adapter_base(folder)
    assert base is not None, f"{folder} holds no adapter"
    model = load_pretrained(auto_cls, base, **kwargs)
    merged = PeftModel.from_pretrained(model, str(folder)).merge_and_unload()
    log.info("starting from the adapter in %s merged into its base %s", folder, base)
    return merged
