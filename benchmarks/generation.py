"""Batched generation against batched ``model.generate`` (docs/benchmarks.md: "Batched generation").

SmolLM2-135M-Instruct (the offline demo model, fp32) answers 16 chat prompts
(the first user turns of 16 chatterbot conversations, rendered by its chat
template), greedy, stopping at EOS, in two workloads:

- ``uniform``: every request may write up to 64 tokens;
- ``mixed``: the requests' budgets cycle through 16, 32, 64 and 128 tokens.
  ``model.generate`` takes one budget per batch, so it runs to the largest
  and each row is cut to its own budget afterwards (what a caller has to do).

Contenders: ``model.generate`` on the left-padded batch, and tunesmith's
``Generator`` with its defaults and with each lever switched off (or, for the
static cache and ``torch.compile``, on). Every contender must return the same
tokens as ``model.generate`` (asserted after the table is printed). Speed is
generated tokens (each row up to its EOS or budget) per second of wall time,
best of ``--repeats`` rounds; the contenders take turns within a round, so a
busy machine slows them alike. Compiling is timed apart (the first call of
each batch shape, with the inductor caches off: a cold start) and left out of
the speed.

    python benchmarks/generation.py [--threads N] [--repeats 2] [--workloads uniform mixed]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch._inductor.config
from _runs import ROOT
from transformers import AutoModelForCausalLM

from tunesmith.assets.locate import ASSETS, locate
from tunesmith.models.completions import GenerationRequest, chat_prompt_ids
from tunesmith.models.decoding import ModelRunner
from tunesmith.models.generator import GenerationStats, Generator, GeneratorOptions
from tunesmith.models.loading import load_tokenizer
from tunesmith.studies.bench.measure import machine_info, read_jsonl

PROMPTS = 16
WORKLOADS = {"uniform": [64], "mixed": [16, 32, 64, 128]}


@dataclass(frozen=True)
class Contender:
    """A way to generate: ``model.generate`` (no options) or the generator with ``options``."""

    label: str
    options: GeneratorOptions | None


#: The reference, the defaults, then each lever off (or, for the static cache and compile, on).
CONTENDERS = {
    "hf": Contender("model.generate (HF)", None),
    "defaults": Contender("tunesmith (defaults)", GeneratorOptions()),
    "no-compaction": Contender("- compaction", GeneratorOptions(compaction=False)),
    "dynamic-cache": Contender(
        "- preallocated cache (HF DynamicCache)", GeneratorOptions(kv_cache="dynamic")
    ),
    "all-prefill-logits": Contender(
        "- last-position LM head in prefill", GeneratorOptions(last_logits_only=False)
    ),
    "chunked-prefill": Contender(
        "- one-pass prefill (chunks of 8)", GeneratorOptions(prefill_chunk=8)
    ),
    "static": Contender("+ static cache", GeneratorOptions(kv_cache="static")),
    "static-compile": Contender(
        "+ static cache + torch.compile", GeneratorOptions(kv_cache="static", compile=True)
    ),
}
#: Context lengths of the KV-cache step measurement.
CONTEXTS = (128, 1024)


def chat_prompts(tokenizer: Any, count: int) -> list[list[int]]:
    """First user turns of ``count`` different chatterbot questions, spread over the corpus."""
    questions: list[str] = []
    for row in read_jsonl(locate(ASSETS["chatterbot"])):
        question = row["messages"][0]["content"]
        if question not in questions:
            questions.append(question)
    picked = questions[:: len(questions) // count][:count]
    return [chat_prompt_ids(tokenizer, [{"role": "user", "content": q}]) for q in picked]


def until_stop(row: list[int], eos: set[int], budget: int) -> list[int]:
    """``row`` cut to ``budget`` tokens and after its first EOS."""
    row = row[:budget]
    ends = [i for i, t in enumerate(row) if t in eos]
    return row[: ends[0] + 1] if ends else row


def hf_runner(model: Any, tokenizer: Any) -> Callable[[list[list[int]], list[int]], list]:
    """Batched ``model.generate``: left-padded, greedy, to the largest budget, rows cut after."""
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos])

    def run(prompts: list[list[int]], budgets: list[int]) -> list[list[int]]:
        tokenizer.padding_side = "left"
        batch = tokenizer.pad({"input_ids": prompts}, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**batch, max_new_tokens=max(budgets), do_sample=False)
        rows = out[:, batch["input_ids"].shape[1] :].tolist()
        return [until_stop(r, eos_ids, b) for r, b in zip(rows, budgets, strict=True)]

    return run


def our_runner(gen: Generator) -> Callable[[list[list[int]], list[int]], list]:
    """The generator on the same prompts and budgets."""

    def run(prompts: list[list[int]], budgets: list[int]) -> list[list[int]]:
        pairs = zip(prompts, budgets, strict=True)
        requests = [GenerationRequest(p, max_new_tokens=b) for p, b in pairs]
        return [r.completions[0].token_ids for r in gen.generate(requests)]

    return run


def measure(run: Callable, prompts: list[list[int]], budgets: list[int], gen: Generator | None):
    """One timed call: outputs and a record of wall seconds (compiling left out) and counters."""
    before = dataclasses.replace(gen.stats) if gen else GenerationStats()
    started = time.perf_counter()
    outputs = run(prompts, budgets)
    seconds = time.perf_counter() - started
    after = gen.stats if gen else GenerationStats()
    compile_s = after.compile_seconds - before.compile_seconds
    record = {
        "seconds": round(seconds - compile_s, 2),
        "compile_s": round(compile_s, 1),
        "prefill_s": round(after.prefill_seconds - before.prefill_seconds, 2),
        "row_steps": after.row_steps - before.row_steps,
    }
    return outputs, record


def bench_workload(model, tokenizer, prompts, budgets, keys: list[str], repeats: int) -> dict:
    """Every contender ``repeats`` times, taking turns; the record of each one's fastest run."""
    runners: dict[str, tuple[Callable, Generator | None]] = {}
    for key in keys:
        options = CONTENDERS[key].options
        gen = Generator(model, tokenizer, options) if options else None
        runners[key] = (our_runner(gen) if gen else hf_runner(model, tokenizer), gen)
    runs: dict[str, list[dict]] = {key: [] for key in keys}
    outputs: dict[str, list] = {}
    for round_ in range(repeats):
        turn = keys[round_ % len(keys) :] + keys[: round_ % len(keys)]  # rotate the order
        for key in turn:
            run, gen = runners[key]
            outputs[key], record = measure(run, prompts, budgets, gen)
            runs[key].append(record)
            print(f"  {CONTENDERS[key].label}: {record['seconds']:.1f}s", flush=True)
    results = {}
    for key in keys:
        best = min(runs[key], key=lambda r: r["seconds"])
        tokens = sum(len(o) for o in outputs[key])
        results[key] = best | {
            "label": CONTENDERS[key].label,
            "all_seconds": [r["seconds"] for r in runs[key]],
            "median_s": statistics.median(r["seconds"] for r in runs[key]),
            "compile_s": sum(r["compile_s"] for r in runs[key]),
            "tokens": tokens,
            "tokens_per_s": round(tokens / best["seconds"], 1),
            "same_as_hf": outputs[key] == outputs["hf"],
        }
    return results


