"""What a study leaves behind: the trial table, parameter importance, best YAML, plots, a page.

``trials.md`` lists every trial (number, state, value, parameters, seconds,
evaluations, why it was pruned); ``best.yaml`` is the complete config of the
best trial (every default filled in, the search section dropped, the user's
``train.output_dir``), ready for ``tunesmith train``; ``report.html`` shows
the optimisation history and each trial's validation curve (PNG plots in
``plots/``), the importance of each parameter (Optuna's default evaluator, once
two trials are complete) and the table.
"""

from __future__ import annotations

import html
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tunesmith.config.root import Config
from tunesmith.core.tables import html_table, markdown_table, text_table
from tunesmith.studies.tune.space import as_overrides, decode


def trial_rows(study: Any) -> tuple[list[str], list[list[str]]]:
    """Header and one row per trial, in trial order."""
    keys = sorted({k for t in study.trials for k in t.params})
    metric = study.user_attrs.get("metric", "value")
    header = ["trial", "state", metric, *keys, "seconds", "evaluations", "note"]
    rows = []
    for t in study.trials:
        seconds = t.user_attrs.get("seconds")
        rows.append(
            [
                str(t.number),
                t.state.name.lower(),
                f"{t.value:.4f}" if t.value is not None else "-",
                *(_fmt(t.params[k]) if k in t.params else "-" for k in keys),
                f"{seconds:.0f}" if seconds is not None else "-",
                str(t.user_attrs.get("evaluations", "-")),
                _note(t),
            ]
        )
    return header, rows


def _note(trial: Any) -> str:
    error = trial.user_attrs.get("error")
    if error:
        return error if len(error) <= 100 else error[:97] + "..."
    if trial.state.name == "PRUNED":
        reported = sorted(trial.intermediate_values.items())
        if reported:
            step, value = reported[-1]
            return f"pruned after evaluation {step} ({value:.4f})"
    return ""


def _fmt(value: Any) -> str:
    return f"{value:.3g}" if isinstance(value, float) else str(value)


def importance(study: Any) -> dict[str, float] | None:
    """Importance of each parameter (Optuna's default evaluator); None before 2 complete trials."""
    import optuna

    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    if len(complete) < 2 or not study.best_trial.params:
        return None
    try:
        with warnings.catch_warnings():  # "importances will be equal" on tiny studies
            warnings.simplefilter("ignore", UserWarning)
            return dict(optuna.importance.get_param_importances(study))
    except (RuntimeError, ValueError):  # e.g. every complete trial has the same params
        return None


def write_best_config(study: Any, config: Path, overrides: Sequence[str], folder: Path) -> Path:
    """``best.yaml``: the best trial's full config, ready to train."""
    base = Config.load(config, overrides)
    values = decode(study.best_trial.params, base.search)
    cfg = Config.load(config, [*overrides, *as_overrides(values)])
    best = cfg.model_copy(update={"search": {}})
    path = folder / "best.yaml"
    header = (
        f"# Best trial {study.best_trial.number} of tunesmith tune on {config.name}: "
        f"{study.user_attrs.get('metric', 'value')} {study.best_value:.4f} (validation)\n"
        f"# searched: {json.dumps(values)}\n"
    )
    path.write_text(header + best.to_yaml(), encoding="utf-8")
    return path


def draw_plots(study: Any, folder: Path) -> dict[str, Path]:
    """Optimisation history and intermediate values as PNGs (drawn by Optuna with matplotlib)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt
    import optuna
    from optuna.visualization import matplotlib as ovm

    out: dict[str, Path] = {}
    folder.mkdir(parents=True, exist_ok=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        for name, draw in (
            ("history", ovm.plot_optimization_history),
            ("intermediate", ovm.plot_intermediate_values),
        ):
            ax = draw(study)
            fig = ax.figure
            fig.set_size_inches(7, 3.8)
            fig.tight_layout()
            path = folder / f"{name}.png"
            fig.savefig(path, dpi=100)
            plt.close(fig)
            out[name] = path
    return out


def write_results(
    study: Any, config: Path, overrides: Sequence[str], folder: Path
) -> dict[str, Path | None]:
    """Every result file of the study; returns their paths (best: None without a complete trial)."""
    import optuna

    header, rows = trial_rows(study)
    paths: dict[str, Path | None] = {"trials": folder / "trials.md"}
    table_md = markdown_table(header, rows)
    paths["trials"].write_text(f"# tunesmith tune: {config.name}\n\n{table_md}\n", "utf-8")
    complete = study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.COMPLETE,))
    paths["best"] = write_best_config(study, config, overrides, folder) if complete else None
    plots = draw_plots(study, folder / "plots")
    ranks = importance(study)
    parts = [
        f"<h1>tunesmith tune: {html.escape(config.name)}</h1>",
        f"<p>{len(study.trials)} trials; best {html.escape(_best_text(study))}</p>",
        *(
            f"<h2>{title}</h2><img src='plots/{p.name}' alt='{title}'>"
            for title, p in (
                ("Optimisation history", plots["history"]),
                ("Validation metric of each trial", plots["intermediate"]),
            )
        ),
        "<h2>Parameter importance</h2>",
        html_table(["parameter", "importance"], [[k, f"{v:.3f}"] for k, v in ranks.items()])
        if ranks
        else "<p>needs two complete trials with different parameters</p>",
        "<h2>Trials</h2>",
        html_table(header, rows),
    ]
    paths["report"] = folder / "report.html"
    paths["report"].write_text(
        "<!DOCTYPE html>\n<html><head><meta charset='utf-8'><title>tunesmith tune</title>"
        "<style>body{font-family:system-ui,sans-serif;margin:2em}table{border-collapse:"
        "collapse;font-size:.9em}th,td{border:1px solid #ccc;padding:.25em .6em}</style>"
        "</head><body>" + "\n".join(parts) + "</body></html>\n",
        encoding="utf-8",
    )
    return paths


def _best_text(study: Any) -> str:
    try:
        best = study.best_trial
    except ValueError:
        return "none yet (no complete trial)"
    metric = study.user_attrs.get("metric", "value")
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in best.params.items())
    return f"trial {best.number}: {metric} {best.value:.4f} with {params}"


def summary_text(study: Any, paths: dict[str, Path | None]) -> str:
    """What ``tunesmith tune`` prints at the end."""
    header, rows = trial_rows(study)
    lines = [text_table(header, rows), "", f"best: {_best_text(study)}"]
    ranks = importance(study)
    if ranks:
        lines.append("importance: " + ", ".join(f"{k} {v:.2f}" for k, v in ranks.items()))
    lines += [f"wrote {p}" for p in paths.values() if p is not None]
    return "\n".join(lines)
