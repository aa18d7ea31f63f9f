"""``stepsaver predict ...``: StepSaver's labelling sweep, dataset, recommender training and use.

The flat names of earlier releases (``stepsaver label``, ``dataset``, ``train-recommender``,
``distill-recommender``, ``recommend``) stay as aliases.
"""

from __future__ import annotations

from pathlib import Path

import typer

from stepsaver.cli.render import Col, JsonOpt, command, emit, emit_rows, err_console, log_to_stderr
from stepsaver.errors import StepsaverError

app = typer.Typer(no_args_is_help=True, help="Predict (StepSaver): label prompts, train and use the step recommender.")

FLAT = {"label": "label", "dataset": "dataset", "train-recommender": "train", "distill-recommender": "distill",
        "recommend": "recommend"}


@app.command("label")
@command
def label(
    prompts: Path = typer.Option(..., "--prompts", "-p", help="txt, csv, tsv, jsonl, json or parquet file of prompts."),
    out: Path = typer.Option(..., "--out", "-o", help="Folder for labels.jsonl (+ labels.parquet); resumable."),
    column: str | None = typer.Option(None, "--column", help="Prompt column (default: prompt/caption/text)."),
    model: str = typer.Option("tiny", "--model", "-m"),
    scheduler: str = typer.Option("ddim", "--scheduler", "-s"),
    steps: str = typer.Option("10:100:10", "--steps", help="Step grid, start:stop:step or a list 10,20,50."),
    seed: int = typer.Option(0, "--seed", help="Initial noise, the same for every step count."),
    seeds: int = typer.Option(1, "--seeds", help="Noises per prompt: seeds SEED..SEED+N-1, one row each "
                                                 "(3 lets `dataset` measure how much the prompt decides the label)."),
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
    from stepsaver.pipelines import scheduler_spec
    from stepsaver.predict.label import LabelConfig, label_file, parse_grid
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
                      tau=DEFAULT_TAU if tau is None else tau, n_seeds=seeds)
    summary = label_file(texts, out, cfg, batch=batch, workers=workers, device=device, ray_address=ray_address,
                         save_images=save_images, rule=rule, progress=not as_json, console=err_console)
    emit(summary, as_json, "labels")


@app.command("dataset")
@command
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
    """Prepare labels for training: clean, label by rule, hold out test, balance, split 9:1.

    With several seeds per prompt (`label --seeds N`) it also reports predictability: the share
    of label variance the prompt explains and the best any text-only recommender can score
    (printed, in the JSON payload and in dataset.json).
    """
    from stepsaver.predict.dataset import (
        DatasetConfig,
        label_report,
        predictability,
        predictability_summary,
        prepare_dataset,
        read_label_rows,
        several_seeds,
        write_dataset,
    )
    from stepsaver.predict.rules import DEFAULT_TAU, RULES

    if rule not in RULES:
        raise StepsaverError(f"unknown --rule {rule!r}; choose one of {', '.join(RULES)}")
    cfg = DatasetConfig(rule=rule, tau=DEFAULT_TAU if tau is None else tau, english_only=english_only,
                        balance=balance, min_count=min_count, test=test, val_fraction=val_fraction, seed=seed)
    label_rows = read_label_rows(labels)
    ds = prepare_dataset(label_rows, cfg)
    if several_seeds(label_rows) >= 2:
        pred = predictability(label_rows, rule=rule, tau=cfg.tau)
        pred_note = predictability_summary(pred) + "; training uses each prompt's first seed"
    else:
        pred = None
        pred_note = ("one seed per prompt: predictability (how much of the label the prompt decides, the best a "
                     "text-only recommender can do) cannot be measured; relabel with `stepsaver label --seeds 3`")
    if pred is not None:
        ds["predictability"] = pred  # dataset.json keeps it beside the class counts
    write_dataset(ds, out)
    if report:
        label_report(label_rows, report)
    classes = sorted({c for v in ds["counts"].values() for c in v})
    rows = [{"stage": stage, **{str(k): c.get(k, 0) for k in classes}, "total": sum(c.values())}
            for stage, c in ds["counts"].items()]
    emit_rows(rows, [Col("stage", "stage"), *[Col(str(k), str(k)) for k in classes], Col("total", "total")],
              as_json, f"class counts ({rule})",
              payload={"out": str(out), "counts": ds["counts"], "dropped": ds["dropped"], "classes": ds["classes"],
                       "predictability": pred, "predictability_note": pred_note},
              notes=[f"dropped: {ds['dropped'] or 'nothing'}; written to {out}", pred_note])


