"""``stepsaver bench ...``: each command parses, calls one function of :mod:`stepsaver.bench` and shows its rows."""

from __future__ import annotations

import math
from pathlib import Path

import typer

from stepsaver.cli.render import Col, JsonOpt, command, emit, emit_rows
from stepsaver.errors import StepsaverError

app = typer.Typer(no_args_is_help=True, help="Benchmarks: tables and plots under docs/results/.")

F2, F3 = "{:.2f}", "{:.3f}"


@app.command("time")
@command
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
    from stepsaver.bench.time import bench_time
    from stepsaver.generation import MAX_STEPS
    from stepsaver.pipelines import load_pipeline
    from stepsaver.predict.label import parse_grid

    grid = list(parse_grid(steps))
    if max(grid) > MAX_STEPS or repeats < 1:
        raise StepsaverError(f"--steps needs counts in 1..{MAX_STEPS} and --repeats >= 1")
    pipe = load_pipeline(model, scheduler=scheduler, device=device)
    result = bench_time(pipe, grid, repeats=repeats, out_dir=out_dir)
    fit = result["fit"]
    emit({"ms_per_step": fit["slope"] * 1e3, "fixed_s": fit["intercept"], "r2": fit["r2"],
          "report": result["md"], "plot": result["plot"]}, as_json, "time vs steps")


@app.command("recommend")
@command
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
    from stepsaver.bench.recommend import bench_recommend, default_prompts
    from stepsaver.predict.prompts import read_prompts

    texts = read_prompts(prompts)[:n] if prompts is not None else default_prompts(n)
    if not texts:
        raise StepsaverError("no prompts to time")
    result = bench_recommend(recommender, texts, n_single=n_single, batch=batch, threads=threads, out_dir=out_dir)
    emit_rows(result["rows"], [Col("path", "path"), Col("p50 ms", "p50_ms", F2), Col("p90 ms", "p90_ms", F2),
                               Col("cache hit ms", "cache_hit_ms", F3), Col("prompts/s", "prompts_per_s", "{:,.0f}"),
                               Col("agree", "agreement_with_torch", F3)], as_json, "recommender speed",
              payload=result, notes=[result["summary"]])


@app.command("flexi")
@command
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
    """StepSaver's evaluation: fixed vs flexi steps vs iso-cost (FID, time), and fidelity to the longest render."""
    from stepsaver.bench.flexi import bench_flexi
    from stepsaver.predict.label import LabelConfig, parse_grid

    result = bench_flexi(n, scene_seed=scene_seed, work=work, recommender=recommender, confidence=confidence,
                         config=LabelConfig(steps=parse_grid(steps)), batch=batch, repeats=repeats,
                         n_boot=n_boot, out_dir=out_dir, progress=not as_json)
    emit_rows(result["rows"], [Col("method", "method"), Col("steps", "mean_steps", "{:.1f}"), Col("FID", "fid", F2),
                               Col("adherence", "adherence", F3), Col("s/image", "mean_s", F3),
                               Col("speedup", "speedup_vs_fixed50", "{:.2f}x")], as_json, "flexi",
              payload=result, notes=[result["summary"]])
    if not as_json:  # --json prints one document: the payload above already holds result["fidelity"]
        fid = result["fidelity"]
        emit_rows(fid["rows"], [Col("method", "method"), Col("role", "role"), Col("steps", "mean_steps", "{:.1f}"),
                                Col(f"SSIM to {fid['reference_steps']}", "ssim_to_ref", F3),
                                Col("LPIPS", "lpips_to_ref", F3),
                                Col("visibly different", "share_visibly_different", "{:.1%}")], False,
                  "Predict's honest view: fidelity to the longest render", notes=[fid["summary"]])


