"""Forgetting of general text by chat SFT, with and without replay (docs/benchmarks.md).

Trains ``examples/sft_smollm2.yaml`` (SmolLM2-135M-Instruct + LoRA on the
chatterbot corpus) twice, measuring the model's perplexity on held-out
paragraphs of Hamlet before and after (``forgetting.reference_text``):
once on chats alone, once replaying the other Hamlet paragraphs
(``forgetting.replay``: a share of each epoch's rows is plain text, every
token trained). The measured and the replayed paragraphs never overlap. Prints
the reference perplexity ratio (after / before: above 1 is forgetting) of both
runs, their chat validation perplexity, and the probe answers.

    python benchmarks/forgetting_replay.py [--replay 0.25] [overrides ...]
"""

from __future__ import annotations

import argparse
import json

from _runs import ROOT

from tunesmith.config.root import Config
from tunesmith.runs.train import train

PROBES = ["Who was William Shakespeare?", "Write one sentence about the sea."]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--replay", type=float, default=0.25)
    parser.add_argument("--reference-samples", type=int, default=20)
    parser.add_argument("overrides", nargs="*", help="config overrides, e.g. train.epochs=2")
    args = parser.parse_args()
    rows = []
    for replay in (0.0, args.replay):
        name = f"replay{replay:g}"
        overrides = [
            "forgetting.reference_text=asset:hamlet",
            f"forgetting.reference_samples={args.reference_samples}",
            f"forgetting.replay={replay}",
            "forgetting.max_ppl_increase=1.05",
            f"forgetting.probe_prompts={json.dumps(PROBES)}",
            f"train.output_dir=runs/forgetting_{name}",
            "train.overwrite=true",
            *args.overrides,
        ]
        cfg = Config.load(ROOT / "examples" / "sft_smollm2.yaml", overrides)
        result = train(cfg)
        f = result.forgetting
        rows.append((name, result, f))
        print(json.dumps({"run": name, "forgetting": f}, indent=1))
    print(f"\n{'run':<12} {'ref ppl before':>15} {'after':>8} {'ratio':>7} {'chat val ppl':>13}")
    for name, result, f in rows:
        print(
            f"{name:<12} {f['before']:>15.2f} {f['after']:>8.2f} {f['ppl_ratio']:>7.3f} "
            f"{result.validation_metrics.get('perplexity', float('nan')):>13.2f}"
        )


if __name__ == "__main__":
    main()
