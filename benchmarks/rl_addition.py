"""RL with a verifiable reward at small scale: two-digit addition answered as ``answer: N``.

SmolLM2-135M-Instruct is first taught the answer format by a short LoRA SFT
run, kept short on purpose so that it gets well under 70% of held-out problems
right; GRPO then trains from that SFT model (merged in as the starting model,
so it is also the reference) with one reward: 1 when the number after
``answer:`` is the sum, else 0. Stages, each kept in ``--work`` and skipped when
done (the GRPO run resumes from its last checkpoint when interrupted):

1. sft: ``--sft-rows`` problems, one epoch;
2. grpo: ``--rl-prompts`` problems (10% of them validation), ``--group``
   completions each, validation (one sampled answer per prompt) every
   ``--eval-every`` steps: the learning curve;
3. evaluation: greedy answers of the SFT and the GRPO model on
   ``--eval-prompts`` held-out problems.

Prints the table (accuracy, time, generated and trained tokens, time per step
split into generation and training, the generator's tokens/s), writes
``results.json`` and ``curve.png``.

    python benchmarks/rl_addition.py --work runs/rl_addition     # the documented run
    python benchmarks/rl_addition.py --quick                     # smoke run, minutes
"""

from __future__ import annotations

import argparse
import json
import random
import re
import time
from pathlib import Path
from typing import Any

import torch

from tunesmith.api import load_checkpoint, train
from tunesmith.assets.locate import SMOLLM2, locate
from tunesmith.config.root import Config
from tunesmith.models.completions import GenerationRequest, chat_prompt_ids
from tunesmith.models.generator import Generator
from tunesmith.training.monitor import read_metrics

