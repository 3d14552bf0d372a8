"""Run commands: ``train``, ``distill``, ``demo``, ``eval`` and ``predict``.

Every import of the package's torch-using layers is deferred into the command
that needs it, so ``tunesmith --help`` and ``config validate`` start without torch."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from tunesmith.cli.common import (
    AllowUnsafeWeights,
    Library,
    NoProgress,
    Overrides,
    TrustRemoteCode,
    _csv,
    _metrics_text,
    _rate,
    _report,
)

app = typer.Typer()


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
    from tunesmith.config.root import Config
    from tunesmith.runs.train import train as run_train

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

    from tunesmith.config.root import Config
    from tunesmith.errors import ConfigError
    from tunesmith.runs.train import train as run_train
    from tunesmith.studies.distill_report import REPORT_FILE, compare, format_report

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
    from tunesmith.runs.demo import demo_config
    from tunesmith.runs.train import train as run_train

    overrides = list(overrides or [])
    if not any(o.startswith("train.overwrite=") for o in overrides):
        overrides.append("train.overwrite=true")
    cfg = demo_config(output_dir, overrides)
    typer.echo(f"demo: MiniLM-L6 on Rotten Tomatoes -> {cfg.train.output_dir}", err=True)
    _report(run_train(cfg, progress=not no_progress))


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
        from tunesmith.evaluation.evaluator import (
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
    from tunesmith.runs.predict import evaluate

    metrics = evaluate(checkpoint, data, split=split, batch_size=batch_size, **permissions)
    typer.echo(json.dumps(metrics, indent=1) if as_json else _metrics_text(metrics))


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
    from tunesmith.errors import DataError
    from tunesmith.runs.predict import predict as run_predict

    if (text is None) == (input is None):
        raise DataError("give either --text (repeatable) or --input FILE")
    if (checkpoint is None) == (not adapter):
        raise DataError("give either a CHECKPOINT or --adapter NAME (with --library)")
    if adapter:
        from tunesmith.runs.library import AdapterLibrary

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