@app.command("train")
@command
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
    from stepsaver.predict.train import result_rows, train_recommender, write_recommender_report

    result = train_recommender(dataset_dir, out, preset, model=model, class_weights=class_weights, seed=seed,
                               epochs=epochs, log=log_to_stderr(as_json))
    if report:
        write_recommender_report(report, result)
    rows = result_rows(result)
    f3 = "{:.3f}"
    emit_rows(rows, [Col("model", lambda r: ("* " if r["selected"] else "") + r["model"]),
                     Col("val acc", "val_acc", f3), Col("test acc", "test_acc", f3), Col("test F1", "test_f1", f3),
                     Col("bal. acc", "test_bal_acc", f3), Col("bal. F1", "test_bal_f1", f3),
                     Col("val NLL", "val_loss", f3), Col("T", "T", f3)], as_json, "step recommender",
              payload={"rows": rows, "selected": result["selected"], "out": result["out"],
                       "confusion": result["confusion"]},
              notes=[f"saved to {result['out']} (confusion matrix: {result['confusion']})"])


@app.command("distill")
@command
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
    result = Student.distill(dataset_dir, out, teacher=teacher, n_captions=captions, caption_seed=caption_seed,
                             n_eval_captions=eval_captions, epochs=epochs, seed=seed, log=log_to_stderr(as_json))
    test = result["metrics"]["test"]
    keys = ("accuracy", "f1_macro", "log_loss", "spearman_expected_steps", "confidence_0.8_mean_steps",
            "confidence_0.8_covered")
    rows = [{"metric": k, "teacher": test["teacher"][k], "student": test["student"][k]}
            for k in keys if k in test["teacher"]]
    agree = test["agreement"]
    emit_rows(rows, [Col("test split", "metric"), Col("teacher", "teacher", "{:.3f}"),
                     Col("student", "student", "{:.3f}")], as_json,
              f"student vs teacher ({test['teacher']['n']} test rows)",
              payload={k: result[k] for k in ("out", "file", "bytes", "metrics", "training")},
              notes=[f"agreement with the teacher: argmax {agree['argmax_agreement']:.3f}, steps at confidence "
                     f"0.8 {agree['confidence_0.8_agreement']:.3f}; saved {result['file']} "
                     f"({result['bytes'] / 1e6:.2f} MB); use it with StepRecommender.load({str(out)!r}, "
                     "backend='student') or `stepsaver recommend --backend student`"])


@app.command("recommend")
@command
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
    recs = StepRecommender.load(recommender, backend=backend).recommend(prompts, confidence=confidence)
    payload = [r.to_dict() for r in recs]
    emit_rows(payload, [Col("prompt", lambda r: r["prompt"][:60] + ("" if r["english"] else " (non-English)")),
                        Col("steps", "steps"),
                        Col("probabilities", lambda r: " ".join(f"{k}:{v:.2f}" for k, v in r["probabilities"].items()
                                                                 if v >= 0.01)),
                        Col("ms", "milliseconds", "{:.2f}")], as_json, "recommended steps",
              payload=payload[0] if len(payload) == 1 else {"recommendations": payload})
    if not as_json:
        for r in recs:
            if r.note:
                err_console.print(f"note: {r.note}", highlight=False)