def kv_cache_steps(model: Any, kinds: list[str], rows: int = PROMPTS, steps: int = 6) -> dict:
    """Best seconds of one decoding step of ``rows`` rows after ``CONTEXTS`` cached positions.

    The cache is filled with random keys and values (a prefill of 16 x 1024
    tokens would take minutes here and is the same for every cache).
    """
    text = model.config.get_text_config()
    heads, dim = text.num_key_value_heads, text.hidden_size // text.num_attention_heads
    dim = getattr(text, "head_dim", None) or dim
    out: dict[str, dict[str, float]] = {kind: {} for kind in kinds}
    with torch.inference_mode():
        for context in CONTEXTS:
            for kind in kinds:
                runner = ModelRunner(model, GeneratorOptions(kv_cache=kind))  # type: ignore[arg-type]
                cache = runner.cache_for(rows, context + steps)
                for layer in range(text.num_hidden_layers):
                    kv = torch.randn(rows, heads, context, dim)
                    cache.update(kv, kv.clone(), layer)
                token = torch.zeros((rows, 1), dtype=torch.long)
                times = []
                for step in range(steps):
                    mask = torch.ones((rows, context + step + 1), dtype=torch.long)
                    position = torch.full((rows, 1), context + step)
                    started = time.perf_counter()
                    runner.forward(token, mask, position, cache)
                    times.append(time.perf_counter() - started)
                out[kind][str(context)] = round(min(times), 3)
                print(f"  {kind} cache, {context} positions: {min(times) * 1000:.0f} ms/step")
    return out


