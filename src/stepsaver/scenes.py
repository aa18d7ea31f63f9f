"""Captioned emoji scenes: the training and evaluation data of the embedded model.

Real photographs and a model hub are out of reach here, so the embedded model learns a small,
fully-controlled world instead: 64x64 scenes with 1-4 colour emoji (from Debian's
``fonts-noto-color-emoji``) on a named background colour, each with an English caption and the
layout it was drawn from. The layout travels with the image because the adherence metric (Measure)
scores an image against exactly those facts.

Everything is a pure function of ``(seed, split, index)``: scene ``i`` is the same on every
machine and in every process, so data sets never need to be shipped, only regenerated.
Held-out compositions (object sets, and single object/background pairs) and one held-out
phrasing are never drawn for ``split="train"``, so evaluation prompts are compositions the
model has not seen.
"""

from __future__ import annotations

import json
import os
import unicodedata
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Literal

import numpy as np
from PIL import Image, ImageDraw, ImageFont

from stepsaver.errors import StepsaverError

__all__ = [
    "BACKGROUNDS",
    "POSITIONS",
    "SIZES",
    "VOCABULARY",
    "SceneObject",
    "Scene",
    "SceneGenerator",
    "find_emoji_font",
]

IMAGE_SIZE = 64
Split = Literal["train", "eval"]

DEFAULT_FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
    "/usr/local/share/fonts/NotoColorEmoji.ttf",
)

# ~100 visually distinct emoji. Names come from unicodedata and are cleaned to plain English;
# the overrides fix names that are poor captions ("AUTOMOBILE", "BLACK SUN WITH RAYS") or that
# collide with a colour word ("TANGERINE" stays, "RED APPLE" becomes "apple").
_EMOJI = (
    "🐱🐶🐰🦊🐻🐼🦁🐮🐷🐸🐔🐧🐦🦆🦉🐴🦄🐝🦋🐌🐢🐍🐙🦀🐠🐬🐳🦈🐘🦒🦓"
    "🍎🍌🍇🍉🍓🍒🍍🥝🍋🍊🥕🌽🥦🍄🍞🧀🍔🍕🌭🍟🍩🎂🍦🍭🥚🍆🥑"
    "🚗🚌🚒🚜🚲🏍✈🚀🚁⛵🚂🛸"
    "☀🌙⭐☁⚡❄☔🌈🔥💧🌵🌲🌻🌹🍁🌷"
    "⚽🏀🎈🎁🔑🔔📚✏⏰💡🎸🎩👑💎🏠⛄🎃🔨🧲📷🧸"
)
_NAME_OVERRIDES = {
    "RED APPLE": "apple",
    "AUTOMOBILE": "car",
    "KIWIFRUIT": "kiwi",
    "EAR OF MAIZE": "corn",
    "CHEESE WEDGE": "cheese",
    "SLICE OF PIZZA": "pizza",
    "SOFT ICE CREAM": "ice cream",
    "AUBERGINE": "eggplant",
    "RACING MOTORCYCLE": "motorcycle",
    "STEAM LOCOMOTIVE": "train",
    "BLACK SUN WITH RAYS": "sun",
    "CRESCENT MOON": "moon",
    "WHITE MEDIUM STAR": "star",
    "HIGH VOLTAGE SIGN": "lightning bolt",
    "UMBRELLA WITH RAIN DROPS": "umbrella",
    "SPOUTING WHALE": "whale",
    "TROPICAL FISH": "fish",
    "HONEYBEE": "bee",
    "EVERGREEN TREE": "pine tree",
    "BASKETBALL AND HOOP": "basketball",
    "WRAPPED PRESENT": "gift",
    "ELECTRIC LIGHT BULB": "light bulb",
    "GEM STONE": "diamond",
    "HOUSE BUILDING": "house",
    "SNOWMAN WITHOUT SNOW": "snowman",
    "JACK-O-LANTERN": "pumpkin",
    "FIRE ENGINE": "fire truck",
}


def _clean_name(ch: str) -> str:
    raw = unicodedata.name(ch)
    if raw in _NAME_OVERRIDES:
        return _NAME_OVERRIDES[raw]
    name = raw.lower()
    for suffix in (" face",):
        name = name.removesuffix(suffix)
    return name


