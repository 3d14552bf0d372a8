"""The comparison table of ``tunesmith compare``: Markdown, HTML and JSON.

Seed 002's table, measured on the user's data: quality, training cost
(time, throughput, peak memory), footprint (trainable share, checkpoint
size), serving (latency at batch 1, throughput at the served batch size),
robustness (mean drop of the metric with the largest share of words
perturbed) and forgetting (retention of the reference task, when configured).
A failed method keeps its row, with its error.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tunesmith.core.tables import Cell, Link, html_table, markdown_table

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; }
table { border-collapse: collapse; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
"""


def _metric_text(value: float | None, metric: str) -> str:
    if value is None:
        return "-"
    fraction = "loss" not in metric and "perplexity" not in metric and 0 <= value <= 1
    return f"{100 * value:.1f}%" if fraction else f"{value:.4f}"


def _points(value: float, metric: str) -> str:
    fraction = "loss" not in metric and "perplexity" not in metric
    return f"{100 * value:+.1f} pts" if fraction else f"{value:+.4f}"


def columns(results: Sequence[Mapping[str, Any]]) -> tuple[list[str], str]:
    """The header for these results and the metric they are scored on."""
    ok = [r for r in results if r.get("status") == "ok"]
    metric = ok[0]["evaluation"]["metric"] if ok else "metric"
    split = ok[0]["split"] if ok else "test"
    batch = ok[0]["evaluation"]["throughput"]["batch_size"] if ok else "N"
    strengths = list(ok[0]["evaluation"].get("robustness", {}).get("mean_drop", {})) if ok else []
    worst = f" @{float(strengths[-1]):.0%} words" if strengths else ""
    header = [
        "method",
        "lr",
        f"{split} {metric}",
        "train s",
        "train tokens/s",
        "peak train MiB",
        "trainable %",
        "checkpoint MB",
        "latency bs1 p50 ms",
        f"infer samples/s bs{batch}",
        f"robustness drop{worst}",
        "forgetting (retention)",
    ]
    return header, metric


def rows(results: Sequence[Mapping[str, Any]], metric: str) -> list[list[Cell]]:
    """One row per method (a failed method: its error in place of the numbers)."""
    out: list[list[Cell]] = []
    for r in results:
        name = r["method"]
        lr = _lr(r)
        if r.get("status") != "ok":
            error = str(r.get("error", "unknown error"))
            short = error if len(error) <= 120 else error[:117] + "..."
            out.append([name, lr, f"failed: {short}", *[""] * 9])
            continue
        s, e = r["summary"], r["evaluation"]
        rob = e.get("robustness")
        drop = _points(list(rob["mean_drop"].values())[-1], metric) if rob else "n/a"
        forgetting = s.get("forgetting") or e.get("forgetting") or {}
        out.append(
            [
                Link(name, r["report"]) if r.get("report") else name,
                lr,
                _metric_text(e["metrics"].get(metric), metric),
                f"{s['train_seconds']:.0f}",
                f"{s['real_tokens_per_s']:.0f}",
                f"{s['peak_rss_mb']:.0f}",
                f"{s['trainable_percent']:.2f}",
                f"{e['size']['weights_mb']:.2f}",
                f"{e['latency_bs1']['p50_ms']:.1f}",
                f"{e['throughput']['examples_per_s']:.1f}",
                drop,
                _retention_text(forgetting),
            ]
        )
    return out


def _lr(result: Mapping[str, Any]) -> str:
    """The method's learning rate as 5.0e-5 (from its overrides when it failed early)."""
    value: Any = result.get("lr")
    if value is None:
        found = [
            o.split("=", 1)[1] for o in result.get("overrides", ()) if o.startswith("optim.lr=")
        ]
        value = found[-1] if found else None
    try:
        return f"{float(value):.1e}".replace("e-0", "e-")
    except (TypeError, ValueError):
        return "-" if value is None else str(value)


def write_tables(results: Sequence[Mapping[str, Any]], out: Path, title: str) -> dict[str, Path]:
    """``compare.md``, ``compare.html`` and ``compare.json`` in ``out``; returns their paths."""
    header, metric = columns(results)
    body = rows(results, metric)
    paths = {
        "markdown": out / "compare.md",
        "html": out / "compare.html",
        "json": out / "compare.json",
    }
    paths["markdown"].write_text(f"# {title}\n\n{markdown_table(header, body)}\n", encoding="utf-8")
    paths["html"].write_text(
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>{html.escape(title)}</title><style>{_STYLE}</style></head><body>"
        f"<h1>{html.escape(title)}</h1>{html_table(header, body)}"
        "<p>Each method name links to its run report.</p></body></html>\n",
        encoding="utf-8",
    )
    paths["json"].write_text(json.dumps(list(results), indent=1) + "\n", encoding="utf-8")
    return paths


def _retention_text(forgetting: Mapping[str, Any]) -> str:
    """Retention (1.0: nothing forgotten), the perplexity ratio of a text reference, the mark."""
    retention = forgetting.get("retention")
    if not isinstance(retention, float):
        return "n/a (no reference)"
    text = f"{retention:.3f}"
    if isinstance(forgetting.get("ppl_ratio"), float):
        text += f" (ppl x{forgetting['ppl_ratio']:.3f})"
    return text + (" PAST LIMIT" if forgetting.get("exceeded") else "")
