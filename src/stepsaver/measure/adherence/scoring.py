"""Scoring images against captions with the shipped classifier, and a pipeline's adherence between anchors."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from stepsaver.errors import StepsaverError
from stepsaver.measure.adherence.captions import (
    BACKGROUND_NAMES,
    CONFIG_FILE,
    INPUT_SIZE,
    OBJ_INDEX,
    OBJECT_NAMES,
    POS_INDEX,
    POSITION_NAMES,
    SHIPPED_DIR,
    WEIGHTS_FILE,
    CaptionFacts,
    facts_of,
)
from stepsaver.measure.adherence.network import AdherenceNet, as_batch
from stepsaver.scenes import Scene, SceneGenerator


# ---- scoring -----------------------------------------------------------------------------------
@dataclass
class AdherenceResult:
    """Per-image adherence and its parts; ``nan`` where an image's caption states no such fact.

    ``background``, ``presence`` and ``position`` are per-image fractions of facts of that type
    shown; ``correct``/``facts`` are per-image counts per fact type, so :meth:`summary` can pool
    them (a 4-object caption weighs four times a 1-object one, as in GenEval's per-fact tallies).
    """

    adherence: np.ndarray
    background: np.ndarray
    presence: np.ndarray
    position: np.ndarray
    correct: dict[str, np.ndarray] = field(repr=False)
    facts: dict[str, np.ndarray] = field(repr=False)

    def summary(self) -> dict[str, float]:
        """Mean adherence over images and pooled accuracy per fact type and over all facts."""
        out = {"images": int(len(self.adherence)), "adherence": float(np.mean(self.adherence))}
        for kind in ("background", "presence", "position"):
            n = int(self.facts[kind].sum())
            out[kind] = float(self.correct[kind].sum() / n) if n else float("nan")
            out[f"{kind}_facts"] = n
        total = sum(int(self.facts[k].sum()) for k in self.facts)
        out["overall"] = float(sum(int(self.correct[k].sum()) for k in self.correct) / max(total, 1))
        return out


class AdherenceScorer:
    """The trained scene reader, with the adherence score on top.

    ``AdherenceScorer.load()`` reads the shipped fp16 weights; ``score(images, captions)`` is
    the metric; ``predict(images)`` says what the classifier sees, for debugging a low score.
    """

    def __init__(self, net: AdherenceNet, config: dict | None = None, device: str | torch.device = "cpu") -> None:
        self.net = net.to(device).eval()
        self.config = config or {}
        self.device = torch.device(device)

    # -- persistence
    @classmethod
    def load(cls, path: str | Path | None = None, device: str | torch.device = "cpu") -> AdherenceScorer:
        """Load weights saved by :meth:`save` (default: the ones shipped in ``stepsaver/models/adherence``)."""
        from safetensors.torch import load_file

        folder = Path(path) if path is not None else SHIPPED_DIR
        if not (folder / WEIGHTS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
            raise StepsaverError(
                f"no adherence classifier at {folder}; train one with "
                "`python -m stepsaver.measure.adherence --out DIR` or omit the path for the shipped one"
            )
        config = json.loads((folder / CONFIG_FILE).read_text())
        if (tuple(config["objects"]) != OBJECT_NAMES or tuple(config["backgrounds"]) != BACKGROUND_NAMES
                or tuple(config["positions"]) != POSITION_NAMES):
            raise StepsaverError(
                f"adherence classifier at {folder} was trained on a different scene vocabulary; "
                "retrain it with `python -m stepsaver.measure.adherence`"
            )
        net = AdherenceNet(config["widths"])
        state = {k: v.float() if v.is_floating_point() else v for k, v in load_file(folder / WEIGHTS_FILE).items()}
        net.load_state_dict(state)
        return cls(net, config, device)

    def save(self, path: str | Path, extra: dict | None = None) -> Path:
        """Write fp16 safetensors + ``config.json`` (vocabulary order, widths, and ``extra`` notes)."""
        from safetensors.torch import save_file

        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        state = {k: (v.half() if v.is_floating_point() else v).contiguous().cpu()
                 for k, v in self.net.state_dict().items()}
        save_file(state, folder / WEIGHTS_FILE)
        vocabulary = {"widths": list(self.net.widths), "input_size": INPUT_SIZE, "objects": list(OBJECT_NAMES),
                      "backgrounds": list(BACKGROUND_NAMES), "positions": list(POSITION_NAMES)}
        config = {**vocabulary, **{k: v for k, v in self.config.items() if k not in vocabulary}, **(extra or {})}
        (folder / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
        self.config = config
        return folder

    # -- reading images
    @torch.no_grad()
    def classify(self, images, batch: int = 256) -> tuple[np.ndarray, np.ndarray]:
        """Arg-max classes: background index (N,) and per-object class (N, 107) with 0 = absent."""
        x = as_batch(images)
        bgs, objs = [], []
        for b0 in range(0, len(x), batch):
            bg, obj = self.net(x[b0:b0 + batch].to(self.device))
            bgs.append(bg.argmax(1).cpu())
            objs.append(obj.argmax(2).cpu())
        if not bgs:
            raise StepsaverError("no images to score; pass at least one image")
        return torch.cat(bgs).numpy(), torch.cat(objs).numpy()

    def predict(self, images) -> list[dict]:
        """What each image shows: ``{"background": name, "objects": {name: position}}``."""
        bg, obj = self.classify(images)
        return [{"background": BACKGROUND_NAMES[b],
                 "objects": {OBJECT_NAMES[j]: POSITION_NAMES[c - 1] for j, c in enumerate(row) if c}}
                for b, row in zip(bg, obj, strict=True)]

    def score(self, images, scenes_or_captions: Sequence[Scene | CaptionFacts | str] | Scene | str) -> AdherenceResult:
        """Per-image fraction of the caption's facts the image shows (one caption may serve all images)."""
        if isinstance(scenes_or_captions, str | Scene | CaptionFacts):
            facts = [facts_of(scenes_or_captions)]
        else:
            facts = [facts_of(c) for c in scenes_or_captions]
        bg, obj = self.classify(images)
        if len(facts) == 1 and len(bg) > 1:
            facts = facts * len(bg)
        if len(facts) != len(bg):
            raise StepsaverError(f"got {len(bg)} images but {len(facts)} captions; pass one caption per image")
        return score_predictions(bg, obj, facts)


def score_predictions(bg: np.ndarray, obj: np.ndarray, facts: Sequence[CaptionFacts]) -> AdherenceResult:
    n = len(facts)
    kinds = ("background", "presence", "position")
    correct = {k: np.zeros(n, dtype=np.int64) for k in kinds}
    total = {k: np.zeros(n, dtype=np.int64) for k in kinds}
    for i, f in enumerate(facts):
        if f.background is not None:
            total["background"][i] = 1
            correct["background"][i] = int(BACKGROUND_NAMES[bg[i]] == f.background)
        for o in f.objects:
            seen = int(obj[i, OBJ_INDEX[o.name]])
            total["presence"][i] += 1
            correct["presence"][i] += seen != 0
            if o.position is not None:
                total["position"][i] += 1
                correct["position"][i] += seen == 1 + POS_INDEX[o.position]
    all_facts = sum(total.values())
    with np.errstate(invalid="ignore", divide="ignore"):
        parts = {k: np.where(total[k] > 0, correct[k] / np.maximum(total[k], 1), np.nan) for k in kinds}
    return AdherenceResult(sum(correct.values()) / np.maximum(all_facts, 1), parts["background"],
                           parts["presence"], parts["position"], correct, total)


def pipeline_adherence(pipe, n: int = 32, steps: int = 30, seed: int = 0, guidance: float = 5.0,
                       scene_seed: int = 0, scorer: AdherenceScorer | None = None) -> dict[str, dict]:
    """Adherence of a pipeline's images for the first ``n`` held-out prompts, between two anchors.

    A score means something only between its ceiling and its floor, so beside ``generated`` this
    reports the real scenes of the same prompts (``real``, ~1) and both image sets scored against
    the captions shifted by one (``*_mismatched``: what an image that ignores its prompt gets).
    Each prompt is generated alone with ``stepsaver.generate`` (seed ``seed``), as callers do.
    """
    from stepsaver.generation import generate

    scorer = scorer or AdherenceScorer.load()
    gen = SceneGenerator(seed=scene_seed, split="eval")
    scenes = [gen.sample(i) for i in range(n)]
    captions = [s.caption for s in scenes]
    shifted = captions[1:] + captions[:1]
    real = np.stack([gen.render(s) for s in scenes])
    made = [generate(pipe, c, steps=steps, seed=seed, guidance=guidance).images[0] for c in captions]
    return {"real": scorer.score(real, captions).summary(), "generated": scorer.score(made, captions).summary(),
            "real_mismatched": scorer.score(real, shifted).summary(),
            "generated_mismatched": scorer.score(made, shifted).summary(),
            "settings": {"n": n, "steps": steps, "seed": seed, "guidance": guidance, "scene_seed": scene_seed,
                         "split": "eval"}}
