"""tunesmith vs TRL on causal-LM post-training (SmolLM2-135M + LoRA), one process per contender.

Pairs live in ``tunesmith.studies.bench.llm_pairs.PAIRS``: ``sft`` (the chat
example ``examples/sft_smollm2.yaml``, TRL's ``SFTTrainer``) and ``dpo``
(``examples/dpo_sentiment.yaml``, TRL's ``DPOTrainer``); the fairness rules
are written next to each. Prints the machine, per contender the pair's rate
(real tokens/s or pairs/s), what was trained (must be equal), peak RSS and
the quality both are scored on, and tunesmith/TRL ratios.

    python benchmarks/vs_trl.py                         # sft, 160 chats, one epoch
    python benchmarks/vs_trl.py --pair dpo --rows 160   # DPO on the sentiment pairs
    python benchmarks/vs_trl.py --rows 80 --gradient-checkpointing both
    python benchmarks/vs_trl.py --tunesmith-overrides data.padding_free=true
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from tunesmith.studies.bench.orchestrate import run_child

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {
    "sft": ROOT / "examples" / "sft_smollm2.yaml",
    "dpo": ROOT / "examples" / "dpo_sentiment.yaml",
}
CONTENDERS = ("trl", "tunesmith")


def child(kind: str, spec: dict[str, Any], stem: Path) -> dict[str, Any]:
    """Run ``prepare`` or one contender in a fresh process (the parent never loads torch)."""
    return run_child(kind, spec, stem, entry=[sys.executable, __file__])


def run_child_here(kind: str, spec_path: str, out_path: str) -> None:
    """The child's side of ``child``."""
    from tunesmith.studies.bench.llm import LLMSpec
    from tunesmith.studies.bench.llm_pairs import prepare, run_contender

    spec = LLMSpec(**json.loads(Path(spec_path).read_text()))
    result = prepare(spec) if kind == "prepare" else run_contender(spec)
    Path(out_path).write_text(json.dumps(result, indent=1))


def table(results: dict[str, Any], pair: str) -> str:
    """Markdown: one row per arm and contender, ratios per arm."""
    from tunesmith.studies.bench.llm_pairs import PAIRS

    p = PAIRS[pair]
    lines = [
        f"| arm | contender | {p.unit_label} | {p.unit.replace('_', ' ')} | train s "
        f"| peak RSS MiB | {p.quality_label} | tunesmith / TRL speed | RSS | {p.quality_label} |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, entry in results["arms"].items():
        trl, ts = entry.get("trl", {}), entry.get("tunesmith", {})
        ok = "error" not in trl and "error" not in ts
        for who in CONTENDERS:
            r = entry[who]
            if "error" in r:
                lines.append(f"| {arm} | {who} | failed: {r['error'][:80]} | | | | | | | |")
                continue
            ratio = ["", "", ""]
            if ok and who == "tunesmith":
                ratio = [
                    f"{ts['rate'] / trl['rate']:.2f}x",
                    f"{ts['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x",
                    f"{ts[p.quality] - trl[p.quality]:+.4f}",
                ]
            lines.append(
                f"| {arm} | {who} | {r['rate']:,.2f} | {r[p.unit]:,} "
                f"| {r['train_seconds']:,.0f} | {r['peak_rss_mb']:,.0f} "
                f"| {r[p.quality]:.4f} | {' | '.join(ratio)} |"
            )
    return "\n".join(lines)


def counts_agree(results: dict[str, Any], prepared: dict[str, Any], pair: str) -> bool:
    """Both sides trained exactly the prepared rows and tokens (what each side counted)."""
    train = prepared["train"]
    for entry in results["arms"].values():
        for who in CONTENDERS:
            r = entry[who]
            if "trained_tokens" in r and r["trained_tokens"] != train["trained_tokens"]:
                return False
            if pair == "dpo" and r.get("pairs") != train["rows"]:
                return False
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", default="sft", choices=sorted(CONFIGS))
    p.add_argument("--rows", type=int, default=160, help="chats before the split")
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument(
        "--gradient-checkpointing",
        choices=["off", "on", "both"],
        default="off",
        help="the same on both sides; 'both' runs two arms",
    )
    p.add_argument("--tunesmith-overrides", nargs="*", default=[], help="extra key=value")
    p.add_argument("--work", type=Path, default=ROOT / "runs" / "vs_trl")
    p.add_argument("--child", nargs=3, metavar=("KIND", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        run_child_here(*args.child)
        return 0
    args.work.mkdir(parents=True, exist_ok=True)
    base = {"pair": args.pair, "config": str(CONFIGS[args.pair]), "work": str(args.work)}
    base |= {"rows": args.rows, "threads": args.threads}
    prep = child("prepare", {**base, "contender": "prepare"}, args.work / "prepare")
    if "error" in prep:
        print(f"preparing failed: {prep['error']} (see {prep['log']})", file=sys.stderr)
        return 1
    print(json.dumps({"machine": prep["machine"], "data": prep["counts"]}, indent=1), flush=True)
    results: dict[str, Any] = {"machine": prep["machine"], "data": prep["counts"], "arms": {}}
    modes = {"off": [False], "on": [True], "both": [False, True]}[args.gradient_checkpointing]
    for gc in modes:
        arm = f"{args.pair}, gradient checkpointing {'on' if gc else 'off'}"
        entry = results["arms"][arm] = {}
        for who in CONTENDERS:
            spec = {**base, "contender": who, "files": prep["files"], "gradient_checkpointing": gc}
            if who == "tunesmith":
                spec["overrides"] = list(args.tunesmith_overrides)
            spec["work"] = str(args.work / f"{who}-gc{int(gc)}")
            entry[who] = child("contender", spec, args.work / f"{who}-gc{int(gc)}")
            print(f"{arm} / {who}: {json.dumps(entry[who])}", flush=True)
        (args.work / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    print(table(results, args.pair))
    counts_ok = counts_agree(results, prep["counts"], args.pair)
    if not counts_ok:
        print("the two sides did not train the prepared rows and tokens", file=sys.stderr)
    return 0 if counts_ok else 1


if __name__ == "__main__":
    sys.exit(main())