VOCABULARY: dict[str, str] = {_clean_name(ch): ch for ch in _EMOJI}
"""Object name -> emoji character."""

BACKGROUNDS: dict[str, tuple[int, int, int]] = {
    "red": (215, 45, 45),
    "green": (60, 165, 70),
    "blue": (45, 85, 205),
    "yellow": (240, 210, 55),
    "orange": (245, 135, 35),
    "purple": (135, 65, 175),
    "pink": (245, 150, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "brown": (125, 80, 45),
    "teal": (35, 170, 165),
}

# position -> centre of its cell in a 3x3 grid (fractions of the image side)
POSITIONS: dict[str, tuple[float, float]] = {
    "top left": (0.22, 0.22),
    "top": (0.5, 0.22),
    "top right": (0.78, 0.22),
    "left": (0.22, 0.5),
    "center": (0.5, 0.5),
    "right": (0.78, 0.5),
    "bottom left": (0.22, 0.78),
    "bottom": (0.5, 0.78),
    "bottom right": (0.78, 0.78),
}
_POSITION_PHRASES = {
    "top left": ["in the top left corner", "at the top left"],
    "top": ["at the top"],
    "top right": ["in the top right corner", "at the top right"],
    "left": ["on the left"],
    "center": ["in the center", "in the middle"],
    "right": ["on the right"],
    "bottom left": ["in the bottom left corner", "at the bottom left"],
    "bottom": ["at the bottom"],
    "bottom right": ["in the bottom right corner", "at the bottom right"],
}
# size -> side of the emoji box as a fraction of the image side
SIZES: dict[str, float] = {"small": 0.30, "large": 0.52}
_SIZE_WORDS = {"small": ["small", "little"], "large": ["large", "big"]}

# {objs} is the object list, {bg} the background colour. Template 3 is never used for training.
TEMPLATES = (
    "{objs} on {a_bg} background",
    "{objs}, {bg} background",
    "{a_bg} background with {objs}",
    "{objs} against {a_bg} backdrop",
    "an emoji picture of {objs} on {bg}",
)
HELD_OUT_TEMPLATES = frozenset({3})
_OBJECT_COUNT_P = (0.45, 0.30, 0.15, 0.10)  # P(1..4 objects): simple scenes dominate
HOLDOUT_EVERY = 10  # about 1 in 10 compositions is held out of training


@dataclass(frozen=True)
class SceneObject:
    """One emoji in a scene, with the facts the caption states about it."""

    name: str
    size: str
    position: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels
    size_stated: bool = True
    position_stated: bool = True


@dataclass(frozen=True)
class Scene:
    """A captioned scene: everything needed to redraw it and to score an image against it."""

    index: int
    split: str
    background: str
    objects: tuple[SceneObject, ...]
    caption: str
    template: int
    seed: int = 0
    extra: dict = field(default_factory=dict)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @staticmethod
    def from_json(line: str) -> Scene:
        d = json.loads(line)
        d["objects"] = tuple(
            SceneObject(**{**o, "box": tuple(o["box"])}) for o in d["objects"]
        )
        return Scene(**d)


def find_emoji_font(path: str | os.PathLike | None = None) -> Path:
    """Return the colour emoji font, or raise a one-line error saying how to install it."""
    candidates = [path] if path else [os.environ.get("STEPSAVER_EMOJI_FONT"), *DEFAULT_FONT_PATHS]
    for c in candidates:
        if c and Path(c).is_file():
            return Path(c)
    where = path or ", ".join(DEFAULT_FONT_PATHS)
    raise StepsaverError(
        f"colour emoji font not found at {where}; install it with "
        "`apt-get install fonts-noto-color-emoji` or pass --font / set STEPSAVER_EMOJI_FONT"
    )


@lru_cache(maxsize=4)
def _emoji_sprites(font_path: str, side: int) -> dict[str, Image.Image]:
    """Render every vocabulary emoji once, cropped and resized to ``side`` pixels (RGBA)."""
    try:
        font = ImageFont.truetype(font_path, 109)  # Noto Color Emoji is a 109 px bitmap font
    except OSError as exc:
        raise StepsaverError(
            f"cannot read emoji font {font_path} ({exc}); reinstall fonts-noto-color-emoji"
        ) from None
    sprites = {}
    for name, ch in VOCABULARY.items():
        im = Image.new("RGBA", (160, 160), (0, 0, 0, 0))
        ImageDraw.Draw(im).text((8, 8), ch, font=font, embedded_color=True)
        bbox = im.getbbox()
        if bbox is None:
            raise StepsaverError(f"font {font_path} has no glyph for {name!r}; use Noto Color Emoji")
        im = im.crop(bbox)
        scale = side / max(im.size)
        size = (max(1, round(im.size[0] * scale)), max(1, round(im.size[1] * scale)))
        sprites[name] = im.resize(size, Image.LANCZOS)
    return sprites


def _stable_hash(*parts: object) -> int:
    return zlib.crc32("|".join(map(str, parts)).encode())


def is_held_out(object_names: tuple[str, ...], background: str) -> bool:
    """Whether a composition belongs to the evaluation side of the split.

    Single objects hold out (object, background) pairs; multi-object scenes hold out the set
    of objects, whatever the background, so evaluation shows object pairings never trained on.
    """
    if len(object_names) == 1:
        key = ("single", object_names[0], background)
    else:
        key = ("set", *sorted(object_names))
    return _stable_hash(*key) % HOLDOUT_EVERY == 0


_PLURALS = frozenset({"grapes", "cherries", "french fries", "books"})


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


class SceneGenerator:
    """Deterministic scene sampler and renderer.

    ``SceneGenerator(seed=0, split="train")[i]`` is scene ``i`` of that split; ``render`` draws
    it. Rendering is a few sprite pastes (sprites are rendered once per size), so 100k scenes
    take about a minute.
    """

    def __init__(
        self,
        seed: int = 0,
        split: Split = "train",
        font: str | os.PathLike | None = None,
        image_size: int = IMAGE_SIZE,
    ) -> None:
        if split not in ("train", "eval"):
            raise StepsaverError(f"unknown split {split!r}; use 'train' or 'eval'")
        self.seed = seed
        self.split = split
        self.font_path = str(find_emoji_font(font))
        self.image_size = image_size
        self._names = sorted(VOCABULARY)
        self._bgs = sorted(BACKGROUNDS)

    # ---- sampling -------------------------------------------------------------------------
    def sample(self, index: int) -> Scene:
        """Draw scene ``index`` of this split (metadata and caption only, no pixels)."""
        rng = np.random.default_rng([self.seed, 0 if self.split == "train" else 1, index])
        want_held_out = self.split == "eval"
        for _ in range(1000):
            n = int(rng.choice(4, p=_OBJECT_COUNT_P)) + 1
            names = tuple(rng.choice(self._names, size=n, replace=False).tolist())
            bg = str(rng.choice(self._bgs))
            if is_held_out(names, bg) == want_held_out:
                break
        else:  # pragma: no cover - 1000 misses at p=0.1 cannot happen
            raise RuntimeError("could not draw a scene of the requested split")
        positions = rng.choice(list(POSITIONS), size=n, replace=False).tolist()
        if n == 1:
            sizes = [str(rng.choice(list(SIZES)))]
        else:  # crowded scenes: large objects would cover their neighbours
            sizes = [str(rng.choice(list(SIZES), p=(0.7, 0.3) if n == 2 else (1.0, 0.0))) for _ in names]
        allowed = [t for t in range(len(TEMPLATES)) if self.split == "eval" or t not in HELD_OUT_TEMPLATES]
        template = int(rng.choice(allowed))
        objects = []
        s = self.image_size
        for name, pos, size in zip(names, positions, sizes, strict=True):
            side = round(SIZES[size] * s)
            cx, cy = POSITIONS[pos]
            jx, jy = rng.integers(-2, 3, size=2)
            x0 = int(np.clip(round(cx * s - side / 2) + jx, 0, s - side))
            y0 = int(np.clip(round(cy * s - side / 2) + jy, 0, s - side))
            # a lone object's position is sometimes left unsaid; in crowds it is always stated
            pos_stated = n > 1 or rng.random() < 0.75
            size_stated = rng.random() < (0.7 if n == 1 else 0.35)
            objects.append(
                SceneObject(name, size, pos, (x0, y0, x0 + side, y0 + side), size_stated, pos_stated)
            )
        caption = self._caption(objects, bg, template, rng)
        return Scene(index, self.split, bg, tuple(objects), caption, template, self.seed)

    @staticmethod
    def _caption(objects: list[SceneObject], bg: str, template: int, rng: np.random.Generator) -> str:
        phrases = []
        for o in objects:
            words = []
            if o.size_stated:
                words.append(str(rng.choice(_SIZE_WORDS[o.size])))
            words.append(o.name)
            phrase = " ".join(words)
            if o.name not in _PLURALS:
                phrase = f"{_article(phrase)} {phrase}"
            if o.position_stated:
                phrase += " " + str(rng.choice(_POSITION_PHRASES[o.position]))
            phrases.append(phrase)
        objs = phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]
        return TEMPLATES[template].format(objs=objs, bg=bg, a_bg=f"{_article(bg)} {bg}")

    # ---- rendering ------------------------------------------------------------------------
    def render(self, scene: Scene) -> np.ndarray:
        """Draw a scene as a ``(H, W, 3) uint8`` array."""
        s = self.image_size
        canvas = Image.new("RGBA", (s, s), BACKGROUNDS[scene.background] + (255,))
        for o in scene.objects:
            side = o.box[2] - o.box[0]
            sprite = _emoji_sprites(self.font_path, side)[o.name]
            ox = o.box[0] + (side - sprite.size[0]) // 2
            oy = o.box[1] + (side - sprite.size[1]) // 2
            canvas.alpha_composite(sprite, (ox, oy))
        return np.asarray(canvas.convert("RGB"))

    def __getitem__(self, index: int) -> tuple[np.ndarray, Scene]:
        scene = self.sample(index)
        return self.render(scene), scene

    def iter_batches(self, start: int, stop: int, batch: int = 1024) -> Iterator[tuple[np.ndarray, list[Scene]]]:
        """Yield ``(images[N,H,W,3] uint8, scenes)`` for indices ``start..stop``."""
        for b0 in range(start, stop, batch):
            scenes = [self.sample(i) for i in range(b0, min(stop, b0 + batch))]
            yield np.stack([self.render(sc) for sc in scenes]), scenes