@app.command("recipe")
@command
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
    from stepsaver.bench.recipe import bench_recipe
    from stepsaver.predict.label import parse_grid
    from stepsaver.shrink.train import TrainConfig

    pipes = {k: v for k, v in (("deci", deci), ("sd", sd)) if v}
    base = TrainConfig(vae=str(vae), steps=steps, batch_size=batch_size, scenes=scenes, cache=str(cache))
    result = bench_recipe(base, work=work, pipelines=pipes, n=n, grid=parse_grid(grid), out_dir=out_dir,
                          progress=not as_json, max_minutes=max_minutes, n_boot=n_boot)
    emit_rows(result["rows"], [Col("recipe", "recipe"), Col("steps", "steps"), Col("FID", "fid", F2),
                               Col("adherence", "adherence", F3)], as_json, "recipe comparison",
              payload=result, notes=[result["summary"]])


@app.command("models")
@command
def bench_models_cmd(
    pipeline: list[str] = typer.Option(..., "--pipeline", "-p",
                                       help="LABEL=FOLDER, repeated; the first is the baseline."),
    n: int = typer.Option(300, "--n", help="Held-out prompts to evaluate."),
    grid: str = typer.Option("30,50", "--steps", help="Step counts to evaluate (each model's own scheduler)."),
    guidance: float = typer.Option(5.0, "--guidance", "-g", help="CFG scale of every model."),
    guidance_for: list[str] = typer.Option([], "--guidance-for", help="LABEL=SCALE, repeated: one model's own."),
    split: str = typer.Option("eval", "--split", help="eval (held out) or train (to choose a setting on)."),
    name: str = typer.Option("models", "--name", help="Report name under --out-dir."),
    n_boot: int = typer.Option(100, "--n-boot", help="Bootstrap replicates of the FID difference."),
    out_dir: Path = typer.Option(Path("docs/results"), "--out-dir"),
    as_json: bool = JsonOpt,
) -> None:
    """Two or more checkpoints of a scene model: FID, adherence, objects found (large/small), grid."""
    from stepsaver.bench.models import bench_models, parse_pipelines
    from stepsaver.predict.label import parse_grid

    pipes = parse_pipelines(pipeline)
    scales: dict[str, float] = dict.fromkeys(pipes, guidance)
    for item in guidance_for:
        label, sep, value = item.partition("=")
        try:
            scales[label] = float(value)
        except ValueError:
            sep = ""
        if not sep or not math.isfinite(scales.get(label, 0.0)) or scales.get(label, 0.0) < 0:
            raise StepsaverError(f"--guidance-for {item!r}: write LABEL=SCALE with a finite scale >= 0, "
                                 "e.g. --guidance-for flux=4")
    result = bench_models(pipes, n=n, grid=parse_grid(grid, at_least=1), guidance=scales, name=name,
                          n_boot=n_boot, out_dir=out_dir, progress=not as_json, split=split)
    emit_rows(result["rows"], [Col("model", "model"), Col("steps", "steps"), Col("FID", "fid", F2),
                               Col("adherence", "adherence", F3), Col("background", "background", F3),
                               Col("large found", "presence_large", F3), Col("small found", "presence_small", F3),
                               Col("position", "position", F3)], as_json, "checkpoints",
              payload=result, notes=[result["summary"]])


@app.command("serve")
@command
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
    from stepsaver.bench.load import bench_serve

    result = bench_serve(n_recommend, c_recommend, n_generate, c_generate, steps, recommender, out_dir=out_dir)
    emit_rows(result["rows"], [Col("load", "load"), Col("ok", lambda r: f"{r['ok']}/{r['requests']}"),
                               Col("req/s", "throughput_rps", "{:.1f}"), Col("p50 ms", "p50_ms", "{:.1f}"),
                               Col("p99 ms", "p99_ms", "{:.1f}"), Col("503", "status_503"),
                               Col("other 5xx", "other_5xx")], as_json, "serve load test",
              payload=result, notes=[result["summary"]])


