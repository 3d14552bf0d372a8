"""``tunesmith report RUN_DIR``: one HTML page per run, with its plots and tables.

Everything comes from files the run already wrote (``metrics.jsonl``,
``summary.json``, ``parameters.json``, ``config.yaml`` and, after
``tunesmith eval --full``, ``evaluation.json``), so a report can be made of a
finished, interrupted or copied run, on a machine without the model.
The page references its PNGs in ``plots/`` by relative path: the folder can
be moved or served as is.
"""

from __future__ import annotations

import html
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from tunesmith.core.tables import html_table
from tunesmith.errors import DataError
from tunesmith.evaluation.report.plots import draw_all
from tunesmith.training.loop import SAMPLES
from tunesmith.training.monitor import read_metrics

REPORT_FILE = "report.html"

_TITLES = {
    "loss": "Loss",
    "metrics": "Validation metrics",
    "lr": "Learning rate per group",
    "grad_norms": "Gradient norms per group",
    "throughput": "Throughput",
    "memory": "Memory",
    "rewards": "Preference rewards (training, mean per pair)",
    "rl": "RL rollouts: mean reward and KL to the reference (training)",
}
#: Columns of the samples table shown first (RL: what the last evaluation generated).
_SAMPLE_COLUMNS = ("prompt", "completion", "reward")

_STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em auto; max-width: 60em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.5em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
th { background: #f3f3f3; } td:first-child, th:first-child { text-align: left; }
pre { background: #f7f7f7; padding: 1em; overflow-x: auto; font-size: 0.85em; }
img { max-width: 100%; } .missing { color: #888; font-style: italic; }
"""


def render_report(run_dir: str | Path, output: str | Path | None = None) -> Path:
    """Draw the plots and write the HTML page of ``run_dir``; returns the page's path."""
    run = Path(run_dir)
    metrics_path = run / "metrics.jsonl"
    if not metrics_path.is_file():
        raise DataError(f"{run}: no metrics.jsonl here; give a run folder (train.output_dir)")
    records = read_metrics(metrics_path)
    page = Path(output) if output is not None else run / REPORT_FILE
    plots = draw_all(records, page.parent / "plots")
    summary = _json(run / "summary.json")
    parts = [
        f"<h1>Run report: {html.escape(run.name)}</h1>",
        f"<p>{html.escape(str(run.resolve()))}</p>",
        _section("Summary", _summary_table(summary)),
        _section("Training curves", _plot_html(plots, page.parent)),
        _section("Final evaluation", _evaluation_html(summary, _json(run / "evaluation.json"))),
        *_samples_html(run / SAMPLES),
        _section("Trainable parameters", _parameter_html(_json(run / "parameters.json"))),
        _section("Resolved config", _text_file(run / "config.yaml")),
    ]
    page.parent.mkdir(parents=True, exist_ok=True)
    page.write_text(
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'>"
        f"<title>tunesmith report: {html.escape(run.name)}</title>"
        f"<style>{_STYLE}</style></head><body>\n" + "\n".join(parts) + "\n</body></html>\n",
        encoding="utf-8",
    )
    return page


def _samples_html(folder: Path) -> list[str]:
    """The last evaluation's examples (``samples/step-N.jsonl``) as a table; none: nothing."""
    files = sorted(folder.glob("step-*.jsonl")) if folder.is_dir() else []
    if not files:
        return []
    rows = [json.loads(line) for line in files[-1].read_text(encoding="utf-8").splitlines() if line]
    if not rows:
        return []
    columns = [c for c in _SAMPLE_COLUMNS if c in rows[0]]
    columns += [c for c in rows[0] if c not in columns]
    table = html_table(columns, [[fmt(row.get(c)) for c in columns] for row in rows])
    step = files[-1].stem.removeprefix("step-").lstrip("0") or "0"
    return [_section(f"Samples of the last evaluation (step {step})", table)]


def _json(path: Path) -> Any:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None


def _section(title: str, body: str) -> str:
    return f"<h2>{html.escape(title)}</h2>\n{body}"


def _missing(text: str) -> str:
    return f"<p class='missing'>{html.escape(text)}</p>"


def fmt(value: Any) -> str:
    """A number as a table shows it (4 significant decimals for fractions, grouping for ints)."""
    if isinstance(value, bool) or value is None:
        return "-" if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if isinstance(value, float):
        return f"{value:.4f}" if abs(value) < 10 else f"{value:,.1f}"
    return str(value)


def _summary_table(summary: Mapping[str, Any] | None) -> str:
    if not summary:
        return _missing("no summary.json: the run did not finish")
    rows = [[k, fmt(v)] for k, v in summary.items() if not isinstance(v, Mapping | list)]
    return html_table(["", "value"], rows)


def _plot_html(plots: Mapping[str, Path | None], base: Path) -> str:
    out = []
    for name, path in plots.items():
        title = _TITLES.get(name, name)
        if path is None:
            out.append(f"<h3>{html.escape(title)}</h3>" + _missing("not logged by this run"))
        else:
            rel = path.relative_to(base).as_posix()
            out.append(
                f"<h3>{html.escape(title)}</h3><img src='{html.escape(rel)}' "
                f"alt='{html.escape(title)}'>"
            )
    return "\n".join(out)


def _metric_rows(metrics: Mapping[str, Any]) -> list[list[str]]:
    return [[k, fmt(v)] for k, v in metrics.items() if isinstance(v, int | float)]


def _evaluation_html(summary: Mapping[str, Any] | None, evaluation: Any) -> str:
    out = []
    for split in ("validation", "test"):
        metrics = (summary or {}).get(split)
        if metrics:
            out.append(f"<h3>{split}</h3>" + html_table(["metric", "value"], _metric_rows(metrics)))
    forgetting = (summary or {}).get("forgetting")
    if forgetting:
        out.append("<h3>forgetting</h3>" + html_table(["", "value"], _metric_rows(forgetting)))
        if forgetting.get("exceeded"):
            out.append(
                f"<p><b>past forgetting.max_ppl_increase</b> ({fmt(forgetting['ppl_ratio'])} > "
                f"{fmt(forgetting['max_ppl_increase'])}): {html.escape(forgetting['remedy'])}</p>"
            )
        probes = forgetting.get("probes")
        if probes:
            rows = [[p["prompt"], p["before"], p["after"]] for p in probes]
            out.append(
                "<h4>probe prompts (greedy)</h4>" + html_table(["prompt", "before", "after"], rows)
            )
    if evaluation:
        out.append("<h3>tunesmith eval --full</h3>" + evaluation_table(evaluation))
    return "\n".join(out) or _missing("no evaluation recorded")


def evaluation_table(evaluation: Mapping[str, Any]) -> str:
    """The evaluator's headline numbers as a two-column HTML table."""
    lat, thr = evaluation["latency_bs1"], evaluation["throughput"]
    rows = [
        ["data", f"{evaluation['data']} ({evaluation['examples']} examples)"],
        *(_metric_rows({k: v for k, v in evaluation["metrics"].items() if "/" not in k})),
        ["latency p50 / p95, batch 1 (ms)", f"{lat['p50_ms']:.2f} / {lat['p95_ms']:.2f}"],
        [f"throughput, batch {thr['batch_size']} (samples/s)", fmt(thr["examples_per_s"])],
        ["throughput (real tokens/s)", fmt(thr["real_tokens_per_s"])],
        ["peak memory during evaluation (MiB)", fmt(evaluation["peak_memory"]["peak_mb"])],
        ["weights on disk (MB)", fmt(evaluation["size"]["weights_mb"])],
        ["parameters", fmt(evaluation["parameters"]["total"])],
    ]
    rob = evaluation.get("robustness")
    if rob:
        rows += [
            [f"robustness: mean drop at {float(rate):.0%} words perturbed", fmt(drop)]
            for rate, drop in rob["mean_drop"].items()
        ]
    return html_table(["", "value"], rows)


def _parameter_html(rows: Sequence[Mapping[str, Any]] | None) -> str:
    if not rows:
        return _missing("no parameters.json")
    body = [
        [r["group"], fmt(r["parameters"]), fmt(r["trainable"]), f"{r['percent']:.2f}", _lr(r)]
        for r in rows
    ]
    return html_table(["group", "parameters", "trainable", "% of model", "lr"], body)


def _lr(row: Mapping[str, Any]) -> str:
    lr = row.get("lr")
    if isinstance(lr, float):
        return f"{lr:.2e}"
    return "mixed" if lr else "-"


def _text_file(path: Path) -> str:
    if not path.is_file():
        return _missing(f"no {path.name}")
    return f"<pre>{html.escape(path.read_text(encoding='utf-8'))}</pre>"
