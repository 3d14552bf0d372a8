"""The batched generator: greedy output equals ``model.generate``, stops, sampling, n, log-probs.

A tiny random Llama with a byte-level tokenizer (tests/chat_fixtures.py)
whose weights are drawn wider than usual (``initializer_range`` 0.3): with
the usual 0.02 a random model repeats one token forever, which would let a
wrong position id or a misplaced cache row go unnoticed.
"""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
from transformers.generation.logits_process import (
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from chat_fixtures import build_tiny_llama
from tunesmith.errors import GenerationError
from tunesmith.models.completions import GenerationRequest
from tunesmith.models.decoding import accepts_logits_to_keep
from tunesmith.models.generator import Generator, GeneratorOptions
from tunesmith.models.sampling import filter_logits

TEXTS = [
    "hello world",
    "What is your name? Where do you live? How old are you?",
    "I am a tiny bot.",
    "the quick brown fox jumps over the lazy dog",
]
BUDGETS = [20, 7, 13, 20]
#: Every way to switch a lever off must still give the same greedy tokens.
VARIANTS = {
    "default": GeneratorOptions(),
    "no compaction": GeneratorOptions(compaction=False),
    "dynamic cache": GeneratorOptions(kv_cache="dynamic"),
    "static cache": GeneratorOptions(kv_cache="static"),
    "compiled decode step": GeneratorOptions(kv_cache="static", compile=True),
    "chunked prefill": GeneratorOptions(prefill_chunk=3),
    "all prefill logits": GeneratorOptions(last_logits_only=False),
    "two rows a batch": GeneratorOptions(max_batch_rows=2),
}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One intra-op thread for this module's tests, the count restored after them.

    A model this small gains nothing from more, and on a busy machine the
    threads waiting on each other made a test 100 times slower.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def lm(tmp_path_factory: pytest.TempPathFactory) -> tuple[LlamaForCausalLM, object]:
    """A random Llama whose greedy continuations vary, and its tokenizer (left padding)."""
    folder = build_tiny_llama(Path(tmp_path_factory.mktemp("tiny-llama")))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.padding_side = "left"
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.bos_token_id,
        initializer_range=0.3,
    )
    return LlamaForCausalLM(config).eval(), tokenizer


def prompt_ids(tokenizer, texts=TEXTS) -> list[list[int]]:
    return [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]


def until_eos(row: list[int], eos: int) -> list[int]:
    """``row`` up to and including its first ``eos``."""
    return row[: row.index(eos) + 1] if eos in row else row


def hf_greedy(model, tokenizer, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    """``model.generate(do_sample=False)`` on the left-padded batch, each row cut after EOS."""
    batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=False)
    eos = model.generation_config.eos_token_id
    return [until_eos(row, eos) for row in out[:, batch["input_ids"].shape[1] :].tolist()]


def token_ids(results) -> list[list[int]]:
    return [r.completions[0].token_ids for r in results]


@pytest.mark.parametrize("options", VARIANTS.values(), ids=VARIANTS.keys())
def test_greedy_equals_generate_with_per_request_budgets(lm, options):
    model, tokenizer = lm
    prompts = prompt_ids(tokenizer)
    assert len({len(p) for p in prompts}) == len(prompts)  # really left-padded
    reference = hf_greedy(model, tokenizer, prompts, max(BUDGETS))
    requests = [
        GenerationRequest(p, max_new_tokens=b) for p, b in zip(prompts, BUDGETS, strict=True)
    ]
    results = Generator(model, tokenizer, options).generate(requests)
    assert token_ids(results) == [row[:b] for row, b in zip(reference, BUDGETS, strict=True)]
    assert [r.completions[0].finish_reason for r in results] == ["length"] * len(TEXTS)
    assert len(set(map(tuple, token_ids(results)))) == len(TEXTS)  # not one token repeated


def test_a_lora_wrapped_model_generates_like_its_generate(lm):
    model, tokenizer = lm
    lora = LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    wrapped = get_peft_model(copy.deepcopy(model), lora).eval()
    assert accepts_logits_to_keep(wrapped)  # the wrapper passes it on to the Llama
    prompts = prompt_ids(tokenizer)
    reference = hf_greedy(wrapped, tokenizer, prompts, 8)
    results = Generator(wrapped, tokenizer).generate(
        [GenerationRequest(p, max_new_tokens=8) for p in prompts]
    )
    assert token_ids(results) == reference
    assert reference != hf_greedy(model, tokenizer, prompts, 8)  # the adapter changes the output