@app.command("compound")
@command
def bench_compound_cmd(
    n: int = typer.Option(200, "--n", help="Held-out scene prompts."),
    recommender: str = typer.Option("tiny", "--recommender", "-r"),
    confidence: float | None = typer.Option(None, "--confidence"),
    threshold: float | None = typer.Option(None, "--threshold", help="Skip's threshold [default: the rule's]."),
    max_skips: int | None = typer.Option(None, "--max-skips", help="Skip's C_max [default: the rule's]."),
    out_dir: Path = typer.Option(Path("docs/results"), "--out-dir"),
    as_json: bool = JsonOpt,
) -> None:
    """Fixed 50 vs Predict vs Skip vs Predict+Skip vs iso-cost: calls, seconds, FID, adherence, PSNR/LPIPS."""
    from stepsaver.bench.compound import bench_compound

    result = bench_compound(n, recommender=recommender, confidence=confidence, threshold=threshold,
                            max_skips=max_skips, out_dir=out_dir, progress=not as_json)
    emit_rows(result["rows"], [Col("method", "method"), Col("calls", "denoiser_calls", "{:.1f}"),
                               Col("median s", "median_s", F3), Col("FID", "fid", F2),
                               Col("adherence", "adherence", F3), Col("PSNR", "psnr_vs_fixed50", "{:.1f}"),
                               Col("LPIPS", "lpips_vs_fixed50", F3)], as_json, "compound",
              payload=result, notes=[result["summary"]])


def _names(text: str) -> tuple[str, ...]:
    return tuple(s.strip() for s in text.split(",") if s.strip())


