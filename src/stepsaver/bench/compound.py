"""``stepsaver bench compound``: Predict and Skip together vs each alone vs fixed 50 vs iso-cost.

On held-out scene prompts, batch 1, the same seed per prompt: fixed 50 DDIM steps; Predict
alone (the recommender's step count); Skip alone (50 steps with the AdaptiveDiffusion hook);
Predict + Skip (the compound default, ``generate --steps auto --skip``); and iso-cost fixed (plain
fewer steps spending the compound's mean denoiser calls). Columns: denoiser calls, median
seconds, FID vs the real scenes, adherence, and PSNR/LPIPS against the fixed-50 image of the
same prompt and seed. Target: >= 4x fewer calls than fixed 50 with FID no worse (bootstrap CI)
and better FID than iso-cost fixed.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepsaver.errors import StepsaverError
from stepsaver.skip.config import AdaptiveSkipConfig

TARGET_CALL_RATIO = 4.0


def bench_compound(n: int = 200, *, recommender: str = "tiny", confidence: float | None = None,
                   threshold: float | None = None,
                   max_skips: int | None = None, scene_seed: int = 3, guidance: float = 5.0,
                   out_dir: str | Path = "docs/results", name: str = "compound", progress: bool = True,
                   n_boot: int = 400) -> dict[str, Any]:
    from stepsaver.measure.report import bootstrap_fid_difference, pyplot, save_plot, write_report

    plt = pyplot()

    from stepsaver.generation import generate
    from stepsaver.measure.adherence import AdherenceScorer
    from stepsaver.measure.fid import features, fid_from_features
    from stepsaver.measure.lpips import lpips_distance
    from stepsaver.measure.quality import psnr, to_float_nchw
    from stepsaver.pipelines import load_pipeline
    from stepsaver.predict.recommender import StepRecommender
    from stepsaver.scenes import SceneGenerator
    from stepsaver.skip import disable_adaptive_skip, enable_adaptive_skip

    if n < 2:
        raise StepsaverError(f"--n must be >= 2, got {n}")
    gen = SceneGenerator(seed=scene_seed, split="eval")
    scenes = [gen.sample(i) for i in range(n)]
    prompts = [s.caption for s in scenes]
    real = np.stack([gen.render(s) for s in scenes])
    pipe = load_pipeline("tiny", scheduler="ddim")
    pipe.set_progress_bar_config(disable=True)
    rec = StepRecommender.load(recommender)
    rec_steps = [r.steps for r in rec.recommend(prompts, confidence=confidence)]
    skip_cfg = AdaptiveSkipConfig(threshold=threshold, max_skips=max_skips)
    generate(pipe, prompts[0], steps=5)  # warm-up

    def run(label: str, steps_of, skip: bool) -> dict[str, Any]:
        if skip:
            enable_adaptive_skip(pipe, skip_cfg)
        images, calls, secs, steps = [], [], [], []
        try:
            for i, p in enumerate(prompts):
                s = steps_of(i)
                r = generate(pipe, p, steps=s, seed=i, guidance=guidance)
                images.append(np.asarray(r.images[0]))
                calls.append(r.denoiser_calls)
                secs.append(r.seconds)
                steps.append(s)
        finally:
            if skip:
                disable_adaptive_skip(pipe)
        if progress:
            print(f"{label}: mean calls {np.mean(calls):.1f}, median {np.median(secs):.3f} s", flush=True)
        return {"label": label, "images": np.stack(images), "calls": np.array(calls), "seconds": np.array(secs),
                "steps": np.array(steps)}

    runs = [run("fixed 50", lambda i: 50, False), run("Predict alone", lambda i: rec_steps[i], False),
            run("Skip alone (50 steps)", lambda i: 50, True), run("Predict + Skip", lambda i: rec_steps[i], True)]
    iso = max(1, int(round(runs[3]["calls"].mean())))
    runs.append(run(f"iso-cost fixed {iso}", lambda i: iso, False))
    real_f = features(real, cache=True)
    ref = runs[0]["images"]
    ref_t = to_float_nchw(ref) * 2 - 1
    scorer = AdherenceScorer.load()
    feats, rows = {}, []
    for r in runs:
        f = features(r["images"])
        feats[r["label"]] = f
        x = to_float_nchw(r["images"]) * 2 - 1
        rows.append({"method": r["label"], "mean_steps": float(r["steps"].mean()),
                     "denoiser_calls": float(r["calls"].mean()),
                     "calls_ratio_vs_fixed50": float(runs[0]["calls"].mean() / r["calls"].mean()),
                     "median_s": float(np.median(r["seconds"])),
                     "speedup_vs_fixed50": float(np.median(runs[0]["seconds"]) / np.median(r["seconds"])),
                     "fid": fid_from_features(real_f, f),
                     "adherence": float(scorer.score(r["images"], prompts).adherence.mean()),
                     "psnr_vs_fixed50": float(psnr(r["images"], ref).clamp(max=100).mean()),
                     "lpips_vs_fixed50": float(torch.cat([lpips_distance(x[i:i + 32], ref_t[i:i + 32])
                                                          for i in range(0, len(x), 32)]).mean())})
    comp, fixed, iso_row = rows[3], rows[0], rows[4]
    # every method renders the same prompts with the same seeds: resample prompts (paired)
    ci50 = bootstrap_fid_difference(real_f, feats["Predict + Skip"], feats["fixed 50"], n_boot=n_boot, paired=True)
    ci_iso = bootstrap_fid_difference(real_f, feats["Predict + Skip"], feats[iso_row["method"]], n_boot=n_boot,
                                      paired=True)
    t_calls = comp["calls_ratio_vs_fixed50"] >= TARGET_CALL_RATIO
    t_fid = ci50["ci_low"] <= 0
    t_iso = ci_iso["ci_high"] < 0  # better = the whole CI below 0, not a lower point estimate
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for r in rows:
        ax.plot(r["denoiser_calls"], r["fid"], "o", ms=8, label=r["method"])
    ax.set_xlabel("mean denoiser calls per image")
    ax.set_ylabel("FID vs real scenes")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    plot = save_plot(fig, out / f"{name}.png")
    summary = (
        f"{n} held-out scene prompts (eval split, seed {scene_seed}), batch 1, DDIM, seed = prompt index, guidance "
        f"{guidance}; recommender `{recommender}` (confidence {confidence}); Skip {skip_cfg.rule} rule, threshold "
        f"{skip_cfg.threshold:g}, C_max {skip_cfg.max_skips}, reuse {skip_cfg.reuse}.\n\n"
        f"- >= {TARGET_CALL_RATIO:.0f}x fewer denoiser calls than fixed 50: **{'met' if t_calls else 'NOT met'}** "
        f"({comp['calls_ratio_vs_fixed50']:.2f}x: {comp['denoiser_calls']:.1f} vs {fixed['denoiser_calls']:.1f}).\n"
        f"- FID no worse than fixed 50 (bootstrap 95% CI of the difference): **{'met' if t_fid else 'NOT met'}** "
        f"({ci50['fid_diff']:+.2f} [{ci50['ci_low']:+.2f}, {ci50['ci_high']:+.2f}]).\n"
        f"- Better FID than iso-cost fixed {iso}: **{'met' if t_iso else 'NOT met'}** ({comp['fid']:.2f} vs "
        f"{iso_row['fid']:.2f}; difference CI [{ci_iso['ci_low']:+.2f}, {ci_iso['ci_high']:+.2f}]). CIs: paired "
        f"bootstrap over prompts, {n_boot} replicates.")
    paths = write_report(name, rows, title="Compound default: Predict + Skip", summary=summary, plots=[plot],
                         out_dir=out, extra={"targets": {"calls": t_calls, "fid_no_worse": t_fid, "beats_iso": t_iso},
                                             "bootstrap_vs_fixed50": ci50, "bootstrap_vs_iso": ci_iso})
    return {"rows": rows, "summary": summary, **{k: str(v) for k, v in paths.items()}}
