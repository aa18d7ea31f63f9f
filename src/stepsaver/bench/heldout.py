"""What several benchmarks share: the held-out scene prompts with their real renders, and a render set."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np


def render_set(pipe, prompts: Sequence[str], steps: int, batch: int, seed: int, guidance: float) -> np.ndarray:
    """uint8 renders of ``prompts``, every one from the noise of ``seed`` (``batch`` per call)."""
    from stepsaver.generation import generate_images

    results = generate_images(pipe, list(prompts), steps=steps, seeds=seed, guidance=guidance,
                              batch_size=batch, output_type="np")
    return (np.stack([r.image for r in results]) * 255).round().clip(0, 255).astype(np.uint8)


def heldout_set(n: int, scene_seed: int, split: str = "eval") -> tuple[list, list[str], np.ndarray, Any]:
    """The first ``n`` scenes of ``split`` (eval: held out): scenes, captions, real renders and their
    (cached) FID features. ``split="train"`` is for choosing a setting (a guidance scale) without
    looking at the held-out prompts the result is then reported on."""
    from stepsaver.measure.fid import features
    from stepsaver.scenes import SceneGenerator

    gen = SceneGenerator(seed=scene_seed, split=split)
    scenes = [gen.sample(i) for i in range(n)]
    real = np.stack([gen.render(s) for s in scenes])
    return scenes, [s.caption for s in scenes], real, features(real, cache=True)