@app.command("skip")
@command
def bench_skip_cmd(
    n: int = typer.Option(200, "--n", help="Held-out scene prompts for the main table."),
    ablation_n: int | None = typer.Option(
        None, "--ablation-n", help="Prompts for the delta x C_max and step ablations [default: 50, at most --n]."),
    oracle_n: int | None = typer.Option(
        None, "--oracle-n", help="Prompts searched by the greedy oracle, first scheduler [default: 10, at most --n]."),
    time_n: int | None = typer.Option(
        None, "--time-n", help="Prompts timed, every method in turn on each [default: 50, at most --n]."),
    macs_n: int | None = typer.Option(
        None, "--macs-n", help="Prompts whose MACs are counted, FlopCounterMode [default: 4, at most --n]."),
    schedulers: str = typer.Option("ddim,dpmpp_2m,euler", "--schedulers", help="Comma-separated names."),
    ablation_schedulers: str | None = typer.Option(
        None, "--ablation-schedulers", help="Schedulers that get the ablations, comma-separated, or 'all' "
        "[default: the first of --schedulers]."),
    steps: int = typer.Option(50, "--steps", help="Full step count (the issue's targets are at 50)."),
    ablation_steps: str = typer.Option("50,25,15,10", "--ablation-steps"),
    threshold: float | None = typer.Option(None, "--threshold",
                                           help="Threshold of 'ours' (the shipped rule) [default: Skip's]."),
    max_skips: int | None = typer.Option(None, "--max-skips", help="C_max of 'ours' [default: Skip's]."),
    batch: int = typer.Option(8, "--batch", help="Batch of the per-sample row."),
    oracle_tolerance: float | None = typer.Option(
        None, "--oracle-tolerance", help="Relative L2 of the final latent (default: the estimator's own error)."),
    seed: int = typer.Option(0, "--seed", help="Prompt i is rendered with seed + i."),
    guidance: float = typer.Option(5.0, "--guidance", "-g"),
    model: str = typer.Option("tiny", "--model", "-m"),
    device: str = typer.Option("auto", "--device"),
    fid: bool = typer.Option(True, "--fid/--no-fid", help="Compute FID (loads the Inception network)."),
    compiled: bool = typer.Option(True, "--compile/--no-compile",
                                  help="Rows with the UNet under torch.compile (Inductor), with and without Skip."),
    deltas: str = typer.Option("0.06,0.1,0.15", "--deltas", help="Ablation grid: thresholds of ours' rule."),
    max_skips_grid: str = typer.Option("4,6", "--max-skips-grid", help="Ablation grid: C_max values."),
    sweep_n: int | None = typer.Option(None, "--sweep-n", help="Prompts of the every-scheduler sweep, 0 for none "
                                       "[default: 24, at most --n]."),
    sweep_schedulers: str | None = typer.Option(None, "--sweep-schedulers",
                                                help="Schedulers of the sweep [default: every one of the registry]."),
    sweep_steps: str = typer.Option("30,50", "--sweep-steps", help="Step counts of the sweep."),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's own)."),
    cache: Path | None = typer.Option(
        None, "--cache", help="Keep renders in this folder: a killed run resumes from it, and processes "
        "benchmarking different --schedulers can share it."),
    out: Path = typer.Option(Path("docs/results"), "--out", "-o", help="Folder for skip.json, skip.md and plots."),
    as_json: bool = JsonOpt,
) -> None:
    """AdaptiveDiffusion vs full steps, official-compat, DeepCache and iso-cost fixed steps (issue 4)."""
    from stepsaver.bench.skip import SkipBenchConfig, bench_skip

    names = _names(schedulers)
    ablated = None if ablation_schedulers is None else names if ablation_schedulers.strip() == "all" else \
        _names(ablation_schedulers)
    base = SkipBenchConfig()

    def upto(value: int | None, default: int) -> int:  # an unset count follows --n down, a set one is checked
        return min(default, max(n, 1)) if value is None else value

    def numbers(text: str, option: str, kind: type, example: str) -> tuple:
        try:
            values = tuple(kind(v) for v in _names(text))
        except ValueError:
            raise StepsaverError(f"{option} must be a comma-separated list of {kind.__name__}s, got {text!r}") \
                from None
        if not values:
            raise StepsaverError(f"{option} is empty; give values such as {example}")
        return values

    abl_steps = numbers(ablation_steps, "--ablation-steps", int, "50,25,15,10")
    grid_deltas = numbers(deltas, "--deltas", float, "0.01,0.02")
    grid_skips = numbers(max_skips_grid, "--max-skips-grid", int, "2,4")
    swept_steps = numbers(sweep_steps, "--sweep-steps", int, "30,50")
    cfg = SkipBenchConfig(n=n, ablation_n=upto(ablation_n, base.ablation_n), oracle_n=upto(oracle_n, base.oracle_n),
                          time_n=upto(time_n, base.time_n), macs_n=upto(macs_n, base.macs_n),
                          schedulers=names, ablation_schedulers=ablated, steps=steps, ablation_steps=abl_steps,
                          threshold=threshold, max_skips=max_skips, batch=batch, oracle_tolerance=oracle_tolerance,
                          seed=seed, guidance=guidance, model=model, device=device, fid=fid,
                          threads=threads, cache_dir=str(cache) if cache else None, compiled=compiled,
                          deltas=grid_deltas, max_skips_grid=grid_skips, sweep_steps=swept_steps,
                          sweep_n=upto(sweep_n, base.sweep_n),
                          sweep_schedulers=None if sweep_schedulers is None else _names(sweep_schedulers))
    result = bench_skip(cfg, out_dir=out, show_progress=not as_json)
    g3 = lambda key: lambda r: r[key] if not isinstance(r[key], float) else f"{r[key]:.3g}"  # noqa: E731
    emit_rows(result["rows"], [Col(c, g3(c)) for c in ("scheduler", "method", "denoiser_calls", "speedup", "psnr_db",
                                                      "lpips", "fid")],
              as_json, f"bench skip ({result['seconds'] / 60:.1f} min)",
              payload={k: result[k] for k in ("targets", "seconds", "json", "md", "plots")},
              notes=[*(v["text"].replace("**", "") for v in result["targets"].values()), f"report: {result['md']}"])


