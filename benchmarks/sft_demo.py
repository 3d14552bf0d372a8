"""The instruction-tuning demo, before and after (docs/benchmarks.md: "Instruction tuning").

Trains ``examples/sft_smollm2.yaml`` (SmolLM2-135M-Instruct + LoRA on the
chatterbot corpus) and shows what changed: validation perplexity of the
untuned model (step 0) and of the best checkpoint, test perplexity, and the
replies of the untuned and the tuned model to a few held-out test questions
(questions never trained on: the split keeps each question on one side).

    python benchmarks/sft_demo.py [--questions 3] [overrides ...]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _runs import ROOT

from tunesmith.config.root import Config
from tunesmith.models.loading import load_tokenizer
from tunesmith.runs.predict import predict_records
from tunesmith.runs.train import predict, train
from tunesmith.tasks.base import get_task


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=3)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=2")
    args = parser.parse_args()
    cfg = Config.load(ROOT / "examples" / "sft_smollm2.yaml", args.overrides)
    task = get_task(cfg)
    test = task.load_splits().test
    seen, questions = set(), []
    for record in test:
        if record["group"] not in seen:
            seen.add(record["group"])
            questions.append(record)
        if len(questions) == args.questions:
            break
    prompts = [q["text"] for q in questions]
    tokenizer = load_tokenizer(cfg.model.name_or_path)
    base = task.build_model([], tokenizer)
    before = predict_records(base, task, tokenizer, [], task.text_records(prompts), batch_size=8)
    del base
    started = time.perf_counter()
    result = train(cfg)
    minutes = (time.perf_counter() - started) / 60
    after = predict(result.best_dir, prompts, batch_size=8)
    log = Path(cfg.train.output_dir) / "metrics.jsonl"
    val = [r for r in map(json.loads, log.read_text().splitlines()) if r["split"] == "validation"]
    print(
        f"\ntrained {result.loop.steps} steps in {minutes:.1f} min "
        f"({result.loop.tokens_per_s:.0f} real tokens/s)"
    )
    print(
        f"validation perplexity: untuned {val[0]['perplexity']:.2f} (step 0) -> "
        f"best {result.loop.best_metric:.2f} (step {result.loop.best_step})"
    )
    print(f"test perplexity (best checkpoint): {result.test_metrics['perplexity']:.2f}\n")
    for q, b, a in zip(questions, before, after, strict=True):
        gold = q["messages"][-1]["content"]
        print(
            f"Q: {q['text']}\n  reference: {gold}\n  untuned:   {b['generated']}\n"
            f"  tuned:     {a['generated']}\n"
        )


if __name__ == "__main__":
    main()
