"""Turning shipped offline assets into the forms tunesmith trains on, once.

Two demo assets do not ship in a trainable form:

- SmolLM2-135M-Instruct comes as a 4-bit GGUF file. transformers can read it
  (de-quantising to fp32) but marks the result as quantized, which blocks
  training and saving; we rebuild a plain model from its config, load the
  de-quantised weights and save a safetensors folder with the tokenizer and
  its chat template (~540 MB).
- The chatterbot corpus is YAML files of conversations; we write them as one
  JSONL file of chat ``messages`` (user and assistant turns alternating),
  with the category and source file of each conversation.

Results go to a cache folder (``$TUNESMITH_CACHE``, default
``~/.cache/tunesmith``) and are written to a temporary name first and renamed
into place, so an interrupted conversion never leaves a half-written asset.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml

#: Bumped when a conversion changes, so an old cached result is not reused.
PREP_VERSION = "1"


def cache_root() -> Path:
    """Where prepared assets live (``$TUNESMITH_CACHE`` or ``~/.cache/tunesmith``)."""
    root = os.environ.get("TUNESMITH_CACHE")
    return Path(root) if root else Path.home() / ".cache" / "tunesmith"


def prepared(name: str, source: Path, convert: Callable[[Path, Path], None], suffix: str) -> Path:
    """The prepared form of ``source`` (converted on first use, then reused).

    Args:
        name: Asset name (the cache entry's name).
        source: The shipped file or folder.
        convert: Writes the prepared form of ``source`` to the given path.
        suffix: File suffix of the prepared form ("" for a folder).
    """
    target = cache_root() / "assets" / f"{name}-v{PREP_VERSION}{suffix}"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = target.with_name(f".{target.name}.tmp{os.getpid()}")
    try:
        convert(source, tmp)
        os.replace(tmp, target)
    finally:
        if tmp.is_dir():
            shutil.rmtree(tmp, ignore_errors=True)
        elif tmp.exists():
            tmp.unlink()
    return target


def gguf_to_folder(gguf: Path, out: Path) -> None:
    """Write the GGUF model at ``gguf`` as a plain fp32 safetensors model folder."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    from tunesmith.models.loading import quiet_transformers

    quiet_transformers()
    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(quantized.state_dict(), strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    if set(missing) - tied or unexpected:
        raise RuntimeError(
            f"{gguf}: converted weights do not match the model (missing {missing}, "
            f"unexpected {unexpected})"
        )
    plain.tie_weights()
    plain.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)


def chatterbot_to_jsonl(folder: Path, out: Path) -> None:
    """Write every conversation of the chatterbot YAML files in ``folder`` as JSONL."""
    lines = []
    for path in sorted(folder.glob("*.yml")):
        doc: dict[str, Any] = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        category = ", ".join(map(str, doc.get("categories") or [path.stem]))
        for n, turns in enumerate(doc.get("conversations") or []):
            texts = [str(t).strip() for t in turns if t is not None and str(t).strip()]
            if len(texts) < 2:
                continue
            if len(texts) % 2:  # a conversation must end with the assistant's turn
                texts = texts[:-1]
            messages = [
                {"role": "user" if i % 2 == 0 else "assistant", "content": t}
                for i, t in enumerate(texts)
            ]
            row = {"messages": messages, "category": category, "origin": f"{path.name}#{n}"}
            lines.append(json.dumps(row, ensure_ascii=False))
    out.write_text("\n".join(lines) + "\n", encoding="utf-8")


def conll_entity_types_jsonl(conll: Path, out: Path) -> None:
    """Write each sentence of a CoNLL file (``token<TAB>tag``, BIO) with the entity types it has.

    A multi-label set derived from NER tags: ``{"text", "entity_types"}`` per
    sentence, the types sorted (an empty list: no entity). Tokens are joined
    with spaces, as the tweets were tokenised.
    """
    rows, tokens, types = [], [], set()
    lines = conll.read_text(encoding="utf-8").splitlines()
    for line in [*lines, ""]:
        parts = line.split()
        if len(parts) >= 2:
            tokens.append(parts[0])
            if parts[-1][:2] in ("B-", "I-"):
                types.add(parts[-1][2:])
        elif not parts and tokens:
            rows.append({"text": " ".join(tokens), "entity_types": sorted(types)})
            tokens, types = [], set()
    out.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), "utf-8")