def write_scene_set(path: str | os.PathLike, n: int, seed: int = 0, split: Split = "train",
                    font: str | None = None, progress: bool = True) -> Path:
    """Render ``n`` scenes to ``path`` (``images.npy`` uint8 + ``scenes.jsonl``).

    Resumable in the sense that matters: scenes are a pure function of their index, so a
    killed run is simply re-run; an existing complete set is reused.
    """
    from rich.progress import Progress

    out = Path(path)
    out.mkdir(parents=True, exist_ok=True)
    meta = out / "meta.json"
    want = {"n": n, "seed": seed, "split": split, "image_size": IMAGE_SIZE}
    if meta.exists() and json.loads(meta.read_text()) == want:
        return out
    gen = SceneGenerator(seed=seed, split=split, font=font)
    images = np.lib.format.open_memmap(out / "images.npy", mode="w+", dtype=np.uint8,
                                       shape=(n, IMAGE_SIZE, IMAGE_SIZE, 3))
    with open(out / "scenes.jsonl", "w") as fh, Progress(disable=not progress) as bar:
        task = bar.add_task(f"rendering {split} scenes", total=n)
        for b0 in range(0, n, 2048):
            ims, scenes = next(gen.iter_batches(b0, min(n, b0 + 2048), batch=2048))
            images[b0:b0 + len(ims)] = ims
            fh.writelines(sc.to_json() + "\n" for sc in scenes)
            bar.advance(task, len(ims))
    images.flush()
    meta.write_text(json.dumps(want))
    return out


def load_scene_set(path: str | os.PathLike) -> tuple[np.ndarray, list[Scene]]:
    """Load a set written by :func:`write_scene_set` (images are memory-mapped)."""
    p = Path(path)
    if not (p / "meta.json").exists():
        raise StepsaverError(f"no complete scene set at {p}; create it with `stepsaver scenes {p}`")
    images = np.load(p / "images.npy", mmap_mode="r")
    with open(p / "scenes.jsonl") as fh:
        scenes = [Scene.from_json(line) for line in fh]
    return images, scenes
