"""The ``tunesmith`` command line: parse, call the Python API, format the output.

Errors caused by input (``TunesmithError``) are caught once, here, and printed
as one line on stderr with exit code 2 (3 for a diverged run); ``--debug``
shows the traceback instead.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import Annotated, Any

import click
import typer

from tunesmith.errors import (
    EXIT_INTERRUPTED,
    EXIT_USER_ERROR,
    TrainingInterrupted,
    TunesmithError,
)

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    help="tunesmith: fine-tune pretrained transformers, one coherent controller.",
)
config_app = typer.Typer(no_args_is_help=True, help="Validate or show a config file.")
app.add_typer(config_app, name="config")
adapters_app = typer.Typer(
    no_args_is_help=True, help="A library of per-task adapters sharing one base model."
)
app.add_typer(adapters_app, name="adapters")
assets_app = typer.Typer(no_args_is_help=True, help="The offline demo models and data.")
app.add_typer(assets_app, name="assets")
Library = Annotated[Path, typer.Option("--library", help="Adapter library folder.")]

Overrides = Annotated[
    list[str] | None, typer.Argument(help="Dotted overrides, e.g. optim.lr=3e-5 train.epochs=2")
]
NoProgress = Annotated[bool, typer.Option("--no-progress", help="Hide progress bars.")]
TrustRemoteCode = Annotated[
    bool,
    typer.Option(
        "--trust-remote-code",
        help="Run the checkpoint's own model code (never taken from the checkpoint itself).",
    ),
]
AllowUnsafeWeights = Annotated[
    bool,
    typer.Option(
        "--allow-unsafe-weights", help="Accept pickle weights (loaded with weights_only=True)."
    ),
]


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Only warnings and errors.")] = False,
) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    _setup_logging(logging.WARNING if quiet else logging.INFO)


@app.command()
def train(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
    no_progress: NoProgress = False,
    resume: Annotated[
        str | None,
        typer.Option(
            help="Continue an interrupted run: 'latest' (of train.output_dir), a run folder "
            "or a checkpoints/step-N folder.",
            metavar="latest|PATH",
        ),
    ] = None,
    force: Annotated[
        bool, typer.Option("--force", help="Resume even if the config or data changed.")
    ] = False,
) -> None:
    """Fine-tune a model as CONFIG says; outputs go to train.output_dir.

    SIGINT/SIGTERM stop after the current step with a resumable checkpoint
    (a second signal aborts at once); --resume latest continues bit-identically.
    """
    from tunesmith.api import train as run_train
    from tunesmith.config import Config

    cfg = Config.load(config, overrides or [])
    _report(run_train(cfg, progress=not no_progress, resume=resume, force=force))


@app.command()
def distill(
    config: Annotated[Path, typer.Argument(help="YAML config file with a distill section.")],
    overrides: Overrides = None,
    no_progress: NoProgress = False,
    split: Annotated[
        str | None,
        typer.Option(help="Split both models are compared on (default: test if the run has one)."),
    ] = None,
    batches: Annotated[int, typer.Option(help="Timed batches per batch size.", min=1)] = 20,
) -> None:
    """Distil distill.teacher into the model CONFIG describes, then compare the two.

    Trains like `train` (the loss is alpha * T^2 * KL + (1 - alpha) * task loss, plus
    distill.hidden_weight * hidden-state matching), then prints teacher against student:
    task metric on SPLIT, parameters, weights size and CPU latency at batch 1 and 32;
    the numbers also go to distill_report.json in the run folder.
    """
    import json

    from tunesmith.api import train as run_train
    from tunesmith.config import Config
    from tunesmith.distill.report import REPORT_FILE, compare, format_report
    from tunesmith.errors import ConfigError

    cfg = Config.load(config, overrides or [])
    if cfg.distill.teacher is None:
        raise ConfigError(f"{config}: distill.teacher is not set; distill needs a teacher")
    result = run_train(cfg, progress=not no_progress)
    _report(result)
    report = compare(
        result.best_dir or result.final_dir,
        cfg.distill.teacher,
        split=split or ("test" if result.test_metrics else "validation"),
        batches=batches,
        threads=cfg.train.num_threads,
    )
    (result.output_dir / REPORT_FILE).write_text(json.dumps(report, indent=2), encoding="utf-8")
    typer.echo(format_report(report))


@app.command()
def demo(
    overrides: Overrides = None,
    output_dir: Annotated[str, typer.Option(help="Run folder.")] = "runs/demo",
    no_progress: NoProgress = False,
) -> None:
    """Fine-tune the offline MiniLM on Rotten Tomatoes reviews (a few minutes on a CPU)."""
    from tunesmith.api import train as run_train
    from tunesmith.demo import demo_config

    overrides = list(overrides or [])
    if not any(o.startswith("train.overwrite=") for o in overrides):
        overrides.append("train.overwrite=true")
    cfg = demo_config(output_dir, overrides)
    typer.echo(f"demo: MiniLM-L6 on Rotten Tomatoes -> {cfg.train.output_dir}", err=True)
    _report(run_train(cfg, progress=not no_progress))


@app.command()
def estimate(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
    steps: Annotated[int, typer.Option(help="Optimizer steps timed after the first.")] = 3,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
) -> None:
    """Parameters, memory (weights, gradients, optimizer, activations) and time per epoch.

    Builds the run as `train` would and takes a few real steps; writes nothing.
    Exits 1 when the estimate does not fit in the available memory.
    """
    from tunesmith.config import Config
    from tunesmith.estimate import estimate as run_estimate
    from tunesmith.estimate import format_estimate

    cfg = Config.load(config, overrides or [])
    result = run_estimate(cfg, timed_steps=steps)
    typer.echo(json.dumps(result.as_dict(), indent=1) if as_json else format_estimate(result))
    if not result.fits:
        raise typer.Exit(1)


@app.command(
    context_settings={"allow_extra_args": True, "ignore_unknown_options": True},
    add_help_option=False,
)
def bench(ctx: typer.Context) -> None:
    """HF Trainer (+ peft) vs tunesmith on the demo model and data; --help for options."""
    from tunesmith.bench import main as run_bench

    raise typer.Exit(run_bench(list(ctx.args)))


@app.command("eval")
def eval_(
    checkpoint: Annotated[Path, typer.Argument(help="A best/ or final/ folder.")],
    data: Annotated[str | None, typer.Option(help="Labelled data file.")] = None,
    split: Annotated[
        str | None, typer.Option(help="validation or test: that split of the checkpoint's run.")
    ] = None,
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    as_json: Annotated[bool, typer.Option("--json", help="Print metrics as JSON.")] = False,
    full: Annotated[
        bool,
        typer.Option(
            "--full",
            help="Also latency, throughput, peak memory, size, robustness and forgetting; "
            "saved as evaluation.json in the run folder.",
        ),
    ] = False,
    timed_batches: Annotated[
        int, typer.Option(min=1, help="--full: batches timed at batch 1 and at --batch-size.")
    ] = 20,
    perturb: Annotated[
        str,
        typer.Option(help="--full: perturbation kinds, comma-separated ('' skips robustness)."),
    ] = "typo,case,swap,delete",
    strengths: Annotated[
        str, typer.Option(help="--full: shares of words perturbed, comma-separated.")
    ] = "0.1,0.3",
    robustness_samples: Annotated[
        int, typer.Option(min=1, help="--full: examples of the robustness check (seeded).")
    ] = 500,
    trust_remote_code: TrustRemoteCode = False,
    allow_unsafe_weights: AllowUnsafeWeights = False,
) -> None:
    """Evaluate a saved checkpoint on a data file or on its run's validation/test split."""
    permissions = {
        "trust_remote_code": trust_remote_code,
        "allow_unsafe_weights": allow_unsafe_weights,
    }
    if full:
        from tunesmith.evaluate.evaluator import (
            EvalOptions,
            evaluate_checkpoint,
            format_evaluation,
            write_evaluation,
        )

        options = EvalOptions(
            batch_size=batch_size,
            latency_batches=timed_batches,
            kinds=_csv(perturb),
            strengths=[_rate(s) for s in _csv(strengths)],
            robustness_samples=robustness_samples,
        )
        report = evaluate_checkpoint(checkpoint, data, split=split, options=options, **permissions)
        path = write_evaluation(report, checkpoint)
        typer.echo(json.dumps(report, indent=1) if as_json else format_evaluation(report))
        typer.echo(f"saved {path}", err=True)
        return
    from tunesmith.api import evaluate

    metrics = evaluate(checkpoint, data, split=split, batch_size=batch_size, **permissions)
    typer.echo(json.dumps(metrics, indent=1) if as_json else _metrics_text(metrics))