def test_text_prompts_are_tokenized_as_given(lm):
    model, tokenizer = lm
    gen = Generator(model, tokenizer)
    by_text = gen.generate([GenerationRequest(t, max_new_tokens=5) for t in TEXTS])
    by_ids = gen.generate([GenerationRequest(p, max_new_tokens=5) for p in prompt_ids(tokenizer)])
    assert token_ids(by_text) == token_ids(by_ids)
    assert by_text[1].prompt_ids == prompt_ids(tokenizer)[1]


@pytest.mark.parametrize("compaction", [True, False])
def test_eos_ends_each_row_where_generate_ends_it(lm, monkeypatch, compaction):
    model, tokenizer = lm
    prompts = prompt_ids(tokenizer)
    free = token_ids(
        Generator(model, tokenizer).generate(
            [GenerationRequest(p, max_new_tokens=20) for p in prompts]
        )
    )
    eos = free[0][5]  # a token the model writes mid-row: make it the end of sequence
    monkeypatch.setattr(model.generation_config, "eos_token_id", eos)
    reference = hf_greedy(model, tokenizer, prompts, 20)
    gen = Generator(model, tokenizer, GeneratorOptions(compaction=compaction))
    results = gen.generate([GenerationRequest(p, max_new_tokens=20) for p in prompts])
    assert token_ids(results) == reference
    reasons = [r.completions[0].finish_reason for r in results]
    assert set(reasons) == {"stop", "length"}  # rows end at different steps
    for result, reason in zip(results, reasons, strict=True):
        completion = result.completions[0]
        assert (completion.stopped_by == eos) == (reason == "stop")
        assert (completion.token_ids[-1] == eos) == (reason == "stop")
    assert (
        gen.stats.row_steps < 19 * len(prompts)
        if compaction
        else gen.stats.row_steps == 19 * len(prompts)
    )


def first_completing_token(tokenizer, ids: list[int], stop: str) -> int:
    """Index of the token whose decoding first contains ``stop``."""
    return next(k for k in range(len(ids)) if stop in tokenizer.decode(ids[: k + 1]))


def ascii_piece(tokenizer, token: int) -> str:
    piece = tokenizer.decode([token])
    return piece if piece.isascii() and piece.isprintable() and piece.strip() == piece else ""


def test_stop_strings_cut_the_text_also_across_token_boundaries(lm):
    model, tokenizer = lm
    prompt = prompt_ids(tokenizer)[1]
    gen = Generator(model, tokenizer)
    [free] = gen.generate([GenerationRequest(prompt, max_new_tokens=24)])
    ids = free.completions[0].token_ids
    pieces = [ascii_piece(tokenizer, t) for t in ids]
    # A stop string made of the last character of one token and the first of the next.
    k = next(k for k in range(1, len(ids)) if pieces[k - 1] and pieces[k] and k > 2)
    spanning = pieces[k - 1][-1] + pieces[k][0]
    # And one that ends inside a single token.
    j = next(j for j in range(len(ids)) if len(pieces[j]) >= 2)
    inside = pieces[j][0]
    for stop in (spanning, inside):
        at = first_completing_token(tokenizer, ids, stop)
        [result] = gen.generate(
            [GenerationRequest(prompt, max_new_tokens=24, stop=["never seen", stop])]
        )
        completion = result.completions[0]
        full = tokenizer.decode(ids[: at + 1])
        assert completion.token_ids == ids[: at + 1]
        assert completion.text == full[: full.index(stop)]
        assert (completion.finish_reason, completion.stopped_by) == ("stop", stop)
    assert spanning not in tokenizer.decode(ids[:k])  # it really needed the next token
    assert first_completing_token(tokenizer, ids, spanning) <= k


