"""Text generation shared by the generative tasks (seq2seq, causal_lm).

One place turns the ``generate`` config section into ``model.generate``
arguments and the generated sequences into a tensor the evaluation runner can
gather and concatenate like any other prediction: shape ``(batch, returns,
new_tokens)``, the prompt removed for decoder-only models, every position
after the end-of-sequence token (and padding) set to -100.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from tunesmith.config.tasks import GenerateConfig

#: Marks "no token" in generated id tensors (after EOS, padding of ragged batches).
NO_TOKEN = -100


def generation_kwargs(gen: GenerateConfig, tokenizer: Any) -> dict[str, Any]:
    """``model.generate`` keyword arguments for ``gen`` (sampling knobs only when sampling)."""
    kwargs: dict[str, Any] = {
        "max_new_tokens": gen.max_new_tokens,
        "num_beams": gen.num_beams,
        "num_return_sequences": gen.num_return_sequences,
        "do_sample": gen.do_sample,
        "pad_token_id": tokenizer.pad_token_id,
    }
    if tokenizer.eos_token_id is not None:
        kwargs["eos_token_id"] = tokenizer.eos_token_id
    if gen.do_sample:
        kwargs |= {"temperature": gen.temperature, "top_p": gen.top_p, "top_k": gen.top_k}
    else:  # silence "temperature is set but do_sample is False" from the model's defaults
        kwargs |= {"temperature": None, "top_p": None, "top_k": None}
    return kwargs


@torch.no_grad()
def generate_ids(
    model: Any,
    inputs: Mapping[str, torch.Tensor],
    gen: GenerateConfig,
    tokenizer: Any,
    *,
    decoder_only: bool,
) -> torch.Tensor:
    """Generated token ids, ``(batch, num_return_sequences, new_tokens)``, -100 after EOS.

    Args:
        model: A transformers model (unwrapped: DDP wrappers have no ``generate``).
        inputs: ``input_ids`` and ``attention_mask`` of the prompts (left-padded
            for decoder-only models, so every prompt ends where generation starts).
        gen: The ``generate`` config section.
        tokenizer: Supplies the pad and end-of-sequence ids.
        decoder_only: Strip the prompt from the returned sequences.
    """
    was_training = model.training
    model.eval()
    try:
        out = model.generate(
            input_ids=inputs["input_ids"],
            attention_mask=inputs["attention_mask"],
            **generation_kwargs(gen, tokenizer),
        )
    finally:  # a failed generation must not leave a training model in eval mode
        if was_training:
            model.train()
    if decoder_only:
        out = out[:, inputs["input_ids"].shape[1] :]
    elif getattr(model.config, "is_encoder_decoder", False):
        # Encoder-decoder output always starts with the decoder start token, which
        # is not generated text; it may equal EOS (BART), so it goes before masking.
        out = out[:, 1:]
    out = mask_after_eos(out, tokenizer.eos_token_id)
    return out.reshape(inputs["input_ids"].shape[0], gen.num_return_sequences, -1)


def mask_after_eos(ids: torch.Tensor, eos_id: int | None) -> torch.Tensor:
    """``ids`` with the EOS token and everything after it set to -100, per row."""
    ids = ids.clone()
    if eos_id is None or not ids.numel():
        return ids
    seen = (ids == eos_id).long().cumsum(dim=1) > 0
    ids[seen] = NO_TOKEN
    return ids


def decode(ids: torch.Tensor, tokenizer: Any) -> list[list[str]]:
    """Texts of a ``(batch, returns, tokens)`` id tensor, -100 skipped."""
    return [
        [
            tokenizer.decode([t for t in row.tolist() if t >= 0], skip_special_tokens=True).strip()
            for row in item
        ]
        for item in ids
    ]


def generated_rows(ids: torch.Tensor, tokenizer: Any, returns: int) -> list[dict[str, Any]]:
    """``predict`` rows of every generative task: ``{"generated": text}``.

    With ``returns`` (``num_return_sequences``) above 1 the value is the list
    of that many texts, best first.
    """
    texts = decode(ids, tokenizer)
    return [{"generated": t if returns > 1 else t[0]} for t in texts]
