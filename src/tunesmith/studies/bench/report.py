"""The benchmark's tables: per contender and per pair (ratios tunesmith / HF)."""

from __future__ import annotations

from typing import Any

from tunesmith.studies.bench.contenders import AUTO, CONTENDERS, NAMES, RATIOS


def format_header(results: dict[str, Any]) -> str:
    """Machine, versions, rows per split and the matmul peak, one fact per line."""
    lines = [f"{k}: {v}" for k, v in results["machine"].items()]
    lines.append("rows: " + ", ".join(f"{k} {v}" for k, v in results["rows"].items()))
    lines.append("settings: " + ", ".join(f"{k} {v}" for k, v in results["settings"].items()))
    gflops = results["matmul_peak_flops"] / 1e9
    n = results["settings"].get("matmul_size", 2048)
    lines.append(
        f"fp32 matmul peak: {gflops:.1f} GFLOP/s (torch.mm {n}x{n}, best of 5; "
        "sampled again after each contender, the best sample is used)"
    )
    return "\n".join(lines)


def format_tables(results: dict[str, Any]) -> str:
    """Markdown: one row per contender, then tunesmith/HF ratios per pair and HF setting.

    Peak RSS is shown for training (up to the end of the training loop) and for
    the whole process (tunesmith's test evaluation reloads the saved checkpoint).
    """
    samples = [x / 1e9 for x in results.get("matmul_peak_samples", [results["matmul_peak_flops"]])]
    rows = [
        f"fp32 matmul peak: best {max(samples):.1f} GFLOP/s of {len(samples)} samples, lowest "
        f"{min(samples):.1f} (a wide spread means other work slowed this run)",
        "",
        "| pair | contender | train s | real tokens/s | samples/s | peak RSS MiB train / process "
        "| padding | test accuracy | GFLOP/s | of matmul peak | load 1m |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair, e in results["pairs"].items():
        for who, r in ((w, e[w]) for w in (*CONTENDERS, AUTO) if w in e):
            if "error" in r:
                rows.append(f"| {pair} | {NAMES[who]} | failed: {r['error'][:80]} ||||||||")
                continue
            pad = 1 - r["real_tokens"] / r["padded_tokens"]
            rows.append(
                f"| {pair} | {NAMES[who]} | {r['train_seconds']:.1f} | {r['tokens_per_s']:,.0f} | "
                f"{r['samples_per_s']:.1f} | {r['train_peak_rss_mb']:,.0f} / "
                f"{r['peak_rss_mb']:,.0f} | {pad:.0%} | {100 * r['test_accuracy']:.1f}% | "
                f"{r['flops_per_s'] / 1e9:.1f} | {r['peak_fraction']:.0%} | "
                f"{r.get('load_average_1m', '-')} |"
            )
    rows += [
        "",
        "| pair | tunesmith | against | epochs | lr | tokens/s | train time | peak RSS train / "
        "process | accuracy | same params | same tokens |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for pair, e in results["pairs"].items():
        for baseline, key, arm in RATIOS:
            if arm not in e:
                continue
            q = e.get(key)
            cells = ["-"] * 4
            if q:
                cells = [f"{q['tokens_per_s']:.2f}x", f"{q['train_seconds']:.2f}x"]
                cells.append(f"{q['train_peak_rss_mb']:.2f}x / {q['peak_rss_mb']:.2f}x")
                cells.append(f"{q['accuracy_points']:+.1f} pts")
            tokens = [e.get(w, {}).get("real_tokens") for w in (baseline, arm)]
            same_tokens = None if None in tokens else tokens == [e["expected_real_tokens"]] * 2
            flags = [
                "-" if ok is None else "yes" if ok else "NO"
                for ok in (e["same_trainable_names"], same_tokens)
            ]
            head = f"| {pair} | {NAMES[arm]} | {NAMES[baseline]} | {e.get('epochs', '-')} | "
            head += f"{e['lr']:g} | "
            rows.append(head + " | ".join(cells + flags) + " |")
    return "\n".join(rows)
