"""``stepsaver bench models``: is a new checkpoint of a scene model better than the old one?

Before a retrained embedded model replaces the shipped one, both generate the same held-out
scene prompts (eval split: compositions and a phrasing never trained on) from the same noise at
the same DDIM step counts. Each image set is scored by FID against the real scenes of those
captions and by the adherence detector, split into what a user sees: the right background, the
named objects present (separately for large and small objects, since small ones are where the
16x16 latent runs out of room), and in the stated place. The FID difference between the first
and the last model at the largest step count gets a bootstrap CI; a side-by-side grid shows
real | each model for the first prompts.
"""

from __future__ import annotations

from collections.abc import Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np

from stepsaver.errors import StepsaverError


def presence_by_size(predicted: Sequence[dict], scenes: Sequence[Any]) -> dict[str, float]:
    """Share of the scenes' large and small objects that the detector finds in the images."""
    hits = {"large": [0, 0], "small": [0, 0]}
    for pred, scene in zip(predicted, scenes, strict=True):
        for obj in scene.objects:
            hits[obj.size][0] += obj.name in pred["objects"]
            hits[obj.size][1] += 1
    return {size: (h / t if t else float("nan")) for size, (h, t) in hits.items()}


def bench_models(pipelines: dict[str, str], *, n: int = 300, grid: Sequence[int] = (30, 50), seed: int = 0,
                 scene_seed: int = 2, guidance: float | dict[str, float] = 5.0, batch: int = 32, n_grid: int = 12,
                 n_boot: int = 100, out_dir: str | Path = "docs/results", name: str = "models",
                 progress: bool = True, split: str = "eval") -> dict[str, Any]:
    """Generate, score and report every pipeline of ``{label: folder}`` (first = baseline).

    ``guidance`` is one scale for all, or ``{label: scale}`` (missing labels get 5.0): models of
    different families (a UNet with batched CFG, a flow transformer with true CFG) have different
    best scales, and comparing both at one model's best would handicap the other. ``split="train"``
    renders training-split captions instead of held-out ones: the set to choose such a scale on.
    """
    from stepsaver.bench.heldout import heldout_set, render_set
    from stepsaver.measure.adherence import AdherenceScorer
    from stepsaver.measure.fid import features, fid_from_features
    from stepsaver.measure.report import bootstrap_fid_difference, pyplot, save_plot, write_report
    from stepsaver.pipelines import load_pipeline
    from stepsaver.shrink.grid import save_grid

    if len(pipelines) < 2:
        raise StepsaverError("bench models compares checkpoints: pass at least two --pipeline LABEL=FOLDER")
    if n < 2:
        raise StepsaverError(f"--n must be >= 2 (FID needs a set), got {n}")
    scales = {label: float(guidance.get(label, 5.0) if isinstance(guidance, dict) else guidance)
              for label in pipelines}
    unknown = set(guidance) - set(pipelines) if isinstance(guidance, dict) else set()
    if unknown:
        raise StepsaverError(f"--guidance-for names {', '.join(sorted(unknown))}, which is not a --pipeline label "
                             f"({', '.join(pipelines)})")
    if split not in ("eval", "train"):
        raise StepsaverError(f"--split must be eval or train, got {split!r}")
    scenes, prompts, real, real_f = heldout_set(n, scene_seed, split)
    scorer = AdherenceScorer.load()
    rows, feats, shown = [], {}, {}
    for label, folder in pipelines.items():
        pipe = load_pipeline(folder, scheduler=None, device="auto")
        for steps in grid:
            images = render_set(pipe, prompts, steps, batch, seed, scales[label])
            feats[(label, steps)] = features(images)
            facts = scorer.score(images, scenes).summary()
            sizes = presence_by_size(scorer.predict(images), scenes)
            rows.append({"model": label, "steps": steps, "guidance": scales[label],
                         "fid": fid_from_features(real_f, feats[(label, steps)]),
                         "adherence": facts["adherence"], "background": facts["background"],
                         "presence": facts["presence"], "presence_large": sizes["large"],
                         "presence_small": sizes["small"], "position": facts["position"]})
            if steps == max(grid):
                shown[label] = images[:n_grid]
            if progress:
                print(f"{label} {steps} steps: FID {rows[-1]['fid']:.2f} adherence {facts['adherence']:.3f}",
                      flush=True)
    labels = list(pipelines)
    top = max(grid)
    ci = bootstrap_fid_difference(real_f, feats[(labels[-1], top)], feats[(labels[0], top)], n_boot=n_boot)
    # With three or more checkpoints, each one is also compared with the one before it, so a
    # chain of changes (v1 -> longer run -> new decoder) shows what each change bought.
    chain = [] if len(labels) < 3 else [
        {"a": b, "b": a, **bootstrap_fid_difference(real_f, feats[(b, top)], feats[(a, top)], n_boot=n_boot)}
        for a, b in pairwise(labels)]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    side = np.concatenate([real[:n_grid]] + [shown[k] for k in labels], axis=2)
    grid_png = save_grid(out / f"{name}-grid.png", side, prompts[:n_grid], cols=3)
    plt = pyplot()
    keys = ("adherence", "background", "presence_large", "presence_small", "position")
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    width = 0.8 / len(labels)
    for i, label in enumerate(labels):
        mine = [r for r in rows if r["model"] == label]
        ax[0].plot([r["steps"] for r in mine], [r["fid"] for r in mine], "o-", label=label)
        at_top = next(r for r in mine if r["steps"] == top)
        ax[1].bar(np.arange(len(keys)) + i * width, [at_top[k] for k in keys], width, label=label)
    ax[0].set_xlabel("steps (each model's own scheduler)")
    ax[0].set_ylabel("FID vs real scenes")
    ax[1].set_xticks(np.arange(len(keys)) + width * (len(labels) - 1) / 2, keys, fontsize=7)
    ax[1].set_ylabel(f"share of facts shown @ {top} steps")
    ax[1].set_ylim(0, 1)
    for a in ax:
        a.legend(fontsize=8)
        a.grid(alpha=0.3)
    plot = save_plot(fig, out / f"{name}.png")
    shown_g = ", ".join(f"{k} {v:g}" for k, v in scales.items())
    summary = (f"{n} {'held-out prompts (eval' if split == 'eval' else 'training prompts (train'} split, "
               f"seed {scene_seed}), noise seed {seed}, guidance {shown_g}, "
               f"each model's own scheduler. FID({labels[-1]}) - FID({labels[0]}) at {top} steps = "
               f"{ci['fid_diff']:+.2f} "
               f"[{ci['ci_low']:+.2f}, {ci['ci_high']:+.2f}] (bootstrap 95%). presence_large/small: share of "
               "the caption's large/small objects the detector finds anywhere in the image."
               + "".join(f" FID({c['a']}) - FID({c['b']}) = {c['fid_diff']:+.2f} [{c['ci_low']:+.2f}, "
                         f"{c['ci_high']:+.2f}]." for c in chain) + "\n\n"
               f"![real | {' | '.join(labels)}]({grid_png.name})")
    paths = write_report(name, rows, title=f"Checkpoints compared: {' vs '.join(labels)}", summary=summary,
                         plots=[plot], out_dir=out, extra={"pipelines": pipelines, "bootstrap": ci,
                                                                          "bootstrap_chain": chain})
    return {"rows": rows, "bootstrap": ci, "bootstrap_chain": chain, "summary": summary, "grid": str(grid_png),
            **{k: str(v) for k, v in paths.items()}}


def parse_pipelines(items: Sequence[str]) -> dict[str, str]:
    """``["v1=runs/a", "v2=runs/b"]`` -> ``{"v1": "runs/a", "v2": "runs/b"}`` (the first is the baseline)."""
    pipes = {}
    for item in items:
        label, sep, folder = item.partition("=")
        if not sep or not label or not folder:
            raise StepsaverError(f"--pipeline {item!r}: write LABEL=FOLDER, e.g. --pipeline v1=runs/deci/pipeline")
        pipes[label] = folder
    return pipes