def test_filters_equal_transformers_warpers_row_by_row():
    torch.manual_seed(0)
    logits = torch.randn(1, 64) * 3
    settings = [
        (0.7, 0, 1.0),
        (1.0, 5, 1.0),
        (1.0, 0, 0.8),
        (1.3, 10, 0.5),
        (0.5, 3, 0.95),
        (2.0, 0, 1.0),
    ]
    ours = filter_logits(
        logits.repeat(len(settings), 1),
        torch.tensor([t for t, _, _ in settings]),
        torch.tensor([k for _, k, _ in settings]),
        torch.tensor([p for _, _, p in settings]),
    )
    for row, (temperature, top_k, top_p) in enumerate(settings):
        reference = TemperatureLogitsWarper(temperature)(None, logits)
        if top_k:
            reference = TopKLogitsWarper(top_k)(None, reference)
        if top_p < 1:
            reference = TopPLogitsWarper(top_p)(None, reference)
        torch.testing.assert_close(ours[row], reference[0])
        kept = int(torch.isfinite(ours[row]).sum())
        assert kept == (top_k or 64) if top_p == 1 else 1 <= kept < 64


def sample(gen: Generator, prompt: list[int], **settings) -> list[list[int]]:
    [result] = gen.generate(
        [GenerationRequest(prompt, max_new_tokens=12, temperature=1.0, **settings)]
    )
    return [c.token_ids for c in result.completions]


def test_sampling_is_reproducible_per_request_seed(lm):
    model, tokenizer = lm
    gen = Generator(model, tokenizer)
    prompt, other = prompt_ids(tokenizer)[:2]
    first = sample(gen, prompt, seed=1)
    assert sample(gen, prompt, seed=1) == first
    assert sample(gen, prompt, seed=2) != first
    # Other requests in the batch do not move this request's random stream.
    crowded = gen.generate(
        [
            GenerationRequest(other, max_new_tokens=5, temperature=1.0, seed=9),
            GenerationRequest(prompt, max_new_tokens=12, temperature=1.0, seed=1),
        ]
    )
    assert crowded[1].completions[0].token_ids == first[0]
    torch.manual_seed(3)
    unseeded = sample(gen, prompt)
    torch.manual_seed(3)
    assert sample(gen, prompt) == unseeded


def test_a_cut_to_one_token_samples_the_greedy_token(lm):
    model, tokenizer = lm
    gen = Generator(model, tokenizer)
    prompt = prompt_ids(tokenizer)[2]
    [greedy] = gen.generate([GenerationRequest(prompt, max_new_tokens=12)])
    expected = [greedy.completions[0].token_ids]
    assert sample(gen, prompt, top_k=1, seed=0) == expected
    assert sample(gen, prompt, top_p=1e-6, seed=0) == expected


def test_n_completions_per_prompt(lm):
    model, tokenizer = lm
    gen = Generator(model, tokenizer)
    prompts = prompt_ids(tokenizer)
    results = gen.generate(
        [
            GenerationRequest(prompts[0], max_new_tokens=10, n=3, temperature=1.0, seed=0),
            GenerationRequest(prompts[1], max_new_tokens=6, n=2),
        ]
    )
    sampled, greedy = (r.completions for r in results)
    assert len(sampled) == 3 and len({tuple(c.token_ids) for c in sampled}) == 3
    [alone] = gen.generate([GenerationRequest(prompts[1], max_new_tokens=6)])
    assert [c.token_ids for c in greedy] == [alone.completions[0].token_ids] * 2
    for c in sampled:  # a sampled row may draw the end-of-sequence token early
        assert len(c.token_ids) == 10 if c.finish_reason == "length" else c.token_ids[-1] == 2
    assert results[1].completion_tokens == 12 and results[1].prompt_tokens == len(prompts[1])


