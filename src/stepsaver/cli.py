"""The ``stepsaver`` command line: thin wrappers that parse, call the library and print.

Every command prints a Rich table for people, or exactly one JSON object on stdout with
``--json`` for programs. A :class:`StepsaverError` (anything the user can fix) becomes one line
on stderr and exit code 2, never a traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stepsaver.errors import StepsaverError

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="stepsaver: spend only the denoising steps each prompt needs.")
err_console = Console(stderr=True)
out_console = Console()

JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout instead of a table.")


def _quiet_libraries() -> None:
    """Keep diffusers/transformers chatter (deprecations, type hints) off the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    dl.disable_progress_bar()
    tl.disable_progress_bar()


def _command(fn: Callable) -> Callable:
    """Turn StepsaverError into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        _quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except StepsaverError as exc:
            if kwargs.get("as_json"):
                print(json.dumps({"error": str(exc)}))
            err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def _emit(payload: dict, as_json: bool, title: str) -> None:
    if as_json:
        print(json.dumps(payload, default=str))
        return
    table = Table(title=title, show_header=False, title_justify="left")
    for k, v in payload.items():
        table.add_row(str(k), f"{v:.3f}" if isinstance(v, float) else str(v))
    out_console.print(table)


@app.command()
@_command
def generate(
    prompt: str = typer.Argument(..., help="What to draw."),
    model: str = typer.Option("tiny", "--model", "-m", help="'tiny' (embedded), a hub id or a pipeline folder."),
    steps: str = typer.Option("30", "--steps", "-n", help="Denoising steps (1..1000), or 'auto' (the recommender)."),
    scheduler: str = typer.Option("ddim", "--scheduler", "-s", help="Sampler name; see `stepsaver schedulers`."),
    seed: int = typer.Option(0, "--seed", help="Seed of the initial noise."),
    recommender: str = typer.Option("tiny", "--recommender", help="Recommender for --steps auto: 'tiny' or a folder."),
    confidence: float | None = typer.Option(None, "--confidence",
                                            help="--steps auto: fewest steps with P(enough) >= this (default argmax)."),
    guidance: float = typer.Option(5.0, "--guidance", "-g", help="Classifier-free guidance scale (>= 0)."),
    guidance_rescale: float = typer.Option(0.0, "--guidance-rescale",
                                           help="CFG rescale phi in [0, 1] (for zero-terminal-SNR models)."),
    out: Path = typer.Option(Path("stepsaver.png"), "--out", "-o", help="Where to write the PNG."),
    device: str = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto."),
    skip: bool = typer.Option(False, "--skip/--no-skip", help="AdaptiveDiffusion step skipping inside the loop."),
    threshold: float = typer.Option(0.01, "--threshold", help="Skip threshold delta (with --skip)."),
    max_skips: int = typer.Option(4, "--max-skips", help="Most consecutive skips C_max (with --skip)."),
    as_json: bool = JsonOpt,
) -> None:
    """Generate one image and report steps, denoiser calls (made and saved) and seconds."""
    from stepsaver.generate import generate as run_generate
    from stepsaver.generate import resolve_steps, validate_request
    from stepsaver.pipelines import load_pipeline, scheduler_spec

    n_steps, auto = resolve_steps(prompt, steps, recommender, confidence)
    validate_request(prompt, n_steps, guidance)  # fail fast, before loading any weights
    scheduler_spec(scheduler)
    if out.suffix.lower() != ".png":
        raise StepsaverError(f"--out must be a .png path, got {out}")
    if skip:
        from stepsaver.skip import AdaptiveSkipConfig

        skip_config = AdaptiveSkipConfig(threshold=threshold, max_skips=max_skips)  # validates first
    pipe = load_pipeline(model, scheduler=scheduler, device=device)
    if skip:
        from stepsaver.skip import enable_adaptive_skip

        enable_adaptive_skip(pipe, skip_config)
    result = run_generate(pipe, prompt, steps=n_steps, seed=seed, guidance=guidance,
                          guidance_rescale=guidance_rescale)
    result.extra.update(auto)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.images[0].save(out)
    payload = {**result.summary(), "scheduler": scheduler, "model": model, "path": str(out)}
    _emit(payload, as_json, "generated")


@app.command()
@_command
def schedulers(as_json: bool = JsonOpt) -> None:
    """List the sampler names and the diffusers classes they map to."""
    from stepsaver.pipelines import SCHEDULERS

    payload = {k: {"class": v.cls_name, "kwargs": v.kwargs, "denoiser_calls_per_step": 2 if v.second_order else 1}
               for k, v in SCHEDULERS.items()}
    if as_json:
        print(json.dumps({"schedulers": payload}))
        return
    table = Table("name", "diffusers class", "kwargs", "calls/step")
    for k, v in payload.items():
        table.add_row(k, v["class"], json.dumps(v["kwargs"]), str(v["denoiser_calls_per_step"]))
    out_console.print(table)


@app.command()
@_command
def scenes(
    out: Path = typer.Argument(..., help="Folder to write images.npy, scenes.jsonl and grid.png into."),
    n: int = typer.Option(1000, "--n", help="Number of scenes."),
    seed: int = typer.Option(0, "--seed"),
    split: str = typer.Option("train", "--split", help="train, or eval (held-out compositions)."),
    font: str | None = typer.Option(None, "--font", help="Colour emoji font (Noto Color Emoji)."),
    as_json: bool = JsonOpt,
) -> None:
    """Render captioned emoji scenes (the embedded model's data) with a preview grid."""
    import numpy as np

    from stepsaver.scenes import load_scene_set, write_scene_set
    from stepsaver.shrink.grid import save_grid

    if n <= 0:
        raise StepsaverError(f"--n must be positive, got {n}")
    if split not in ("train", "eval"):
        raise StepsaverError(f"--split must be 'train' or 'eval', got {split!r}")
    write_scene_set(out, n, seed=seed, split=split, font=font, progress=not as_json)
    images, scs = load_scene_set(out)
    k = min(16, n)
    grid = save_grid(out / "grid.png", np.asarray(images[:k]), [s.caption for s in scs[:k]])
    _emit({"scenes": n, "split": split, "seed": seed, "folder": str(out), "grid": str(grid),
           "first_caption": scs[0].caption}, as_json, "scenes")


@app.command()
@_command
def samples(
    out: Path = typer.Option(Path("samples.png"), "--out", "-o", help="PNG grid to write."),
    model: str = typer.Option("tiny", "--model", "-m"),
    n: int = typer.Option(16, "--n", help="How many held-out scene prompts."),
    steps: int = typer.Option(30, "--steps"),
    scheduler: str = typer.Option("ddim", "--scheduler"),
    guidance: float = typer.Option(5.0, "--guidance"),
    guidance_rescale: float = typer.Option(0.0, "--guidance-rescale"),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = JsonOpt,
) -> None:
    """Grid of held-out scene prompts: the real scene beside the model's image."""
    from stepsaver.generate import validate_request
    from stepsaver.pipelines import load_pipeline
    from stepsaver.shrink.grid import render_eval_grid

    validate_request("scenes", steps, guidance)
    if n <= 0:
        raise StepsaverError(f"--n must be positive, got {n}")
    pipe = load_pipeline(model, scheduler=scheduler)
    path = render_eval_grid(pipe, out, n=n, steps=steps, guidance=guidance, seed=seed,
                            guidance_rescale=guidance_rescale)
    _emit({"grid": str(path), "model": model, "steps": steps, "scheduler": scheduler, "n": n}, as_json, "samples")


@app.command()
@_command
def label(
    prompts: Path = typer.Option(..., "--prompts", "-p", help="txt, csv, tsv, jsonl, json or parquet file of prompts."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for labels.jsonl (+ labels.parquet); resumable."),
    column: str | None = typer.Option(None, "--column", help="Prompt column (default: prompt/caption/text)."),
    model: str = typer.Option("tiny", "--model", "-m"),
    scheduler: str = typer.Option("ddim", "--scheduler", "-s"),
    steps: str = typer.Option("10:100:10", "--steps", help="Step grid, start:stop:step or a list 10,20,50."),
    seed: int = typer.Option(0, "--seed", help="Initial noise, the same for every step count."),
    guidance: float = typer.Option(5.0, "--guidance", "-g"),
    rule: str = typer.Option("first-decline", "--rule", help="Rule shown in the summary: first-decline or converged."),
    tau: float | None = typer.Option(None, "--tau", help="SSIM tolerance of the converged rule."),
    limit: int | None = typer.Option(None, "--limit", help="Label only the first N prompts of the file."),
    batch: int = typer.Option(16, "--batch", help="Prompts rendered together."),
    workers: int = typer.Option(1, "--workers", help="Ray actors, each with its own pipeline (1: no Ray)."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="ray:// cluster address (default: local)."),
    device: str = typer.Option("auto", "--device"),
    save_images: bool = typer.Option(False, "--save-images", help="Keep every render under OUT/renders/."),
    as_json: bool = JsonOpt,
) -> None:
    """StepSaver's sweep: render every prompt at each step count and label the fewest that suffice."""
    import collections
    import time

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from stepsaver.pipelines import scheduler_spec
    from stepsaver.predict.label import LabelConfig, label_prompts, parse_grid
    from stepsaver.predict.prompts import read_prompts
    from stepsaver.predict.rules import DEFAULT_TAU, RULES

    if rule not in RULES:
        raise StepsaverError(f"unknown --rule {rule!r}; choose one of {', '.join(RULES)}")
    grid = parse_grid(steps)
    scheduler_spec(scheduler)
    texts = read_prompts(prompts, column)
    if limit is not None:
        texts = texts[:limit]
    if not texts:
        raise StepsaverError(f"{prompts} holds no prompts")
    cfg = LabelConfig(model=model, scheduler=scheduler, steps=grid, seed=seed, guidance=guidance,
                      tau=DEFAULT_TAU if tau is None else tau)
    total = len(dict.fromkeys(texts))
    t0 = time.perf_counter()
    with Progress(TextColumn("labelling"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeRemainingColumn(), console=err_console, disable=as_json) as bar:
        task = bar.add_task("label", total=total, rate="")
        fresh = [0]

        def advance(n: int) -> None:
            if n == 0:  # first call: prompts already labelled by an earlier run
                from stepsaver.predict.label import LabelStore

                bar.update(task, completed=len(LabelStore(out, cfg).done & set(texts)))
                return
            fresh[0] += n
            rate = fresh[0] / (time.perf_counter() - t0) * 3600
            bar.update(task, advance=n, rate=f"{rate:,.0f} prompts/h")

        store = label_prompts(texts, out, cfg, batch=batch, workers=workers, device=device,
                              ray_address=ray_address, on_batch=advance, save_images=save_images)
    elapsed = time.perf_counter() - t0
    parquet = store.to_parquet()
    key = "label_first_decline" if rule == "first-decline" else "label_converged"
    rows = [r for r in store.rows() if r["prompt"] in set(texts)]
    counts = collections.Counter(r[key] for r in rows)
    _emit({"labelled": len(rows), "new": fresh[0], "seconds": round(elapsed, 1),
           "prompts_per_hour": round(fresh[0] / elapsed * 3600, 1) if fresh[0] else None,
           "rule": rule, "labels": dict(sorted(counts.items())), "out": str(parquet)}, as_json, "labels")


@app.command()
@_command
def dataset(
    labels: list[Path] = typer.Argument(..., help="labels.jsonl/.parquet files or `stepsaver label` folders."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for train/val/test(.jsonl) and dataset.json."),
    rule: str = typer.Option("converged", "--rule", help="first-decline (the paper) or converged (ours)."),
    tau: float | None = typer.Option(None, "--tau", help="SSIM tolerance of the converged rule."),
    english_only: bool = typer.Option(True, "--english-only/--all-languages", help="Drop non-English prompts."),
    balance: str = typer.Option("none", "--balance", help="none, or undersample (the majority class)."),
    min_count: int = typer.Option(0, "--min-count", help="Drop classes with fewer rows (the paper dropped 20)."),
    test: float = typer.Option(0.2, "--test", help="Test hold-out: a fraction (<1) or a row count."),
    val_fraction: float = typer.Option(0.1, "--val-fraction"),
    seed: int = typer.Option(0, "--seed"),
    report: str | None = typer.Option(None, "--report", help="Also write docs/results/<name>.{json,md,png}."),
    as_json: bool = JsonOpt,
) -> None:
    """Prepare labels for training: clean, label by rule, hold out test, balance, split 9:1."""
    from stepsaver.predict.dataset import (
        DatasetConfig,
        label_report,
        prepare_dataset,
        read_label_rows,
        write_dataset,
    )
    from stepsaver.predict.rules import DEFAULT_TAU, RULES

    if rule not in RULES:
        raise StepsaverError(f"unknown --rule {rule!r}; choose one of {', '.join(RULES)}")
    cfg = DatasetConfig(rule=rule, tau=DEFAULT_TAU if tau is None else tau, english_only=english_only,
                        balance=balance, min_count=min_count, test=test, val_fraction=val_fraction, seed=seed)
    label_rows = read_label_rows(labels)
    ds = prepare_dataset(label_rows, cfg)
    write_dataset(ds, out)
    if report:
        label_report(label_rows, report)
    if as_json:
        print(json.dumps({"out": str(out), "counts": ds["counts"], "dropped": ds["dropped"],
                          "classes": ds["classes"]}))
        return
    classes = sorted({c for v in ds["counts"].values() for c in v})
    table = Table("stage", *[str(c) for c in classes], "total", title=f"class counts ({rule})", title_justify="left")
    for stage, c in ds["counts"].items():
        table.add_row(stage, *[str(c.get(k, 0)) for k in classes], str(sum(c.values())))
    out_console.print(table)
    out_console.print(f"dropped: {ds['dropped'] or 'nothing'}; written to {out}")


@app.command("train-recommender")
@_command
def train_recommender_cmd(
    dataset_dir: Path = typer.Argument(..., help="Folder made by `stepsaver dataset`."),
    out: Path = typer.Option(Path("runs/recommender"), "--out", "-o"),
    preset: str = typer.Option("default", "--preset", help="default (validates best) or paper (lr 2e-3, bs 16, 5 ep)."),
    class_weights: bool = typer.Option(False, "--class-weights", help="Weight the loss by inverse class frequency."),
    epochs: int | None = typer.Option(None, "--epochs", help="Override the preset's epochs."),
    model: str = typer.Option("tiny", "--model", help="Which pipeline the labels were made with (recorded)."),
    seed: int = typer.Option(0, "--seed"),
    report: str | None = typer.Option(None, "--report", help="Also write docs/results/<name>.{json,md}."),
    as_json: bool = JsonOpt,
) -> None:
    """Fine-tune MiniLM-L6 on step labels, with majority / TF-IDF / frozen-embedding baselines."""
    from stepsaver.predict.train import train_recommender

    log = (lambda _m: None) if as_json else (lambda m: err_console.print(m, highlight=False))
    result = train_recommender(dataset_dir, out, preset, model=model, class_weights=class_weights, seed=seed,
                               epochs=epochs, log=log)
    rows = [{"model": r["model"], "val_acc": r["val"].get("accuracy"), "test_acc": r["test"].get("accuracy"),
             "test_f1": r["test"].get("f1_macro"), "test_bal_acc": r["test_balanced"].get("accuracy"),
             "test_bal_f1": r["test_balanced"].get("f1_macro"), "val_loss": r["val"].get("log_loss"),
             "T": r["temperature"], "selected": r.get("selected", False)} for r in result["rows"]]
    if report:
        from stepsaver.measure.report import write_report

        write_report(report, rows, title="Step recommender vs baselines",
                     summary=f"Classes {result['classes']}; selected: {result['selected']}; "
                             f"ONNX int8: {result['int8']} (argmax agreement with fp32 "
                             f"{result['onnx_int8_check']['argmax_agreement']:.3f}).",
                     extra={"detail": result})
    if as_json:
        print(json.dumps({"rows": rows, "selected": result["selected"], "out": result["out"],
                          "confusion": result["confusion"]}, default=str))
        return
    table = Table("model", "val acc", "test acc", "test F1", "bal. acc", "bal. F1", "val NLL", "T",
                  title="step recommender", title_justify="left")
    for r in rows:
        f = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        table.add_row(("* " if r["selected"] else "") + r["model"], f(r["val_acc"]), f(r["test_acc"]),
                      f(r["test_f1"]), f(r["test_bal_acc"]), f(r["test_bal_f1"]), f(r["val_loss"]), f(r["T"]))
    out_console.print(table)
    out_console.print(f"saved to {result['out']} (confusion matrix: {result['confusion']})")


@app.command("distill-recommender")
@_command
def distill_recommender_cmd(
    dataset_dir: Path = typer.Argument(..., help="The `stepsaver dataset` folder the teacher was trained on."),
    teacher: str = typer.Option("tiny", "--teacher", "-t", help="'tiny' (shipped) or a train-recommender folder."),
    out: Path = typer.Option(Path("runs/student"), "--out", "-o",
                             help="Recommender folder to write (teacher files copied + student.safetensors)."),
    captions: int = typer.Option(50_000, "--captions", help="Unlabelled training-split scene captions to distil on."),
    caption_seed: int = typer.Option(2, "--caption-seed"),
    eval_captions: int = typer.Option(1000, "--eval-captions",
                                      help="Evaluation-split captions for the off-distribution agreement check."),
    epochs: int = typer.Option(30, "--epochs"),
    seed: int = typer.Option(0, "--seed"),
    as_json: bool = JsonOpt,
) -> None:
    """Distil the recommender into a bag-of-word-pieces student (backend 'student'); teacher outputs are cached."""
    from stepsaver.predict.student import Student

    if captions < 1 or epochs < 1:
        raise StepsaverError(f"--captions and --epochs must be >= 1, got {captions} and {epochs}")
    log = (lambda _m: None) if as_json else (lambda m: err_console.print(m, highlight=False))
    result = Student.distill(dataset_dir, out, teacher=teacher, n_captions=captions, caption_seed=caption_seed,
                             n_eval_captions=eval_captions, epochs=epochs, seed=seed, log=log)
    if as_json:
        print(json.dumps({k: result[k] for k in ("out", "file", "bytes", "metrics", "training")}, default=str))
        return
    test = result["metrics"]["test"]
    table = Table("test split", "teacher", "student", title=f"student vs teacher ({test['teacher']['n']} test rows)",
                  title_justify="left")
    for key in ("accuracy", "f1_macro", "log_loss", "spearman_expected_steps", "confidence_0.8_mean_steps",
                "confidence_0.8_covered"):
        if key in test["teacher"]:
            table.add_row(key, f"{test['teacher'][key]:.3f}", f"{test['student'][key]:.3f}")
    out_console.print(table)
    agree = test["agreement"]
    out_console.print(f"agreement with the teacher: argmax {agree['argmax_agreement']:.3f}, steps at confidence "
                      f"0.8 {agree['confidence_0.8_agreement']:.3f}; saved {result['file']} "
                      f"({result['bytes'] / 1e6:.2f} MB); use it with StepRecommender.load({str(out)!r}, "
                      "backend='student') or `stepsaver recommend --backend student`")


@app.command()
@_command
def recommend(
    prompts: list[str] = typer.Argument(..., help="One or more prompts."),
    recommender: str = typer.Option("tiny", "--recommender", "-r", help="'tiny' (shipped) or a saved folder."),
    confidence: float | None = typer.Option(None, "--confidence",
                                            help="Fewest steps s with P(label <= s) >= this (default: argmax)."),
    backend: str = typer.Option("onnx", "--backend",
                                help="onnx (fine-tuned MiniLM, int8), torch, or student (distilled, much faster)."),
    as_json: bool = JsonOpt,
) -> None:
    """Recommend a step count per prompt, with class probabilities and milliseconds."""
    from stepsaver.predict.recommender import StepRecommender, validate_prompts

    validate_prompts(prompts)
    rec = StepRecommender.load(recommender, backend=backend)
    recs = rec.recommend(prompts, confidence=confidence)
    if as_json:
        payload = [r.to_dict() for r in recs]
        print(json.dumps(payload[0] if len(payload) == 1 else {"recommendations": payload}))
        return
    table = Table("prompt", "steps", "probabilities", "ms", title="recommended steps", title_justify="left")
    for r in recs:
        probs = " ".join(f"{k}:{v:.2f}" for k, v in r.probabilities.items() if v >= 0.01)
        table.add_row(r.prompt[:60] + ("" if r.english else " (non-English)"), str(r.steps), probs,
                      f"{r.milliseconds:.2f}")
    out_console.print(table)
    for r in recs:
        if r.note:
            err_console.print(f"note: {r.note}", highlight=False)


@app.command()
@_command
def serve(
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    model: str | None = typer.Option(None, "--model", "-m", help="Pipeline to serve (default 'tiny')."),
    recommender: str | None = typer.Option(None, "--recommender", "-r"),
    config: Path | None = typer.Option(None, "--config", help="JSON settings file (token, limits, batching)."),
    insecure: bool = typer.Option(False, "--insecure", help="Serve /v1/generate without a bearer token."),
    workers: int | None = typer.Option(None, "--workers", help="Generation threads (one pipeline each)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Most prompts batched into one call."),
    queue_size: int | None = typer.Option(None, "--queue-size", help="Waiting generate jobs before 503."),
    replicas: int | None = typer.Option(None, "--replicas", help="Deploy N replicas on Ray Serve instead."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="ray:// cluster (default: local Ray)."),
    study_db: str | None = typer.Option(None, "--study-db", help="SQLite file of preference studies."),
) -> None:
    """Run the HTTP service: /v1/recommend, /v1/generate, /healthz, /metrics, /docs."""
    from stepsaver.serve.settings import ServeSettings

    settings = ServeSettings.load(config, model=model, recommender=recommender, insecure=insecure or None,
                                  workers=workers, batch_size=batch_size, queue_size=queue_size, study_db=study_db)
    if settings.token is None and not settings.insecure:
        raise StepsaverError("no token configured: set STEPSAVER_TOKEN (or `token` in --config) to protect "
                             "/v1/generate, or pass --insecure")
    where = f"Ray Serve, {replicas} replicas" if replicas else "uvicorn"
    err_console.print(f"stepsaver serving model [bold]{settings.model}[/bold] at http://{host}:{port} ({where}); "
                      f"token {'set' if settings.token else 'NOT set (--insecure)'}; docs at /docs. Ctrl-C drains.",
                      highlight=False)
    if replicas:
        from stepsaver.serve.ray_app import serve_on_ray

        serve_on_ray(settings, replicas, host, port, ray_address)
        return
    import uvicorn

    from stepsaver.serve.app import create_app

    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)

study_app = typer.Typer(no_args_is_help=True, help="Side-by-side preference studies (DeciDiffusion's survey).")
app.add_typer(study_app, name="study")


@study_app.command("create")
@_command
def study_create(
    a: str = typer.Option(..., "--a", help="Config A, e.g. 'steps=50'."),
    b: str = typer.Option(..., "--b", help="Config B, e.g. 'steps=auto,skip'."),
    prompts: Path = typer.Option(..., "--prompts", "-p", help="Prompt file (txt/csv/tsv/jsonl/parquet)."),
    n: int = typer.Option(10, "--n", help="Prompts to use."),
    per_prompt: int = typer.Option(1, "--per-prompt", help="Seeds (pairs) per prompt."),
    db: Path = typer.Option(Path("runs/study.sqlite"), "--db"),
    root: Path = typer.Option(Path("runs/studies"), "--dir", help="Where the pair images go."),
    as_json: bool = JsonOpt,
) -> None:
    """Render the pairs of a study; serve it with `stepsaver serve` at /study/<id>."""
    from stepsaver.predict.prompts import read_prompts
    from stepsaver.serve.study import create_study, parse_config

    parse_config(a), parse_config(b)  # fail fast
    texts = read_prompts(prompts)[:n]
    study = create_study(db, root, a, b, texts, per_prompt=per_prompt, progress=not as_json)
    _emit({"study": study, "pairs": len(texts) * per_prompt, "url": f"/study/{study}", "db": str(db)}, as_json,
          "study")


@study_app.command("results")
@_command
def study_results(
    study: str = typer.Argument(..., help="Study id."),
    db: Path = typer.Option(Path("runs/study.sqlite"), "--db"),
    as_json: bool = JsonOpt,
) -> None:
    """Win/tie/loss rates per question with 95% intervals."""
    from stepsaver.serve.study import QUESTIONS, connect, results

    if not db.exists():
        raise StepsaverError(f"study database {db} does not exist")
    res = results(connect(db), study)
    if as_json:
        print(json.dumps(res))
        return
    table = Table("question", "B wins", "same", "A wins", title=f"study {study}: A={res['a']} B={res['b']}, "
                  f"{res['votes']} votes", title_justify="left")
    for q in QUESTIONS:
        r = res[q]
        table.add_row(r["question"], *[f"{r[k]['rate']:.0%} [{r[k]['ci95'][0]:.0%}, {r[k]['ci95'][1]:.0%}]"
                                       for k in ("b_wins", "tie", "a_wins")])
    out_console.print(table)

@app.command("train-vae")
@_command
def train_vae(
    out: Path = typer.Option(Path("runs/vae"), "--out"),
    steps: int = typer.Option(1200, "--steps"),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(1e-3, "--lr"),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from out/checkpoint.pt."),
    as_json: bool = JsonOpt,
) -> None:
    """Train the embedded model's AutoencoderKL on scenes drawn on the fly."""
    from stepsaver.shrink.autoencoder import AutoencoderTrainConfig, train_autoencoder

    if steps <= 0 or batch_size <= 0:
        raise StepsaverError("--steps and --batch-size must be positive")
    metrics = train_autoencoder(AutoencoderTrainConfig(out=str(out), steps=steps, batch_size=batch_size,
                                                       lr=lr, seed=seed), resume=resume)
    _emit({**metrics, "vae": str(out / "vae")}, as_json, "autoencoder")


@app.command("tune-decoder")
@_command
def tune_decoder_cmd(
    vae: Path = typer.Option(..., "--vae", help="Trained AutoencoderKL folder (or a pipeline folder)."),
    out: Path = typer.Option(Path("runs/vae-decoder"), "--out"),
    steps: int = typer.Option(2500, "--steps"),
    batch_size: int = typer.Option(32, "--batch-size"),
    lr: float = typer.Option(3e-4, "--lr"),
    lpips_weight: float = typer.Option(1.0, "--lpips-weight", help="Weight of the LPIPS-alex term."),
    seed: int = typer.Option(1, "--seed"),
    into_pipeline: Path | None = typer.Option(None, "--into-pipeline",
                                              help="Also write OUT/pipeline: this pipeline with the new decoder."),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from out/checkpoint.pt."),
    as_json: bool = JsonOpt,
) -> None:
    """Fine-tune only the decoder of a trained autoencoder (encoder frozen, so the UNet stays valid)."""
    from stepsaver.shrink.decoder import DecoderTuneConfig, tune_decoder

    result = tune_decoder(DecoderTuneConfig(vae=str(vae), out=str(out), steps=steps, batch_size=batch_size, lr=lr,
                                            lpips_weight=lpips_weight, seed=seed,
                                            into_pipeline=None if into_pipeline is None else str(into_pipeline)),
                          resume=resume)
    flat = {f"{k} {when}": v for when in ("before", "after") for k, v in result[when].items()}
    _emit(result if as_json else {**flat, "vae": result["vae"], "pipeline": result.get("pipeline")}, as_json, "decoder")


@app.command("train-model")
@_command
def train_model_cmd(
    out: Path = typer.Option(Path("runs/model"), "--out"),
    vae: Path = typer.Option(Path("runs/vae/vae"), "--vae", help="Trained AutoencoderKL folder."),
    recipe: str = typer.Option("deci", "--recipe", help="deci (DeciDiffusion) or sd (SD-1.5-style baseline)."),
    steps: int = typer.Option(5000, "--steps"),
    batch_size: int = typer.Option(64, "--batch-size"),
    scenes: int = typer.Option(40000, "--scenes", help="Training scenes to precompute."),
    lr: float = typer.Option(4e-4, "--lr"),
    ema_fraction: float = typer.Option(0.1, "--ema-fraction", help="Deci: EMA over the last fraction of steps."),
    min_snr_gamma: float = typer.Option(5.0, "--min-snr-gamma"),
    cfg_dropout: float = typer.Option(0.1, "--cfg-dropout"),
    checkpoint_every: int = typer.Option(250, "--checkpoint-every"),
    cache: Path = typer.Option(Path("runs/cache"), "--cache", help="Where scenes, embeddings and moments go."),
    seed: int = typer.Option(0, "--seed"),
    resume: bool = typer.Option(True, "--resume/--no-resume", help="Continue from out/checkpoint.pt."),
    max_minutes: float | None = typer.Option(None, "--max-minutes",
                                                help="Stop (checkpointed, resumable) after this long."),
    warmup: int = typer.Option(200, "--warmup", help="Linear LR warm-up steps."),
    scene_seed: int | None = typer.Option(None, "--scene-seed",
                                          help="Seed of the scene set (default: --seed); --seed then only "
                                               "drives batches and noise."),
    init_from: Path | None = typer.Option(None, "--init-from",
                                          help="Warm-start the UNet from a pipeline (or unet/) folder."),
    as_json: bool = JsonOpt,
) -> None:
    """Train the text-to-image UNet with the DeciDiffusion recipe (or the SD baseline)."""
    from stepsaver.shrink.train import TrainConfig, train_model

    cfg = TrainConfig(out=str(out), vae=str(vae), recipe=recipe, steps=steps, batch_size=batch_size,
                      scenes=scenes, lr=lr, ema_fraction=ema_fraction, min_snr_gamma=min_snr_gamma,
                      cfg_dropout=cfg_dropout, checkpoint_every=checkpoint_every, cache=str(cache), seed=seed,
                      warmup=warmup, scene_seed=scene_seed, init_from=None if init_from is None else str(init_from))
    summary = train_model(cfg, resume=resume, progress=not as_json, max_minutes=max_minutes)
    summary.pop("history", None)
    _emit(summary, as_json, f"trained ({recipe})")


bench_app = typer.Typer(no_args_is_help=True, help="Benchmarks: tables and plots under docs/results/.")
app.add_typer(bench_app, name="bench")


@bench_app.command("time")
@_command
def bench_time_cmd(
    model: str = typer.Option("tiny", "--model", "-m"),
    scheduler: str = typer.Option("ddim", "--scheduler"),
    steps: str = typer.Option("10:100:10", "--steps", help="start:stop:step, inclusive."),
    repeats: int = typer.Option(3, "--repeats"),
    out_dir: Path = typer.Option(Path("docs/results"), "--out-dir"),
    device: str = typer.Option("auto", "--device"),
    as_json: bool = JsonOpt,
) -> None:
    """Median generation time vs steps with a linear fit and R^2 (StepSaver Fig. 5)."""
    from stepsaver.generate import MAX_STEPS
    from stepsaver.measure.bench_time import bench_time
    from stepsaver.pipelines import load_pipeline

    try:
        a, b, c = (int(v) for v in steps.split(":"))
        grid = list(range(a, b + 1, c))
    except ValueError:
        raise StepsaverError(f"--steps must look like 10:100:10, got {steps!r}") from None
    if len(grid) < 2 or min(grid) <= 0 or max(grid) > MAX_STEPS or repeats < 1:
        raise StepsaverError(f"--steps needs >= 2 counts in 1..{MAX_STEPS} and --repeats >= 1")
    pipe = load_pipeline(model, scheduler=scheduler, device=device)
    result = bench_time(pipe, grid, repeats=repeats, out_dir=out_dir)
    fit = result["fit"]
    _emit({"ms_per_step": fit["slope"] * 1e3, "fixed_s": fit["intercept"], "r2": fit["r2"],
           "report": result["md"], "plot": result["plot"]}, as_json, "time vs steps")

@bench_app.command("recommend")
@_command
def bench_recommend_cmd(
    recommender: str = typer.Option("tiny", "--recommender", "-r", help="'tiny' (shipped) or a saved folder."),
    prompts: Path | None = typer.Option(None, "--prompts", "-p", help="Prompt file (default: held-out scene prompts)."),
    n: int = typer.Option(2000, "--n", help="Prompts for the throughput run."),
    n_single: int = typer.Option(200, "--n-single", help="Distinct prompts for single-prompt latency."),
    batch: int = typer.Option(256, "--batch"),
    threads: int | None = typer.Option(None, "--threads", help="ONNX Runtime intra-op threads (default: 2)."),
    out_dir: Path = typer.Option(Path("docs/results"), "--out-dir"),
    as_json: bool = JsonOpt,
) -> None:
    """Recommender p50 latency and prompts/s: PyTorch fp32 vs ONNX fp32 vs ONNX int8 vs the distilled student."""
    from stepsaver.predict.bench import bench_recommend
    from stepsaver.predict.prompts import read_prompts

    if prompts is not None:
        texts = read_prompts(prompts)[:n]
    else:
        from stepsaver.scenes import SceneGenerator

        gen = SceneGenerator(seed=7, split="eval")
        texts = [gen.sample(i).caption for i in range(n)]
    if not texts:
        raise StepsaverError("no prompts to time")
    result = bench_recommend(recommender, texts, n_single=n_single, batch=batch, threads=threads, out_dir=out_dir)
    if as_json:
        print(json.dumps(result, default=str))
        return
    table = Table("path", "p50 ms", "p90 ms", "cache hit ms", "prompts/s", "agree", title="recommender speed",
                  title_justify="left")
    for r in result["rows"]:
        table.add_row(r["path"], f"{r['p50_ms']:.2f}", f"{r['p90_ms']:.2f}", f"{r['cache_hit_ms']:.3f}",
                      f"{r['prompts_per_s']:,.0f}", f"{r['agreement_with_torch']:.3f}")
    out_console.print(table)
    out_console.print(escape(result["summary"]))


@bench_app.command("flexi")
@_command
def bench_flexi_cmd(
    n: int = typer.Option(500, "--n", help="Held-out scene prompts."),
    work: Path = typer.Option(Path("runs/labels/eval"), "--work", help="Label folder (resumable; renders kept)."),
    recommender: str = typer.Option("tiny", "--recommender", "-r"),
    confidence: float = typer.Option(0.8, "--confidence", help="Also report the recommender at this confidence."),
    steps: str = typer.Option("10:100:10", "--steps", help="Step grid."),
    scene_seed: int = typer.Option(1, "--scene-seed"),
    batch: int = typer.Option(32, "--batch"),
    repeats: int = typer.Option(3, "--repeats", help="Timed batch-1 generations per step count (median)."),
    n_boot: int = typer.Option(400, "--n-boot", help="Bootstrap replicates of each FID difference."),
    out_dir: Path = typer.Option(Path("docs/results"), "--out-dir"),
    as_json: bool = JsonOpt,
) -> None:
    """StepSaver's evaluation: fixed steps vs flexi (labels, recommender) vs iso-cost, one run."""
    from stepsaver.predict.flexi import bench_flexi
    from stepsaver.predict.label import LabelConfig, parse_grid

    result = bench_flexi(n, scene_seed=scene_seed, work=work, recommender=recommender, confidence=confidence,
                         config=LabelConfig(steps=parse_grid(steps)), batch=batch, repeats=repeats,
                         n_boot=n_boot, out_dir=out_dir, progress=not as_json)
    if as_json:
        print(json.dumps(result, default=str))
        return
    table = Table("method", "steps", "FID", "adherence", "s/image", "speedup", title="flexi", title_justify="left")
    for r in result["rows"]:
        table.add_row(r["method"], f"{r['mean_steps']:.1f}", f"{r['fid']:.2f}", f"{r['adherence']:.3f}",
                      f"{r['mean_s']:.3f}", f"{r['speedup_vs_fixed50']:.2f}x")
    out_console.print(table)
    out_console.print(escape(result["summary"]))

@bench_app.command("recipe")
@_command
def bench_recipe_cmd(
    vae: Path = typer.Option(Path("runs/vae/vae"), "--vae", help="Trained AutoencoderKL folder."),
    work: Path = typer.Option(Path("runs/recipe"), "--work", help="Where both runs train (resumable)."),
    deci: str | None = typer.Option(None, "--deci-pipeline", help="Skip training: a trained Deci pipeline."),
    sd: str | None = typer.Option(None, "--sd-pipeline", help="Skip training: a trained SD-recipe pipeline."),
    steps: int = typer.Option(6500, "--train-steps", help="Training steps of each recipe."),
    batch_size: int = typer.Option(64, "--batch-size"),
    scenes: int = typer.Option(40000, "--scenes"),
    cache: Path = typer.Option(Path("runs/cache"), "--cache"),
    n: int = typer.Option(500, "--n", help="Held-out prompts to evaluate."),
    grid: str = typer.Option("10,20,30,40,50", "--steps", help="DDIM step counts to evaluate."),
    max_minutes: float | None = typer.Option(None, "--max-minutes", help="Stop training (resumable) after this."),
    out_dir: Path = typer.Option(Path("docs/results"), "--out-dir"),
    n_boot: int = typer.Option(100, "--n-boot", help="Bootstrap replicates of the FID difference."),
    as_json: bool = JsonOpt,
) -> None:
    """Deci recipe vs SD-style baseline at identical compute: FID and adherence vs DDIM steps."""
    from stepsaver.predict.label import parse_grid
    from stepsaver.shrink.bench_recipe import bench_recipe
    from stepsaver.shrink.train import TrainConfig

    pipes = {k: v for k, v in (("deci", deci), ("sd", sd)) if v}
    base = TrainConfig(vae=str(vae), steps=steps, batch_size=batch_size, scenes=scenes, cache=str(cache))
    result = bench_recipe(base, work=work, pipelines=pipes, n=n, grid=parse_grid(grid), out_dir=out_dir,
                          progress=not as_json, max_minutes=max_minutes, n_boot=n_boot)
    if as_json:
        print(json.dumps(result, default=str))
        return
    table = Table("recipe", "steps", "FID", "adherence", title="recipe comparison", title_justify="left")
    for r in result["rows"]:
        table.add_row(r["recipe"], str(r["steps"]), f"{r['fid']:.2f}", f"{r['adherence']:.3f}")
    out_console.print(table)
    out_console.print(escape(result["summary"]))

@bench_app.command("models")
@_command
def bench_models_cmd(
    pipeline: list[str] = typer.Option(..., "--pipeline", "-p",
                                       help="LABEL=FOLDER, repeated; the first is the baseline."),
    n: int = typer.Option(300, "--n", help="Held-out prompts to evaluate."),
    grid: str = typer.Option("30,50", "--steps", help="DDIM step counts to evaluate."),
    name: str = typer.Option("models", "--name", help="Report name under --out-dir."),
    n_boot: int = typer.Option(100, "--n-boot", help="Bootstrap replicates of the FID difference."),
    out_dir: Path = typer.Option(Path("docs/results"), "--out-dir"),
    as_json: bool = JsonOpt,
) -> None:
    """Two or more checkpoints of a scene model: FID, adherence, objects found (large/small), grid."""
    from stepsaver.shrink.bench_models import bench_models

    try:
        steps = sorted({int(x) for x in grid.split(",") if x.strip()})
    except ValueError:
        steps = []
    if not steps or steps[0] <= 0:
        raise StepsaverError(f"--steps {grid!r}: write positive step counts separated by commas, e.g. 30,50")
    pipes = {}
    for item in pipeline:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise StepsaverError(f"--pipeline {item!r}: write LABEL=FOLDER, e.g. --pipeline v1=runs/deci/pipeline")
        pipes[label] = folder
    result = bench_models(pipes, n=n, grid=steps, name=name, n_boot=n_boot, out_dir=out_dir,
                          progress=not as_json)
    if as_json:
        print(json.dumps(result, default=str))
        return
    table = Table("model", "steps", "FID", "adherence", "background", "large found", "small found", "position",
                  title="checkpoints", title_justify="left")
    for r in result["rows"]:
        table.add_row(r["model"], str(r["steps"]), f"{r['fid']:.2f}", f"{r['adherence']:.3f}",
                      f"{r['background']:.3f}", f"{r['presence_large']:.3f}", f"{r['presence_small']:.3f}",
                      f"{r['position']:.3f}")
    out_console.print(table)
    out_console.print(escape(result["summary"]))


@bench_app.command("serve")
@_command
def bench_serve_cmd(
    n_recommend: int = typer.Option(2000, "--n-recommend"),
    c_recommend: int = typer.Option(32, "--c-recommend", help="Concurrency of recommend requests."),
    n_generate: int = typer.Option(40, "--n-generate"),
    c_generate: int = typer.Option(8, "--c-generate", help="Concurrency of generate requests."),
    steps: int = typer.Option(30, "--steps"),
    recommender: str = typer.Option("tiny", "--recommender", "-r"),
    out_dir: Path = typer.Option(Path("docs/results"), "--out-dir"),
    as_json: bool = JsonOpt,
) -> None:
    """Bounded load test of `stepsaver serve` on 127.0.0.1: throughput, p50/p99, 503s, 5xx."""
    from stepsaver.serve.loadtest import bench_serve

    result = bench_serve(n_recommend, c_recommend, n_generate, c_generate, steps, recommender, out_dir=out_dir)
    if as_json:
        print(json.dumps(result, default=str))
        return
    table = Table("load", "ok", "req/s", "p50 ms", "p99 ms", "503", "other 5xx", title="serve load test",
                  title_justify="left")
    for r in result["rows"]:
        table.add_row(r["load"], f"{r['ok']}/{r['requests']}", f"{r['throughput_rps']:.1f}", f"{r['p50_ms']:.1f}",
                      f"{r['p99_ms']:.1f}", str(r["status_503"]), str(r["other_5xx"]))
    out_console.print(table)
    out_console.print(escape(result["summary"]))

@bench_app.command("compound")
@_command
def bench_compound_cmd(
    n: int = typer.Option(200, "--n", help="Held-out scene prompts."),
    recommender: str = typer.Option("tiny", "--recommender", "-r"),
    confidence: float | None = typer.Option(None, "--confidence"),
    threshold: float = typer.Option(0.01, "--threshold"),
    max_skips: int = typer.Option(4, "--max-skips"),
    out_dir: Path = typer.Option(Path("docs/results"), "--out-dir"),
    as_json: bool = JsonOpt,
) -> None:
    """Fixed 50 vs Predict vs Skip vs Predict+Skip vs iso-cost: calls, seconds, FID, adherence, PSNR/LPIPS."""
    from stepsaver.measure.bench_compound import bench_compound

    result = bench_compound(n, recommender=recommender, confidence=confidence, threshold=threshold,
                            max_skips=max_skips, out_dir=out_dir, progress=not as_json)
    if as_json:
        print(json.dumps(result, default=str))
        return
    table = Table("method", "calls", "median s", "FID", "adherence", "PSNR", "LPIPS", title="compound",
                  title_justify="left")
    for r in result["rows"]:
        table.add_row(r["method"], f"{r['denoiser_calls']:.1f}", f"{r['median_s']:.3f}", f"{r['fid']:.2f}",
                      f"{r['adherence']:.3f}", f"{r['psnr_vs_fixed50']:.1f}", f"{r['lpips_vs_fixed50']:.3f}")
    out_console.print(table)
    out_console.print(escape(result["summary"]))

from stepsaver.skip.bench import bench_skip_cmd  # noqa: E402 - the command lives with the Skip benchmark

bench_app.command("skip")(_command(bench_skip_cmd))

@bench_app.command("label-workers")
@_command
def bench_label_workers_cmd(
    n: int = typer.Option(16, "--n", help="Scene prompts to label with each worker count."),
    workers: str = typer.Option("1,2", "--workers", help="Worker counts to compare."),
    batch: int = typer.Option(8, "--batch"),
    out_dir: Path = typer.Option(Path("docs/results"), "--out-dir"),
    as_json: bool = JsonOpt,
) -> None:
    """Labelling throughput (prompts/hour) with 1 vs N Ray workers, and that labels agree."""
    from stepsaver.predict.bench import bench_label_workers
    from stepsaver.scenes import SceneGenerator

    counts = [int(w) for w in workers.split(",")]
    if n < 1 or any(w < 1 for w in counts):
        raise StepsaverError("--n and every --workers value must be >= 1")
    gen = SceneGenerator(seed=21, split="train")
    result = bench_label_workers([gen.sample(i).caption for i in range(n)], counts, batch=batch, out_dir=out_dir)
    if as_json:
        print(json.dumps(result, default=str))
        return
    table = Table("workers", "prompts/h", "speedup", "labels equal", title="label workers", title_justify="left")
    for r in result["rows"]:
        table.add_row(str(r["workers"]), f"{r['prompts_per_hour']:.0f}", f"{r['speedup']:.2f}x",
                      str(r["labels_equal_to_1_worker"]))
    out_console.print(table)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
