"""Running the pairs: one process per contender, results as JSON, the command line."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from tunesmith.studies.bench.contenders import (
    AUTO,
    CONTENDERS,
    NAMES,
    PAIRS,
    RATIOS,
    RunSpec,
    contenders_here,
    hf_model,
    run_contender,
    tunesmith_model,
)
from tunesmith.studies.bench.measure import (
    flops_per_token,
    grouped_padded_tokens,
    machine_info,
    matmul_peak_flops,
    read_jsonl,
    trainable_names,
)
from tunesmith.studies.bench.report import format_header, format_tables


def prepare(
    model: str,
    data: dict[str, Any],
    rows: int | None,
    eval_cap: int | None,
    work: str,
    base: dict[str, Any],
) -> dict[str, Any]:
    """The heavy preliminaries, run in a child so the parent stays small (see module doc).

    Splits once (tunesmith's seeded, stratified split) and writes the files both
    contenders read; measures the matmul peak; per pair checks that both sides
    train the same parameter names and estimates training FLOPs per token.
    """
    from tunesmith.config.root import Config
    from tunesmith.data.splits import cap_records
    from tunesmith.models.loading import load_tokenizer, quiet_transformers
    from tunesmith.tasks.base import get_task

    quiet_transformers()
    pairs = base.pop("pairs", None) or list(PAIRS)
    seed, out = base.get("seed", 0), Path(work) / "data"
    cfg = Config.from_dict(
        {"model": {"name_or_path": model}, "data": data, "train": {"seed": seed}}
    )
    splits = get_task(cfg).load_splits()
    out.mkdir(parents=True, exist_ok=True)
    files, counts = {}, {}
    for name, cap in (("train", rows), ("validation", eval_cap), ("test", eval_cap)):
        recs = getattr(splits, name)
        recs = [recs[i] for i in cap_records(list(range(len(recs))), cap, recs, seed)]
        lines = [json.dumps({"text": r["text"], "label": r["label"]}) + "\n" for r in recs]
        (out / f"{name}.jsonl").write_text("".join(lines), encoding="utf-8")
        files[name], counts[name] = str(out / f"{name}.jsonl"), len(recs)
    train_rows = read_jsonl(files["train"])
    texts, labels = [r["text"] for r in train_rows], [r["label"] for r in train_rows]
    enc = load_tokenizer(model)(texts, truncation=True, max_length=cfg.data.max_length)
    lengths = [len(ids) for ids in enc["input_ids"]]
    spec = RunSpec("hf", "full", model, files, list(splits.labels), 1e-3, **base)
    checks = {}
    for pair in pairs:
        hf_side = hf_model(replace(spec, pair=pair))
        ts_side = tunesmith_model(replace(spec, pair=pair))
        same = trainable_names(hf_side) == trainable_names(ts_side)
        epochs = pair_epochs(pair, spec.epochs)
        checks[pair] = {
            "same_trainable_names": same,
            "flops_per_token": flops_per_token(hf_side),
            "expected_real_tokens": sum(lengths) * epochs,
            "tunesmith_padded_tokens": grouped_padded_tokens(
                lengths, spec.batch_size, seed, epochs, labels
            ),
        }
    return {
        "files": files,
        "labels": spec.labels,
        "rows": counts,
        "machine": machine_info(),
        "matmul_peak_flops": matmul_peak_flops(spec.matmul_size, threads=spec.threads),
        "checks": checks,
    }


def pair_epochs(pair: str, epochs: int) -> int:
    """The epochs a pair runs: its own number (``top2x3``) or the run's."""
    return PAIRS[pair][2] or epochs


def run_child(
    kind: str, payload: dict[str, Any], stem: Path, entry: list[str] | None = None
) -> dict[str, Any]:
    """Run ``prepare`` or one contender in a fresh Python process; the result comes back as JSON.

    ``entry`` is the program whose ``--child KIND SPEC OUT`` runs it (default: this
    benchmark's module; ``benchmarks/vs_trl.py`` passes itself).
    """
    spec_path, result_path, log_path = (Path(f"{stem}{s}") for s in (".spec.json", ".json", ".log"))
    spec_path.write_text(json.dumps(payload, indent=1))
    result_path.unlink(missing_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    paths = (spec_path, result_path)
    entry = entry or [sys.executable, "-m", "tunesmith.studies.bench"]
    cmd = [*entry, "--child", kind, *map(str, paths)]
    with open(log_path, "w", encoding="utf-8") as log:
        code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env).returncode
    if code != 0 or not result_path.is_file():
        lines = log_path.read_text(encoding="utf-8").strip().splitlines()
        return {"error": lines[-1] if lines else f"exit code {code}", "log": str(log_path)}
    return json.loads(result_path.read_text())


def add_rates(entry: dict[str, Any], peak: float) -> None:
    """Per contender tokens/s, samples/s, FLOP/s and share of peak; per baseline tunesmith/HF.

    ``ratios`` compare with HF's default random batches, ``ratios_grouped`` with
    HF's length-grouped ones, ``ratios_auto`` tunesmith's ``precision: auto`` arm
    with HF's defaults (empty where a side failed or did not run).
    """
    for r in (entry[w] for w in (*CONTENDERS, AUTO) if w in entry and "error" not in entry[w]):
        secs = r["train_seconds"]
        r["tokens_per_s"], r["samples_per_s"] = r["real_tokens"] / secs, r["samples"] / secs
        r["flops_per_s"] = entry["flops_per_token"] * r["real_tokens"] / secs
        r["peak_fraction"] = r["flops_per_s"] / peak
    for baseline, key, who in RATIOS:
        hf, ts = (entry.get(w, {"error": "not run"}) for w in (baseline, who))
        if "error" in hf or "error" in ts:
            entry[key] = {}
            continue
        names = ("tokens_per_s", "train_seconds", "train_peak_rss_mb", "peak_rss_mb")
        entry[key] = {k: ts[k] / hf[k] for k in names}
        entry[key]["accuracy_points"] = 100 * (ts["test_accuracy"] - hf["test_accuracy"])


def run_benchmark(
    model: str,
    data: dict[str, Any],
    pairs: list[str],
    work: Path,
    *,
    rows: int | None,
    eval_cap: int | None = None,
    lr: float | None = None,
    out: Path | None = None,
    **settings: Any,
) -> dict[str, Any]:
    """Both contenders for every pair, back to back; returns (and saves to ``out``) the results.

    ``settings`` are further RunSpec fields (epochs, batch_size, seed, threads, ...).
    Everything heavy runs in child processes: a caller that has loaded torch and
    models itself would leak its memory into the children's ``ru_maxrss``.
    """
    work.mkdir(parents=True, exist_ok=True)
    settings["max_length"] = data.get("max_length", 64)
    payload = dict(model=model, data=data, rows=rows, eval_cap=eval_cap, work=str(work))
    prep = run_child("prepare", {**payload, "base": {**settings, "pairs": pairs}}, work / "prepare")
    if "error" in prep:
        raise RuntimeError(f"preparing the benchmark failed: {prep['error']} (see {prep['log']})")
    results: dict[str, Any] = {k: prep[k] for k in ("machine", "matmul_peak_flops", "rows")}
    results["matmul_peak_samples"] = [prep["matmul_peak_flops"]]
    results["settings"] = {**settings, "train_rows": rows, "eval_cap": eval_cap, "lr": lr}
    results["pairs"] = {}
    print(format_header(results), flush=True)
    for pair in pairs:
        lr_pair = lr or PAIRS[pair][1]
        base = RunSpec("hf", pair, model, prep["files"], prep["labels"], lr_pair, **settings)
        base = replace(base, epochs=pair_epochs(pair, base.epochs))
        entry: dict[str, Any] = {"lr": lr_pair, "epochs": base.epochs}
        padded = prep["checks"][pair].pop("tunesmith_padded_tokens")
        entry |= prep["checks"][pair]
        for who in contenders_here():
            spec = replace(base, contender=who, run_dir=str(work / f"{pair}-{who}"))
            entry[who] = run_child("contender", asdict(spec), work / f"{pair}-{who}")
            print(f"{pair} / {NAMES[who]}: {json.dumps(entry[who])}", flush=True)
        for arm in ("tunesmith", AUTO):  # the same batches at either precision
            if arm in entry and "error" not in entry[arm]:
                entry[arm]["padded_tokens"] = padded
        results["pairs"][pair] = entry
        # The peak is the best of every sample (others' load only ever lowers one).
        samples = results["matmul_peak_samples"]
        ran = [w for w in contenders_here() if "error" not in entry[w]]
        samples += [entry[w]["matmul_peak_flops"] for w in ran]
        results["matmul_peak_flops"] = max(samples)
        for e in results["pairs"].values():
            add_rates(e, results["matmul_peak_flops"])
        if out is not None:
            out.parent.mkdir(parents=True, exist_ok=True)
            out.write_text(json.dumps(results, indent=1) + "\n")
    return results


# -- reporting --------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Entry point (``tunesmith bench``-ready): parse options, run the pairs, print the tables.

    Returns 0, or 1 when a contender failed, or the two sides of a pair did not train the
    same parameters or see the same real tokens.
    """
    p = argparse.ArgumentParser(description="HF Trainer vs tunesmith on the offline demo assets.")
    p.add_argument("--rows", type=int, default=4000, help="train rows (stratified subset)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated: {','.join(PAIRS)}")
    p.add_argument("--lr", type=float, help="peak LR for every pair (default: per pair)")
    p.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--matmul-size", type=int, default=2048, help="n of the n x n peak matmul")
    p.add_argument("--work", type=Path, default=Path("runs/vs_hf"), help="run folders")
    p.add_argument("--out", type=Path, help="results JSON (default: WORK/results.json)")
    p.add_argument("--quick", action="store_true", help="smoke run: 200 train, 200 eval rows")
    p.add_argument("--child", nargs=3, metavar=("KIND", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one step of run_benchmark, in its own process
        kind, spec_path, out_path = args.child
        payload = json.loads(Path(spec_path).read_text())
        result = prepare(**payload) if kind == "prepare" else run_contender(RunSpec(**payload))
        Path(out_path).write_text(json.dumps(result, indent=1))
        return 0
    pairs = [x.strip() for x in args.pairs.split(",") if x.strip()]
    if unknown := [x for x in pairs if x not in PAIRS]:
        p.error(f"unknown pair(s) {', '.join(unknown)}; choose from {', '.join(PAIRS)}")
    from tunesmith.runs.demo import demo_settings

    demo = demo_settings("unused")  # the demo's model, data, labels and max_length
    rows, cap = (200, 200) if args.quick else (args.rows, None)
    settings = dict(epochs=args.epochs, batch_size=args.batch_size, seed=args.seed)
    settings |= dict(matmul_size=args.matmul_size)
    opts = dict(rows=rows, eval_cap=cap, lr=args.lr, threads=args.threads, **settings)
    out = args.out or args.work / "results.json"
    model = demo["model"]["name_or_path"]
    results = run_benchmark(model, demo["data"], pairs, args.work, out=out, **opts)
    print(format_tables(results))
    entries = results["pairs"].values()
    ok = all(
        e[w].get("real_tokens") == e["expected_real_tokens"]
        for e in entries
        for w in contenders_here()
    )
    return 0 if ok and all(e["same_trainable_names"] for e in entries) else 1


if __name__ == "__main__":
    sys.exit(main())