@app.command("caches")
@command
def bench_caches_cmd(
    model: str = typer.Option("tiny-flux", "--model", "-m",
                              help="A Flux-layout model (diffusers' caches need it); 'none': the UNet half only."),
    unet_model: str = typer.Option("tiny", "--unet-model", help="The UNet half's model ('none': Flux only)."),
    unet_n: int | None = typer.Option(None, "--unet-n", help="Prompts of the UNet half (default: --n)."),
    n: int = typer.Option(200, "--n", help="Held-out scene prompts."),
    calib_n: int = typer.Option(16, "--calib-n", help="Training-split prompts for MagCache's calibration."),
    time_n: int = typer.Option(20, "--time-n", help="Prompts timed, every method in turn on each."),
    steps: str = typer.Option("28,50", "--steps", help="Full step counts, comma-separated."),
    guidance: float = typer.Option(4.0, "--guidance", "-g"),
    seed: int = typer.Option(0, "--seed", help="Prompt i is rendered with seed + i."),
    fid: bool = typer.Option(True, "--fid/--no-fid"),
    adherence: bool = typer.Option(True, "--adherence/--no-adherence"),
    threads: int | None = typer.Option(None, "--threads", help="torch CPU threads (default: torch's own)."),
    out: Path = typer.Option(Path("docs/results"), "--out", "-o", help="Folder for caches.json, .md and .png."),
    work: Path = typer.Option(Path("runs/caches-bench"), "--work", help="Render cache (a killed run resumes)."),
    ledger: str | None = typer.Option(None, "--ledger",
                                      help="Per-row calls and scores and MagCache's ratios, small enough to commit "
                                           "so a later session on a fresh machine renders only what is missing "
                                           "(default: OUT/caches-ledger; 'none': beside the renders)."),
    render_only: bool = typer.Option(False, "--render-only",
                                     help="Fill the render cache and stop (run each half in its own process)."),
    retime: bool = typer.Option(False, "--retime", help="Time every block again (default: the ledger's timing "
                                                        "of a block with the same methods, threads and machine)."),
    score_only: bool = typer.Option(False, "--score-only",
                                    help="Fill the render and score caches (FID, LPIPS, adherence, MACs) and stop; "
                                         "the report run then only times."),
    as_json: bool = JsonOpt,
) -> None:
    """Skip beside FirstBlockCache, MagCache, TaylorSeer, PAB, FasterCache and plain fewer steps (issue 19)."""
    from stepsaver.bench.caches import CachesBenchConfig, bench_caches

    try:
        step_counts = tuple(int(v) for v in _names(steps))
    except ValueError:
        raise StepsaverError(f"--steps must be comma-separated integers, got {steps!r}") from None
    none = lambda name: None if name.lower() == "none" else name  # noqa: E731
    cfg = CachesBenchConfig(model=none(model), n=n, calib_n=calib_n, time_n=min(time_n, n), steps=step_counts,
                            guidance=guidance, seed=seed, fid=fid, adherence=adherence, threads=threads,
                            unet_model=none(unet_model), unet_n=unet_n, work=str(work),
                            ledger=str(out / "caches-ledger") if ledger is None else none(ledger),
                            render_only=render_only, retime=retime,
                            score_only=score_only)
    result = bench_caches(cfg, out_dir=out, progress=not as_json)
    if render_only or score_only:
        what = "renders" if render_only else "renders and scores"
        emit({"seconds": result["seconds"], "work": str(work)}, as_json,
             f"bench caches: {what} are in {work} ({result['seconds'] / 60:.1f} min); run again without "
             f"--{'render' if render_only else 'score'}-only for the report")
        return
    g3 = lambda key: lambda r: r[key] if not isinstance(r[key], float) else f"{r[key]:.3g}"  # noqa: E731
    emit_rows(result["rows"], [Col(c, g3(c)) for c in ("model", "steps", "method", "denoiser_calls", "speedup",
                                                      "psnr_db", "lpips", "fid", "adherence")],
              as_json, f"bench caches ({result['seconds'] / 60:.1f} min)",
              payload={k: result[k] for k in ("targets", "seconds", "json", "md", "plots")},
              notes=[*(v["text"].replace("**", "") for v in result["targets"].values()), f"report: {result['md']}"])


@app.command("label-workers")
@command
def bench_label_workers_cmd(
    n: int = typer.Option(16, "--n", help="Scene prompts to label with each worker count."),
    workers: str = typer.Option("1,2", "--workers", help="Worker counts to compare."),
    batch: int = typer.Option(8, "--batch"),
    out_dir: Path = typer.Option(Path("docs/results"), "--out-dir"),
    as_json: bool = JsonOpt,
) -> None:
    """Labelling throughput (prompts/hour) with 1 vs N Ray workers, and that labels agree."""
    from stepsaver.bench.recommend import bench_label_workers, default_prompts

    try:
        counts = [int(w) for w in _names(workers)]
    except ValueError:
        raise StepsaverError(f"--workers must be comma-separated integers, got {workers!r}") from None
    if n < 1 or not counts or any(w < 1 for w in counts):
        raise StepsaverError("--n and every --workers value must be >= 1")
    result = bench_label_workers(default_prompts(n, seed=21, split="train"), counts, batch=batch, out_dir=out_dir)
    emit_rows(result["rows"], [Col("workers", "workers"), Col("prompts/h", "prompts_per_hour", "{:.0f}"),
                               Col("speedup", "speedup", "{:.2f}x"), Col("labels equal", "labels_equal_to_1_worker")],
              as_json, "label workers", payload=result)


