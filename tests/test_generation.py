"""The shared generation helpers: config -> ``generate`` arguments, prompt/start removal, EOS.

``generate`` itself is replaced by a stub returning fixed sequences, so each
test states exactly what a model produced and what the helpers must make of it.
"""

from __future__ import annotations

from types import SimpleNamespace

import torch

from tunesmith.config.tasks import GenerateConfig
from tunesmith.tasks.generation import (
    NO_TOKEN,
    decode,
    generate_ids,
    generation_kwargs,
    mask_after_eos,
)

X = NO_TOKEN


class StubModel:
    """Returns ``sequences`` from ``generate`` and records the call; tracks train/eval."""

    def __init__(self, sequences: list[list[int]], **config: object) -> None:
        self.sequences = torch.tensor(sequences)
        self.config = SimpleNamespace(**config)
        self.training = True
        self.calls: list[dict] = []

    def eval(self) -> None:
        self.training = False

    def train(self) -> None:
        self.training = True

    def generate(self, **kwargs: object) -> torch.Tensor:
        assert not self.training, "generate must run in eval mode"
        self.calls.append(kwargs)
        return self.sequences


def tokenizer(eos: int | None = 2, pad: int = 1) -> SimpleNamespace:
    return SimpleNamespace(eos_token_id=eos, pad_token_id=pad)


def test_mask_after_eos_hides_eos_and_everything_after_it_per_row():
    ids = torch.tensor([[5, 6, 2, 7, 2], [5, 5, 5, 5, 5], [2, 6, 6, 6, 6]])
    assert mask_after_eos(ids, 2).tolist() == [
        [5, 6, X, X, X],
        [5, 5, 5, 5, 5],  # never ended: cut by max_new_tokens, kept whole
        [X, X, X, X, X],  # ended at once: empty text
    ]
    assert ids[0, 2] == 2, "the input is not modified"
    assert mask_after_eos(ids, None).tolist() == ids.tolist()
    assert mask_after_eos(torch.zeros(2, 0, dtype=torch.long), 2).shape == (2, 0)


def test_encoder_decoder_output_loses_its_start_token_even_when_it_is_eos():
    """BART starts decoding with EOS (id 2); only the token after it is generated text.

    The model config need not name the start token (transformers 5 keeps it in
    the generation config): being an encoder-decoder is what counts.
    """
    model = StubModel([[2, 0, 7, 8, 2, 1], [2, 0, 9, 2, 1, 1]], is_encoder_decoder=True)
    inputs = {"input_ids": torch.ones(2, 4, dtype=torch.long), "attention_mask": torch.ones(2, 4)}
    out = generate_ids(model, inputs, GenerateConfig(), tokenizer(), decoder_only=False)
    assert out.tolist() == [[[0, 7, 8, X, X]], [[0, 9, X, X, X]]]
    assert model.training, "the model's mode is restored"


def test_decoder_only_output_loses_the_prompt_and_returns_are_grouped_per_input():
    prompts = torch.tensor([[1, 4, 5], [4, 5, 6]])  # left-padded
    model = StubModel(
        [[1, 4, 5, 7, 2], [1, 4, 5, 8, 9], [4, 5, 6, 2, 1], [4, 5, 6, 9, 2]],
        is_encoder_decoder=False,
    )
    gen = GenerateConfig(num_beams=2, num_return_sequences=2)
    inputs = {"input_ids": prompts, "attention_mask": (prompts != 1).long()}
    out = generate_ids(model, inputs, gen, tokenizer(), decoder_only=True)
    assert out.shape == (2, 2, 2)
    assert out.tolist() == [[[7, X], [8, 9]], [[X, X], [9, X]]]
    call = model.calls[0]
    assert (call["num_beams"], call["num_return_sequences"]) == (2, 2)
    assert call["pad_token_id"] == 1 and call["eos_token_id"] == 2


def test_sampling_knobs_reach_generate_only_when_sampling():
    greedy = generation_kwargs(GenerateConfig(temperature=0.5), tokenizer(eos=None))
    assert greedy["temperature"] is None and "eos_token_id" not in greedy
    sampled = generation_kwargs(GenerateConfig(do_sample=True, top_k=5), tokenizer())
    assert (sampled["temperature"], sampled["top_k"], sampled["do_sample"]) == (1.0, 5, True)


def test_decode_skips_masked_positions_and_special_tokens():
    class Tok:
        def decode(self, ids: list[int], skip_special_tokens: bool) -> str:
            assert skip_special_tokens
            return " ".join(f"w{i}" for i in ids) + " "

    ids = torch.tensor([[[3, 4, X], [X, X, X]], [[5, X, X], [6, 7, 8]]])
    assert decode(ids, Tok()) == [["w3 w4", ""], ["w5", "w6 w7 w8"]]
