"""The commands that run many trainings or read finished runs: compare, tune, report.

Kept apart from ``cli.py`` (which they register on) so the command-line module
stays one screenful per concern; the error handling is ``cli.main``'s.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from tunesmith.cli.common import Overrides, _csv, _rate

app = typer.Typer()


@app.command()
def compare(
    config: Annotated[Path, typer.Argument(help="YAML config file: data, model, budget, seed.")],
    overrides: Overrides = None,
    methods: Annotated[
        str,
        typer.Option(
            help="Comma-separated: full, topN (top2...), lora, dora, ia3, prefix, prompt, "
            "bottleneck."
        ),
    ] = "full,top2,lora,dora,ia3,prefix,bottleneck",
    output: Annotated[
        Path | None,
        typer.Option(help="Comparison folder (default: train.output_dir + '-compare')."),
    ] = None,
    set_: Annotated[
        list[str] | None,
        typer.Option("--set", help="METHOD:key=value for one method (repeatable)."),
    ] = None,
    fresh: Annotated[
        bool, typer.Option("--fresh", help="Retrain every method, ignoring cached results.")
    ] = False,
    batch_size: Annotated[
        int, typer.Option(min=1, help="Served batch size of the evaluation.")
    ] = 32,
    timed_batches: Annotated[int, typer.Option(min=1, help="Batches timed per batch size.")] = 20,
    robustness_samples: Annotated[
        int, typer.Option(min=1, help="Examples of the robustness check (seeded).")
    ] = 500,
    strengths: Annotated[
        str, typer.Option(help="Shares of words perturbed by the robustness check.")
    ] = "0.3",
) -> None:
    """Train and evaluate several methods on the same data and budget; a Markdown/HTML table.

    Each method runs in its own process, one after another; a failing method is
    recorded with its error and the others go on; finished methods are cached
    in the comparison folder and reused by the next run with the same inputs.
    """
    from tunesmith.config.root import Config
    from tunesmith.core.tables import text_table
    from tunesmith.evaluation.evaluator import EvalOptions
    from tunesmith.studies.compare.presets import parse_methods, parse_sets
    from tunesmith.studies.compare.runner import run_compare
    from tunesmith.studies.compare.table import columns, rows, write_tables

    names = parse_methods(methods)
    sets = parse_sets(set_ or [], names)
    cfg = Config.load(config, overrides or [])  # the shared part must be valid before any run
    out = output or Path(cfg.train.output_dir + "-compare")
    options = EvalOptions(
        batch_size=batch_size,
        latency_batches=timed_batches,
        robustness_samples=robustness_samples,
        strengths=[_rate(s) for s in _csv(strengths)],
        seed=cfg.train.seed,
    )
    results = run_compare(
        config,
        names,
        out,
        overrides=overrides or [],
        sets=sets,
        options=options,
        fresh=fresh,
        on_event=typer.echo,
    )
    header, metric = columns(results)
    body = rows(results, metric)
    paths = write_tables(results, out, f"tunesmith compare: {config.name}")
    typer.echo(text_table(header, body))
    typer.echo(f"wrote {paths['markdown']} and {paths['html']}")
    if not any(r["status"] == "ok" for r in results):
        raise typer.Exit(1)


@app.command()
def tune(
    config: Annotated[Path, typer.Argument(help="YAML config file with a search section.")],
    overrides: Overrides = None,
    trials: Annotated[
        int, typer.Option(min=1, help="Finished (complete or pruned) trials the study should have.")
    ] = 12,
    timeout: Annotated[
        float | None, typer.Option(min=0, help="Stop starting trials after this many minutes.")
    ] = None,
    keep_best: Annotated[
        bool, typer.Option("--keep-best", help="Keep the best trial's best/ checkpoint.")
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", help="Show each trial's training log.")
    ] = False,
) -> None:
    """Search the config's `search` section with Optuna; prunes bad trials, resumable.

    Trials run one after another; running the same command again continues the
    study stored in <train.output_dir>-tune/study.db. Results: trials.md,
    best.yaml (ready for `tunesmith train`), report.html with plots.
    """
    import importlib.util

    from tunesmith.errors import ConfigError

    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("tunesmith tune needs optuna: pip install 'tunesmith[tune]'")
    from tunesmith.studies.tune.results import summary_text, write_results
    from tunesmith.studies.tune.study import run_study

    study, folder = run_study(
        config,
        overrides or [],
        trials=trials,
        timeout_minutes=timeout,
        keep_best=keep_best,
        verbose=verbose,
        on_event=typer.echo,
    )
    typer.echo(summary_text(study, write_results(study, config, overrides or [], folder)))


@app.command()
def report(
    run_dir: Annotated[Path, typer.Argument(help="A run folder (train.output_dir).")],
    output: Annotated[
        Path | None, typer.Option(help="HTML file to write (default: RUN_DIR/report.html).")
    ] = None,
) -> None:
    """Render a run's HTML report: loss, metrics, learning rates, gradient norms, throughput."""
    from tunesmith.evaluation.report import render_report

    typer.echo(f"wrote {render_report(run_dir, output)}")


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """HF Trainer (+ peft) vs tunesmith on the demo model and data; --help for options."""
    from tunesmith.studies.bench import main as run_bench

    raise typer.Exit(run_bench(list(ctx.args)))