def table(workload: str, results: dict[str, dict]) -> str:
    """The markdown table of one workload."""
    hf = results["hf"]
    lines = [
        f"**{workload}** (budgets {WORKLOADS[workload]})\n",
        "| contender | tokens | best wall s | tokens/s | vs HF | median wall s | vs HF (median) "
        "| prefill s | row-steps | compile s | = HF |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, r in results.items():
        ours = key != "hf"
        lines.append(
            f"| {r['label']} | {r['tokens']} | {r['seconds']:.1f} | {r['tokens_per_s']:.1f} | "
            f"{hf['seconds'] / r['seconds']:.2f}x | {r['median_s']:.1f} | "
            f"{hf['median_s'] / r['median_s']:.2f}x | {r['prefill_s'] if ours else ''} | "
            f"{r['row_steps'] if ours else ''} | {r['compile_s'] or ''} | "
            f"{'yes' if r['same_as_hf'] else 'NO'} |"
        )
    return "\n".join(lines)


def cache_table(steps: dict[str, dict[str, float]]) -> str:
    """Milliseconds per decoding step by cache and context length."""
    lines = [
        "| KV cache | " + " | ".join(f"ms/step at {c} positions" for c in CONTEXTS) + " |",
        "|---|" + "---|" * len(CONTEXTS),
    ]
    for kind, by_context in steps.items():
        cells = " | ".join(f"{by_context[str(c)] * 1000:.0f}" for c in CONTEXTS)
        lines.append(f"| {kind} | {cells} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--workloads", nargs="*", choices=list(WORKLOADS), default=list(WORKLOADS))
    parser.add_argument(
        "--contenders", nargs="+", choices=list(CONTENDERS), default=list(CONTENDERS)
    )
    parser.add_argument("--caches", nargs="*", default=["preallocated", "dynamic"])
    parser.add_argument("--out", type=Path, default=ROOT / "runs" / "generation_bench")
    parser.add_argument("--report", type=Path, help="print the tables of a saved results.json")
    args = parser.parse_args()
    if args.report:
        print_report(json.loads(args.report.read_text()))
        return
    keys = ["hf", *[k for k in args.contenders if k != "hf"]]  # the reference always runs
    torch.set_num_threads(args.threads)
    torch._inductor.config.force_disable_caches = True  # compile time of a cold start
    folder = str(locate(ASSETS["smollm2"]))
    tokenizer = load_tokenizer(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    prompts = chat_prompts(tokenizer, PROMPTS)
    report: dict[str, Any] = {"machine": machine_info(), "prompt_tokens": list(map(len, prompts))}
    for workload in args.workloads:
        budgets = [WORKLOADS[workload][i % len(WORKLOADS[workload])] for i in range(PROMPTS)]
        print(f"{workload}:", flush=True)
        report[workload] = bench_workload(model, tokenizer, prompts, budgets, keys, args.repeats)
    if args.caches:
        print("KV cache steps:", flush=True)
        report["kv_cache_steps"] = kv_cache_steps(model, args.caches)
    report["load_average_after"] = [round(x, 2) for x in os.getloadavg()]
    report["threads"] = args.threads
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "results.json").write_text(json.dumps(report, indent=2))
    print_report(report)


def print_report(report: dict[str, Any]) -> None:
    """The machine line, one table per workload and the KV-cache table; asserts equal output."""
    m = report["machine"]
    print(
        f"\n{m['cpu']}, {m['cores']} cores, {report['threads']} threads, {m['cpu_capability']}, "
        f"torch {m['torch']}, transformers {m['transformers']}, load average "
        f"{m['load_average'][0]} -> {report['load_average_after'][0]}, {m['date']}\n"
    )
    workloads = [w for w in WORKLOADS if w in report]
    for workload in workloads:
        print(table(workload, report[workload]) + "\n")
    if "kv_cache_steps" in report:
        print(cache_table(report["kv_cache_steps"]) + "\n")
    wrong = [(w, k) for w in workloads for k, r in report[w].items() if not r["same_as_hf"]]
    assert not wrong, f"greedy output differs from model.generate: {wrong}"


if __name__ == "__main__":
    main()