def _csv(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def _rate(text: str) -> float:
    from tunesmith.errors import ConfigError

    try:
        value = float(text)
    except ValueError:
        raise ConfigError(f"--strengths: {text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise ConfigError(f"--strengths: {value} is not a share of words in [0, 1]")
    return value


@app.command()
def predict(
    checkpoint: Annotated[
        Path | None, typer.Argument(help="A best/ or final/ folder (or use --adapter).")
    ] = None,
    text: Annotated[
        list[str] | None, typer.Option(help="Raw text to predict on (repeatable).")
    ] = None,
    input: Annotated[str | None, typer.Option(help="Data file with a text column.")] = None,
    output: Annotated[Path | None, typer.Option(help="JSONL output (default: stdout).")] = None,
    adapter: Annotated[
        list[str] | None,
        typer.Option(help="Adapter of the --library to use (repeatable: one base, switched)."),
    ] = None,
    library: Library = Path("adapters"),
    batch_size: Annotated[int, typer.Option(min=1)] = 64,
    trust_remote_code: TrustRemoteCode = False,
    allow_unsafe_weights: AllowUnsafeWeights = False,
    max_new_tokens: Annotated[
        int | None, typer.Option(help="Generative tasks: most tokens per reply.")
    ] = None,
    num_beams: Annotated[int | None, typer.Option(help="Beam-search width.")] = None,
    num_return: Annotated[int | None, typer.Option(help="Replies per input.")] = None,
    sample: Annotated[
        bool | None, typer.Option("--sample/--greedy", help="Sample instead of greedy/beam.")
    ] = None,
    temperature: Annotated[float | None, typer.Option(help="Sampling temperature.")] = None,
    top_p: Annotated[float | None, typer.Option(help="Nucleus sampling mass.")] = None,
) -> None:
    """Predict for --text or an --input file, one JSON line per input.

    Classification: the label and its probabilities. Token classification:
    the entities with character offsets into the text (see README, NER).
    Generative tasks (causal_lm, seq2seq): the generated reply, with the run's
    ``generate`` settings unless the options here change them.

    With --adapter NAME (repeatable) the base model of the adapter library is
    loaded once and each named adapter predicts in turn.
    """
    from tunesmith.api import predict as run_predict
    from tunesmith.errors import DataError

    if (text is None) == (input is None):
        raise DataError("give either --text (repeatable) or --input FILE")
    if (checkpoint is None) == (not adapter):
        raise DataError("give either a CHECKPOINT or --adapter NAME (with --library)")
    if adapter:
        from tunesmith.adapters import AdapterLibrary

        predictor = AdapterLibrary(library).predictor()
        rows = [
            row
            for name in adapter
            for row in predictor.predict(
                text, adapter=name, input_path=input, batch_size=batch_size
            )
        ]
    else:
        options = {
            "max_new_tokens": max_new_tokens,
            "num_beams": num_beams,
            "num_return_sequences": num_return,
            "do_sample": sample,
            "temperature": temperature,
            "top_p": top_p,
        }
        rows = run_predict(
            checkpoint,
            text,
            input_path=input,
            batch_size=batch_size,
            trust_remote_code=trust_remote_code,
            allow_unsafe_weights=allow_unsafe_weights,
            generate={k: v for k, v in options.items() if v is not None},
        )
    lines = "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows)
    if output is None:
        sys.stdout.write(lines)
    else:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(lines, encoding="utf-8")
        typer.echo(f"wrote {len(rows)} predictions to {output}", err=True)


@app.command()
def analyze(
    config: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
    batches: Annotated[int, typer.Option(min=1, help="Training batches measured.")] = 8,
    probe_steps: Annotated[int, typer.Option(min=1, help="AdamW steps per probe.")] = 10,
) -> None:
    """Per-layer-group gradient norms, Fisher importance and a probe; suggests what to train."""
    from tunesmith.analyze import analyze as run_analyze
    from tunesmith.analyze import render
    from tunesmith.config import Config

    cfg = Config.load(config, overrides or [])
    typer.echo(render(run_analyze(cfg, batches=batches, probe_steps=probe_steps)))


@app.command()
def doctor() -> None:
    """Versions, threads, bf16 support and whether the offline demo assets are installed."""
    from tunesmith.doctor import collect, render

    typer.echo(render(collect()))


@assets_app.command("prepare")
def assets_prepare() -> None:
    """Locate every offline asset and convert those that need it (once; cached)."""
    from tunesmith.assets import ASSETS, find, locate

    for name, asset in ASSETS.items():
        if find(asset) is None:
            typer.echo(f"{name}: missing ({asset.install_command})")
            continue
        typer.echo(f"{name}: {locate(asset)}")


@adapters_app.command("add")
def adapters_add(
    name: Annotated[str, typer.Argument(help="Name to predict with.")],
    checkpoint: Annotated[Path, typer.Argument(help="An adapter run's best/ or final/.")],
    library: Library = Path("adapters"),
) -> None:
    """Copy an adapter checkpoint into the library (same base model as the others)."""
    from tunesmith.adapters import AdapterLibrary

    typer.echo(f"added {name}: {AdapterLibrary(library).add(name, checkpoint)}")


@adapters_app.command("list")
def adapters_list(library: Library = Path("adapters")) -> None:
    """The adapters in the library, with method, task, size and labels."""
    from tunesmith.adapters import AdapterLibrary, describe

    typer.echo(describe(AdapterLibrary(library).info()))


@adapters_app.command("delete")
def adapters_delete(
    name: Annotated[str, typer.Argument(help="Adapter to remove.")],
    library: Library = Path("adapters"),
) -> None:
    """Remove an adapter from the library."""
    from tunesmith.adapters import AdapterLibrary

    AdapterLibrary(library).delete(name)
    typer.echo(f"deleted {name}")


@config_app.command("validate")
def config_validate(
    file: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
) -> None:
    """Check a config file; exit 0 when valid, 2 with the first problem otherwise."""
    from tunesmith.config import Config

    Config.load(file, overrides or [])
    typer.echo(f"{file}: valid")


@config_app.command("show")
def config_show(
    file: Annotated[Path, typer.Argument(help="YAML config file.")],
    overrides: Overrides = None,
) -> None:
    """Print the fully resolved config (defaults filled in, overrides applied)."""
    from tunesmith.config import Config

    typer.echo(Config.load(file, overrides or []).to_yaml(), nl=False)


# -- output -----------------------------------------------------------------
def _report(result: Any) -> None:
    loop = result.loop
    lines = [
        f"steps: {loop.steps} ({loop.epochs:.2f} epochs) in {loop.train_seconds:.0f} s, "
        f"{loop.tokens_per_s:.0f} real tokens/s, peak memory {loop.peak_rss_mb:.0f} MiB"
        + (" (stopped early)" if loop.stopped_early else ""),
    ]
    if result.validation_metrics:
        lines.append(
            f"best validation (step {loop.best_step}): "
            + _metrics_text(result.validation_metrics, compact=True)
        )
    if result.test_metrics:
        lines.append("test (held out, best checkpoint):\n" + _metrics_text(result.test_metrics))
    lines.append(f"best model: {result.best_dir or result.final_dir}")
    typer.echo("\n".join(lines))


#: Prefixes of per-class report keys (``f1/<label>``), shown as a table, not as lines.
_PER_CLASS = ("precision", "recall", "f1", "support")


def _metrics_text(metrics: dict[str, Any], compact: bool = False) -> str:
    # Plain metrics, and a multi-task run's ``<task>/<metric>`` (not its per-class keys).
    top = {
        k: v
        for k, v in metrics.items()
        if "/" not in k or (k.count("/") == 1 and k.split("/")[0] not in _PER_CLASS)
    }
    if compact:
        return ", ".join(f"{k}={_fmt(v)}" for k, v in top.items())
    width = max((len(k) for k in top), default=0) + 2
    lines = [f"{k:<{width}}{_fmt(v)}" for k, v in top.items()]
    per_class = sorted({k.split("/", 1)[1] for k in metrics if k.startswith("f1/")})
    if per_class:
        w = max(16, *(len(lab) + 2 for lab in per_class))
        lines.append(f"{'label':<{w}}{'precision':>10}{'recall':>10}{'f1':>10}{'support':>9}")
        for lab in per_class:
            lines.append(
                f"{lab:<{w}}{metrics[f'precision/{lab}']:>10.4f}{metrics[f'recall/{lab}']:>10.4f}"
                f"{metrics[f'f1/{lab}']:>10.4f}{metrics[f'support/{lab}']:>9}"
            )
    return "\n".join(lines)


def _fmt(v: Any) -> str:
    return f"{v:.4f}" if isinstance(v, float) else str(v)


class _TqdmHandler(logging.Handler):
    """Log lines that do not tear through an active progress bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # pragma: no cover - logging must never raise
            self.handleError(record)


def _setup_logging(level: int) -> None:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger("tunesmith")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False


def main(argv: list[str] | None = None) -> int:
    """Entry point: run the app, turn user errors into one line and an exit code."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    try:
        result = app(args=args, prog_name="tunesmith", standalone_mode=False)
        return result if isinstance(result, int) else 0
    except TunesmithError as err:
        if debug:
            raise
        kind = "interrupted" if isinstance(err, TrainingInterrupted) else "error"
        print(f"{kind}: {err}", file=sys.stderr)
        return err.exit_code
    except click.exceptions.Exit as err:
        return err.exit_code
    except click.ClickException as err:
        err.show()
        return EXIT_USER_ERROR if err.exit_code == 2 else err.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        print("interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


# The method-comparison, search and report commands, and the data commands, live in
# their own modules.
from tunesmith import cli_data, cli_deploy, cli_studies  # noqa: E402, F401

if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
