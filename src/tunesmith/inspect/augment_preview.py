"""``tunesmith data augment CONFIG --show N``: the augmented examples, before training.

Runs exactly the augmentation ``train`` would run on the training split (same
seed, same copies) and prints a sample of originals with their copies and
how each was made, then, with dynamic masking, one example as the model sees
it in the first two epochs.
"""

from __future__ import annotations

import random
from collections import defaultdict
from typing import Any

from tunesmith.config.root import Config
from tunesmith.data.augment.build import build_augmenter, training_dataset
from tunesmith.errors import ConfigError
from tunesmith.models.loading import load_tokenizer
from tunesmith.tasks.base import get_task


def _show(record: dict[str, Any]) -> str:
    if isinstance(record.get("words"), list) and record.get("tags") is not None:
        return " ".join(
            w if t == "O" else f"[{w}/{t}]"
            for w, t in zip(record["words"], record["tags"], strict=True)
        )
    text = record.get("text", "")
    return f"{text} || {record['text_pair']}" if record.get("text_pair") else text


def preview(cfg: Config, show: int = 10, seed: int = 0) -> str:
    """The report printed by ``data augment``.

    Raises:
        ConfigError: The config asks for no augmentation.
    """
    aug = cfg.data.augment
    if not aug.enabled and not aug.dynamic_masking:
        raise ConfigError(
            "data augment: the config augments nothing; set data.augment.multiplier "
            "(and the operations' probabilities) or data.augment.dynamic_masking"
        )
    task = get_task(cfg)
    splits = task.load_splits()
    tokenizer = load_tokenizer(
        cfg.model.name_or_path, trust_remote_code=cfg.model.trust_remote_code
    )
    lines: list[str] = []
    records = splits.train
    if aug.enabled:
        records, stats = build_augmenter(cfg, tokenizer)(splits.train)
        lines.append(stats.summary())
        copies: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for rec in records[len(splits.train) :]:
            copies[rec["source"].split(" (augmented ")[0]].append(rec)
        originals = [r for r in splits.train if r["source"] in copies]
        for rec in random.Random(seed).sample(originals, min(show, len(originals))):
            lines += ["", f"{rec['source']} [{rec.get('label', '')}]", f"  = {_show(rec)}"]
            for c in copies[rec["source"]]:
                how = c["source"].rsplit(": ", 1)[-1].rstrip(")")
                lines.append(f"  + {_show(c)}    ({how})")
    if aug.dynamic_masking:
        label2id = {lab: i for i, lab in enumerate(splits.labels)}
        data = training_dataset(cfg, task.encode(records[:1], tokenizer, label2id), tokenizer)
        lines += [
            "",
            f"dynamic masking ({aug.dynamic_masking:.0%} of tokens), {records[0]['source']}:",
        ]
        for epoch in (0, 1):
            data.set_epoch(epoch)  # type: ignore[attr-defined]
            text = tokenizer.decode(data[0]["input_ids"], skip_special_tokens=False)
            lines.append(f"  epoch {epoch + 1}: {text}")
    return "\n".join(lines)