@pytest.mark.parametrize("temperature", [0.0, 0.7])
def test_logprobs_are_the_models_at_the_rows_temperature(lm, temperature):
    model, tokenizer = lm
    prompt = prompt_ids(tokenizer)[3]
    gen = Generator(model, tokenizer)
    request = GenerationRequest(
        prompt, max_new_tokens=8, temperature=temperature, seed=0, logprobs=True
    )
    [completion] = gen.generate([request])[0].completions
    full = torch.tensor([prompt + completion.token_ids])
    with torch.no_grad():
        logits = model(full).logits[0, len(prompt) - 1 : -1]
    scaled = logits / (temperature or 1.0)
    expected = (
        scaled.log_softmax(-1).gather(1, torch.tensor(completion.token_ids)[:, None]).squeeze(1)
    )
    torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    ("request_", "message"),
    [
        (GenerationRequest([5, 6], temperature=-1), "temperature"),
        (GenerationRequest([5, 6], top_p=0), "top_p"),
        (GenerationRequest([5, 6], stop="x"), "list of strings"),
        (GenerationRequest([5, 6], n=0), "n must"),
        (GenerationRequest([5, 6], max_new_tokens=127), "exceeds the model's 128 positions"),
        (GenerationRequest([]), "empty"),
    ],
)
def test_bad_requests_are_refused_before_generating(lm, request_, message):
    model, tokenizer = lm
    with pytest.raises(GenerationError, match=message):
        Generator(model, tokenizer).generate([GenerationRequest([7], max_new_tokens=1), request_])


def test_impossible_options_are_refused(lm):
    model, tokenizer = lm
    with pytest.raises(GenerationError, match="compile needs kv_cache='static'"):
        Generator(model, tokenizer, GeneratorOptions(compile=True))


def test_generation_leaves_a_training_model_training(lm):
    model, tokenizer = lm
    model.train()
    try:
        Generator(model, tokenizer).generate(["hello"])
        assert model.training
    finally:
        model.eval()


def test_streamed_deltas_join_to_each_completions_text(lm):
    """Deltas per row, never text a stop string later cuts, and all of it by the end."""
    model, tokenizer = lm
    prompt = prompt_ids(tokenizer)[1]
    gen = Generator(model, tokenizer)
    [free] = gen.generate([GenerationRequest(prompt, max_new_tokens=24)])
    text = free.completions[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]  # cuts the text in the middle
    for stops in ((), (stop,)):
        deltas: dict[int, list[str]] = {0: [], 1: []}
        request = GenerationRequest(
            prompt,
            max_new_tokens=24,
            stop=stops,
            n=2,
            temperature=0.9,
            seed=3,
            on_text=lambda row, delta, got=deltas: got[row].append(delta),
        )
        [result] = gen.generate([request])
        for row, completion in enumerate(result.completions):
            assert "".join(deltas[row]) == completion.text
            assert len(deltas[row]) > 2  # streamed as it went, not at the end only
            assert all(stops[0] not in d for d in deltas[row]) if stops else True


def test_one_batch_serves_several_lora_adapters_each_as_alone(lm):
    """peft's ``adapter_names``: rows of different adapters (and the bare base) in one batch."""
    model, tokenizer = lm
    wrapped = get_peft_model(
        copy.deepcopy(model),
        LoraConfig(r=4, target_modules=["q_proj", "v_proj"], init_lora_weights=False),
        adapter_name="a",
    )
    torch.manual_seed(1)
    wrapped.add_adapter("b", LoraConfig(r=2, target_modules=["v_proj"], init_lora_weights=False))
    wrapped.eval()
    gen = Generator(wrapped, tokenizer)
    prompts = prompt_ids(tokenizer)
    names = ["a", "b", "__base__", None]  # None: the active adapter, "a"
    mixed = gen.generate(
        [
            GenerationRequest(p, max_new_tokens=8, adapter=n)
            for p, n in zip(prompts, names, strict=True)
        ]
    )
    for prompt, name, result in zip(prompts, names, mixed, strict=True):
        [alone] = gen.generate([GenerationRequest(prompt, max_new_tokens=8, adapter=name)])
        assert result.completions[0].token_ids == alone.completions[0].token_ids, name
    with wrapped.disable_adapter():
        base = hf_greedy(wrapped, tokenizer, [prompts[2]], 8)
    assert mixed[2].completions[0].token_ids == base[0]  # the bare base
    [as_a] = gen.generate([GenerationRequest(prompts[3], max_new_tokens=8, adapter="a")])
    assert mixed[3].completions[0].token_ids == as_a.completions[0].token_ids
    assert len({tuple(r.completions[0].token_ids) for r in mixed[:3]}) == 3


def test_prompt_learning_models_are_refused(lm):
    from peft import PrefixTuningConfig

    model, tokenizer = lm
    prefixed = get_peft_model(
        copy.deepcopy(model), PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4)
    )
    with pytest.raises(GenerationError, match="prefix or prompt tuning"):
        Generator(prefixed, tokenizer)