@app.command("reliability")
@command
def bench_reliability_cmd(
    service: bool = typer.Option(True, "--service/--no-service", help="Also send bad requests to the real app."),
    out_dir: Path = typer.Option(Path("docs/results"), "--out-dir"),
    as_json: bool = JsonOpt,
) -> None:
    """Every known bad input and fault, tried on the CLI, files, label store, instruments and service."""
    from stepsaver.bench.reliability import bench_reliability

    result = bench_reliability(out_dir=out_dir, service=service)
    emit_rows(result["rows"], [Col("area", "area"), Col("input", "input"), Col("outcome", "outcome"),
                               Col("as designed", "as_designed"), Col("detail", lambda r: r["detail"][:70])],
              as_json, "reliability", payload={k: result[k] for k in ("rows", "counts", "summary")},
              notes=[result["summary"]])



@app.command("calibrate")
@command
def bench_calibrate_cmd(
    model: list[str] = typer.Option(["tiny"], "--model", "-m", help="Models to calibrate (repeat)."),
    tolerance: list[str] = typer.Option(["lpips<=0.02", "lpips<=0.05"], "--tolerance", "-t",
                                        help="Tolerances (repeat)."),
    n: int = typer.Option(64, "--n", help="Held-out scene captions per run (75% calibrate, 25% validate)."),
    prompt_seed: int = typer.Option(11, "--prompt-seed"),
    work: Path = typer.Option(Path("runs/calibrate-bench"), "--work", help="Render caches (resumable)."),
    budget_minutes: float | None = typer.Option(None, "--budget-minutes"),
    out_dir: Path = typer.Option(Path("docs/results"), "--out-dir"),
    device: str = typer.Option("auto", "--device"),
    labels: list[str] = typer.Option([], "--labels",
                                     help="MODEL=PATH (repeat): label files/folders with several seeds per prompt "
                                          "(`label --seeds 3`) whose predictability that model's runs report, "
                                          "e.g. tiny=data/labels/tiny-train."),
    as_json: bool = JsonOpt,
) -> None:
    """Issue 20's targets: real calibrate runs per model and tolerance, held-out checks, Pareto plots."""
    from stepsaver.bench.calibrate import bench_calibrate
    from stepsaver.cli.render import log_to_stderr
    from stepsaver.predict.dataset import read_label_rows

    if n < 8:
        raise StepsaverError(f"--n must be at least 8 prompts, got {n}")
    label_rows: dict[str, list[dict]] = {}
    for item in labels:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise StepsaverError(f"--labels takes MODEL=PATH (e.g. tiny=data/labels/tiny-train), got {item!r}")
        label_rows.setdefault(name.strip(), []).extend(read_label_rows([path.strip()]))
    result = bench_calibrate(model, tolerance, n=n, prompt_seed=prompt_seed, work=work, budget_minutes=budget_minutes,
                             out_dir=out_dir, device=device, show_progress=not as_json, log=log_to_stderr(as_json),
                             labels=label_rows)
    rows = [dict(res.summary, run=run) for run, res in result["results"]]
    emit_rows(rows, [Col("run", "run"), Col("chosen", "chosen"), Col("held-out", "heldout_statistic", F3),
                     Col("holds", "heldout_holds_with_confidence"), Col("calls x", "speedup_calls", F2),
                     Col("vs best knob", "vs_best_single_knob", F2), Col("CPU min", "cpu_minutes", F2)],
              as_json, "calibrate", payload={"verdicts": result["verdicts"], "md": result["md"]},
              notes=result["verdicts"])


