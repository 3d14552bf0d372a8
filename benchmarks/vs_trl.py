"""tunesmith vs TRL on causal-LM post-training (SmolLM2-135M + LoRA), one process per contender.

Pairs live in ``tunesmith.studies.bench.llm.PAIRS`` (``sft`` today: the chat
example ``examples/sft_smollm2.yaml``); the fairness rules are written there.
Prints the machine, per contender real tokens/s, trained tokens (must be
equal), peak RSS and validation loss, and tunesmith/TRL ratios.

    python benchmarks/vs_trl.py                         # sft, 160 chats, one epoch
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
CONFIGS = {"sft": ROOT / "examples" / "sft_smollm2.yaml"}
CONTENDERS = ("trl", "tunesmith")


def child(kind: str, spec: dict[str, Any], stem: Path) -> dict[str, Any]:
    """Run ``prepare`` or one contender in a fresh process (the parent never loads torch)."""
    return run_child(kind, spec, stem, entry=[sys.executable, __file__])


def run_child_here(kind: str, spec_path: str, out_path: str) -> None:
    """The child's side of ``child``."""
    from tunesmith.studies.bench.llm import LLMSpec, prepare, run_contender

    spec = LLMSpec(**json.loads(Path(spec_path).read_text()))
    result = prepare(spec) if kind == "prepare" else run_contender(spec)
    Path(out_path).write_text(json.dumps(result, indent=1))


def table(results: dict[str, Any]) -> str:
    """Markdown: one row per arm and contender, ratios per arm."""
    lines = [
        "| arm | contender | real tokens/s | trained tokens | train s | peak RSS MiB "
        "| validation loss | tunesmith / TRL speed | RSS | loss |",
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
                    f"{ts['real_tokens_per_s'] / trl['real_tokens_per_s']:.2f}x",
                    f"{ts['peak_rss_mb'] / trl['peak_rss_mb']:.2f}x",
                    f"{100 * (ts['validation_loss'] / trl['validation_loss'] - 1):+.2f}%",
                ]
            lines.append(
                f"| {arm} | {who} | {r['real_tokens_per_s']:,.0f} | {r['trained_tokens']:,} "
                f"| {r['train_seconds']:,.0f} | {r['peak_rss_mb']:,.0f} "
                f"| {r['validation_loss']:.4f} | {' | '.join(ratio)} |"
            )
    return "\n".join(lines)


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
    print(table(results))
    expected = prep["counts"]["train"]["trained_tokens"]
    counts_ok = all(
        e[w].get("trained_tokens") == expected for e in results["arms"].values() for w in CONTENDERS
    )
    if not counts_ok:
        print(f"trained tokens differ from the prepared {expected:,}", file=sys.stderr)
    return 0 if counts_ok else 1


if __name__ == "__main__":
    sys.exit(main())
