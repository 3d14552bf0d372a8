"""Back-translation: data language -> pivot -> data language, through two local models.

A paraphrase that keeps the meaning (and so the label) of a sentence while
changing its words is the best augmentation there is for text classifiers,
when translation models are at hand. None ships offline: the user gives two
seq2seq checkpoints by path (for example a pair of Marian opus-mt models,
English to German and back, saved locally). They are loaded with the same
safety rules as training models (safetensors only, no remote code unless
``model.trust_remote_code``), run in eval mode without gradients, and
decoded with beam search or greedily, so the result is deterministic.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from tunesmith.config.augment import BackTranslationConfig
from tunesmith.models.loading import load_pretrained, load_tokenizer


class BackTranslator:
    """Translates texts forward and back in batches.

    Args:
        cfg: The ``data.augment.back_translation`` section.
        trust_remote_code: ``model.trust_remote_code`` of the run.
    """

    def __init__(self, cfg: BackTranslationConfig, *, trust_remote_code: bool = False) -> None:
        self.cfg = cfg
        self._models = [
            _load(path, trust_remote_code=trust_remote_code) for path in (cfg.forward, cfg.backward)
        ]

    def __call__(
        self, texts: Sequence[str], progress: Callable[[int], None] | None = None
    ) -> list[str]:
        """``texts`` translated to the pivot language and back, in order."""
        out: list[str] = []
        for start in range(0, len(texts), self.cfg.batch_size):
            batch = list(texts[start : start + self.cfg.batch_size])
            for model, tokenizer in self._models:
                batch = self._translate(model, tokenizer, batch)
            out.extend(batch)
            if progress is not None:
                progress(len(batch))
        return out

    @torch.no_grad()
    def _translate(self, model: Any, tokenizer: Any, texts: list[str]) -> list[str]:
        enc = tokenizer(
            texts,
            return_tensors="pt",
            padding=True,
            truncation=True,
            max_length=self.cfg.max_length,
        )
        generated = model.generate(
            **enc,
            max_new_tokens=self.cfg.max_length,
            num_beams=self.cfg.num_beams,
            do_sample=False,
        )
        return [t.strip() for t in tokenizer.batch_decode(generated, skip_special_tokens=True)]


def _load(path: str, *, trust_remote_code: bool) -> tuple[Any, Any]:
    from transformers import AutoModelForSeq2SeqLM

    model = load_pretrained(AutoModelForSeq2SeqLM, path, trust_remote_code=trust_remote_code)
    return model.eval(), load_tokenizer(path, trust_remote_code=trust_remote_code)