@app.command("optimize")
@command
def bench_optimize_cmd(
    model: list[str] = typer.Option(["tiny", "tiny-flux"], "--model", "-m",
                                    help="Models to benchmark (repeat): an embedded name or a pipeline folder."),
    levers: str = typer.Option("all", "--levers", "-l",
                               help="Comma list of levers (default all): channels_last, int8, int8_selective, bf16, "
                                    "compile, onnxruntime, openvino, optimum_intel. compile (Inductor) takes "
                                    "minutes per shape on 2 cores."),
    n: int = typer.Option(4, "--n", help="Calibration prompts of the quality check (training-scene captions)."),
    quality_steps: int = typer.Option(20, "--quality-steps", help="Steps of the quality check."),
    repeats: int = typer.Option(10, "--repeats", help="Timed denoiser calls per side (median)."),
    batch: str = typer.Option("1,8", "--batch", help="Batch sizes of the per-iteration timing, comma-separated."),
    steps: int = typer.Option(50, "--steps", help="Steps of the end-to-end image (the targets are at 50)."),
    e2e_n: int = typer.Option(2, "--e2e-n", help="Prompts rendered end to end."),
    e2e_repeats: int = typer.Option(3, "--e2e-repeats", help="Timed renders of each prompt per variant."),
    seed: int = typer.Option(0, "--seed", help="Prompt i is rendered with seed + i."),
    guidance: float = typer.Option(5.0, "--guidance", "-g"),
    price: float = typer.Option(0.10, "--price", help="Dollars per machine hour (default: a 2-vCPU cloud instance)."),
    power: float = typer.Option(65.0, "--power", help="Watts the machine draws while generating."),
    intensity: float = typer.Option(400.0, "--intensity", help="Grid carbon intensity, gCO2 per kWh."),
    out: Path = typer.Option(Path("docs/results"), "--out", "-o", help="Folder for optimize.json, .md and .png."),
    as_json: bool = JsonOpt,
) -> None:
    """Issue 21's optimize targets: each lever alone and combined, per iteration (batch 1 and 8) and end to end
    at 50 steps with and without Skip, with cost and CO2 per 10k images."""
    from stepsaver.bench.optimize import OptimizeBenchConfig, bench_optimize
    from stepsaver.cli.render import batch_sizes

    sizes = batch_sizes(batch)
    cfg = OptimizeBenchConfig(models=tuple(model), levers=levers, n=n, quality_steps=quality_steps, repeats=repeats,
                              batch_sizes=sizes, steps=steps, e2e_n=e2e_n, e2e_repeats=e2e_repeats, seed=seed,
                              guidance=guidance, price_per_hour=price, power_watts=power,
                              grid_g_co2_per_kwh=intensity)
    cfg.validate()  # every input is checked before a model loads
    result = bench_optimize(cfg, out_dir=out, progress=not as_json)
    speed = [Col(f"b{b} speedup", f"b{b}_speedup", "{:.2f}x") for b in sizes]
    ends = [f"{r['model']}: {r['variant']}: "
            + (f"{r['median_s']:.3f} s/image, {r['speedup']:.2f}x, ${r['usd_per_10k']:.3f} and "
               f"{r['g_co2_per_10k']:.0f} gCO2 per 10k images" if r.get("speedup") is not None
               else f"failed ({r.get('error')})") for r in result["end_to_end"]]
    verdicts = [t[k]["text"].replace("**", "") for t in result["targets"].values()
                for k in ("per_iteration", "end_to_end")]
    emit_rows(result["rows"], [Col("model", "model"), Col("lever", "lever"), Col("status", "status"),
                               Col("chosen", lambda r: "yes" if r["chosen"] else ""), *speed,
                               Col("PSNR min", "psnr_min", "{:.1f}"), Col("LPIPS max", "lpips_max", "{:.4f}")],
              as_json, f"bench optimize ({result['seconds'] / 60:.1f} min)",
              payload={k: result[k] for k in ("rows", "end_to_end", "targets", "seconds", "json", "md", "plot")},
              notes=[*ends, *verdicts, f"report: {result['md']}"])