#: Where the answer is read from a completion (the reward's pattern too).
ANSWER = r"answer:\s*(-?\d+)"
LORA = {
    "name": "lora",
    "r": 16,
    "alpha": 32,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def problems(n: int, seed: int) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    return [(rng.randint(10, 99), rng.randint(10, 99)) for _ in range(n)]


def question(a: int, b: int) -> str:
    return f"What is {a} + {b}? Reply as 'answer: N'."


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def sft(work: Path, rows: list[tuple[int, int]], args: argparse.Namespace) -> Path:
    best = work / "sft" / "best"
    if best.is_dir():
        return best
    data = write_jsonl(
        work / "sft.jsonl",
        [{"prompt": question(a, b), "response": f"answer: {a + b}"} for a, b in rows],
    )
    cfg = {
        "model": {"name_or_path": str(locate(SMOLLM2))},
        "task": {"type": "causal_lm"},
        "data": {"train": str(data), "format": "prompt_response", "max_length": 64},
        "method": LORA,
        "optim": {"lr": args.sft_lr, "warmup_ratio": 0.05},
        "train": {
            "epochs": 1,
            "batch_size": 16,
            "precision": "fp32",
            "output_dir": str(work / "sft"),
            "overwrite": True,
            "num_threads": args.threads,
        },
    }
    train(Config.from_dict(cfg), progress=args.progress, test=False)
    return best


def grpo(work: Path, sft_dir: Path, rows: list[tuple[int, int]], args) -> Path:
    out = work / "grpo"
    if (out / "final").is_dir():
        return out
    data = write_jsonl(
        work / "rl.jsonl", [{"prompt": question(a, b), "answer": str(a + b)} for a, b in rows]
    )
    cfg = {
        "model": {"name_or_path": str(sft_dir)},
        "task": {"type": "rl"},
        "rl": {
            "algorithm": "grpo",
            "rewards": [{"type": "answer", "pattern": ANSWER}],
            "group_size": args.group,
            "max_new_tokens": args.tokens,
            "temperature": 1.0,
            "beta": args.beta,
            "eval_samples": 8,
        },
        "data": {"train": str(data), "max_length": 64, "validation_fraction": 0.1},
        "method": LORA,
        "optim": {"lr": args.rl_lr, "warmup_ratio": 0.05},
        "train": {
            "epochs": 1,
            "batch_size": args.batch,
            "precision": "fp32",
            "output_dir": str(out),
            "eval_steps": args.eval_every,
            "eval_at_start": True,
            "early_stopping_patience": None,  # the whole curve is the point
            "save_steps": args.eval_every,
            "log_steps": 1,
            "num_threads": args.threads,
            "overwrite": not (out / "checkpoints").is_dir(),
        },
    }
    resume = "latest" if (out / "checkpoints").is_dir() else None
    train(Config.from_dict(cfg), progress=args.progress, test=False, resume=resume)
    return out


def greedy_accuracy(folder: Path, rows: list[tuple[int, int]], tokens: int) -> dict[str, Any]:
    """Greedy answers of the model in ``folder`` to ``rows``: accuracy and a few examples."""
    _, _, model, tokenizer, _ = load_checkpoint(folder)
    gen = Generator(model.eval(), tokenizer)
    requests = [
        GenerationRequest(
            chat_prompt_ids(tokenizer, [{"role": "user", "content": question(a, b)}]),
            max_new_tokens=tokens,
        )
        for a, b in rows
    ]
    started = time.perf_counter()
    results = []
    for start in range(0, len(requests), 32):
        results += gen.generate(requests[start : start + 32])
    texts = [r.completions[0].text for r in results]
    right = [extract(t) == a + b for t, (a, b) in zip(texts, rows, strict=True)]
    return {
        "accuracy": sum(right) / len(right),
        "problems": len(rows),
        "seconds": round(time.perf_counter() - started, 1),
        "examples": [
            {"question": question(a, b), "answer": t}
            for (a, b), t in list(zip(rows, texts, strict=True))[:6]
        ],
    }


def extract(text: str) -> int | None:
    match = re.search(ANSWER, text)
    return int(match.group(1)) if match else None


def run_counts(out: Path) -> dict[str, Any]:
    """The GRPO run's curve and its costs, from its metrics and summary."""
    records = read_metrics(out / "metrics.jsonl")
    train_lines = [r for r in records if r["split"] == "train"]
    curve = [
        (r["step"], r["reward/answer"], r["kl"])
        for r in records
        if r["split"] == "validation" and "reward/answer" in r
    ]
    summary = json.loads((out / "summary.json").read_text())
    steps = max(r["step"] for r in train_lines)
    generation = sum(r.get("generation_s", 0.0) for r in train_lines)
    generated = sum(r.get("generated_tokens", 0.0) for r in train_lines)
    train_s = summary["train_seconds"]
    return {
        "steps": steps,
        "curve": curve,
        "generated_tokens": int(generated),
        "trained_tokens": round(summary["real_tokens_per_s"] * train_s),
        "train_seconds": round(train_s, 1),
        "generation_s_per_step": round(generation / steps, 2),
        "update_s_per_step": round((train_s - generation) / steps, 2),
        "generator_tokens_per_s": round(generated / max(generation, 1e-9), 1),
    }


def plot(counts: dict[str, Any], sft_acc: float, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps, acc, _ = zip(*counts["curve"], strict=True)
    fig, ax = plt.subplots(figsize=(5.5, 3.6))
    ax.plot(steps, acc, marker="o", label="GRPO: validation, one sampled answer per problem")
    ax.axhline(sft_acc, color="grey", linestyle="--", label="SFT start: held-out, greedy")
    ax.set_xlabel("GRPO step")
    ax.set_ylabel("share of problems right")
    ax.set_ylim(0, 1)
    ax.set_title("Two-digit addition: accuracy during GRPO")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/rl_addition"))
    p.add_argument("--sft-rows", type=int, default=96)
    p.add_argument("--sft-lr", type=float, default=1e-3)
    p.add_argument("--rl-prompts", type=int, default=640)
    p.add_argument("--eval-prompts", type=int, default=200)
    p.add_argument("--group", type=int, default=8)
    p.add_argument("--batch", type=int, default=8, help="prompts per step")
    p.add_argument("--tokens", type=int, default=12, help="most tokens per answer")
    p.add_argument("--rl-lr", type=float, default=3e-4)
    p.add_argument("--beta", type=float, default=0.0)
    p.add_argument("--eval-every", type=int, default=10)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny counts")
    args = p.parse_args()
    if args.quick:
        args.sft_rows, args.rl_prompts, args.eval_prompts, args.eval_every = 32, 40, 16, 2
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    rows = problems(args.sft_rows + args.rl_prompts + args.eval_prompts, args.seed)
    held_out = rows[: args.eval_prompts]
    rl_rows = rows[args.eval_prompts : args.eval_prompts + args.rl_prompts]
    sft_rows = rows[args.eval_prompts + args.rl_prompts :]
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}

    def stage(name: str, fn, *a):
        if name not in results:
            started = time.perf_counter()
            results[name] = fn(*a)
            results[f"{name} seconds"] = round(time.perf_counter() - started, 1)
            results_path.write_text(json.dumps(results, indent=1) + "\n")
            print(f"{name}: {results[f'{name} seconds']} s", flush=True)
        return results[name]

    sft_dir = Path(stage("sft", lambda: str(sft(work, sft_rows, args))))
    sft_eval = stage("eval sft", greedy_accuracy, sft_dir, held_out, args.tokens)
    out = Path(stage("grpo", lambda: str(grpo(work, sft_dir, rl_rows, args))))
    grpo_eval = stage("eval grpo", greedy_accuracy, out / "final", held_out, args.tokens)
    counts = run_counts(out)
    results["grpo counts"] = counts
    results_path.write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"\n{len(sft_rows)} SFT problems, {len(rl_rows)} RL problems (10% validation), "
        f"G={args.group}, {args.batch} prompts/step, {counts['steps']} steps, "
        f"{len(held_out)} held-out problems (greedy)"
    )
    print("| model | held-out accuracy (greedy) |\n|---|---|")
    print(f"| SFT start | {sft_eval['accuracy']:.3f} |")
    print(f"| GRPO | {grpo_eval['accuracy']:.3f} |")
    print("\nvalidation curve (step, sampled accuracy, KL):", counts["curve"])
    print(
        f"GRPO: {counts['train_seconds']} s training, {counts['generated_tokens']:,} generated "
        f"and {counts['trained_tokens']:,} trained tokens; per step "
        f"{counts['generation_s_per_step']} s generation + {counts['update_s_per_step']} s "
        f"update; generator {counts['generator_tokens_per_s']} tokens/s"
    )
    plot(counts, sft_eval["accuracy"], work / "curve.png")


if __name__ == "__main__":
    main()
