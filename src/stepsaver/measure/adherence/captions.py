"""Caption facts and the parser that reads them back from prompt text (scene vocabulary)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from stepsaver.errors import StepsaverError
from stepsaver.scenes import BACKGROUNDS, POSITIONS, SIZES, VOCABULARY, Scene

SHIPPED_DIR = Path(__file__).resolve().parent.parent.parent / "models" / "adherence"
WEIGHTS_FILE = "adherence.safetensors"
CONFIG_FILE = "config.json"
INPUT_SIZE = 64

OBJECT_NAMES: tuple[str, ...] = tuple(sorted(VOCABULARY))
BACKGROUND_NAMES: tuple[str, ...] = tuple(sorted(BACKGROUNDS))
POSITION_NAMES: tuple[str, ...] = tuple(POSITIONS)  # head class k+1 is POSITION_NAMES[k]; 0 = absent
OBJ_INDEX = {n: i for i, n in enumerate(OBJECT_NAMES)}
BG_INDEX = {n: i for i, n in enumerate(BACKGROUND_NAMES)}
POS_INDEX = {n: i for i, n in enumerate(POSITION_NAMES)}


# ---- facts and the caption parser --------------------------------------------------------------
@dataclass(frozen=True)
class ObjectFact:
    """One object a caption names; ``position``/``size`` are None when the caption leaves them unsaid."""

    name: str
    position: str | None = None
    size: str | None = None


@dataclass(frozen=True)
class CaptionFacts:
    """What a caption claims about its image: background colour (or None) and the objects."""

    background: str | None
    objects: tuple[ObjectFact, ...]

    @staticmethod
    def from_scene(scene: Scene) -> CaptionFacts:
        """The facts a scene's caption states (positions/sizes only where the caption says them)."""
        return CaptionFacts(
            scene.background,
            tuple(
                ObjectFact(o.name, o.position if o.position_stated else None, o.size if o.size_stated else None)
                for o in scene.objects
            ),
        )

    @property
    def n_facts(self) -> int:
        """Scored facts: background (if stated) + one presence per object + one per stated position."""
        return int(self.background is not None) + len(self.objects) + sum(o.position is not None for o in self.objects)


def _alternation(words) -> str:
    # longest first, so "fire truck" wins over "fire" and "teddy bear" over "bear"
    return "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))


_NAME_RE = re.compile(rf"\b({_alternation(OBJECT_NAMES)})\b")
_COLOUR_ALIASES = {"grey": "gray", "violet": "purple", "turquoise": "teal"}
_COLOUR_WORDS = {**{c: c for c in BACKGROUND_NAMES}, **_COLOUR_ALIASES}
_BG_RE = re.compile(rf"\b({_alternation(_COLOUR_WORDS)})\s+(?:background|backdrop)\b")
_BG_TAIL_RE = re.compile(rf"\bon\s+(?:an?\s+)?({_alternation(_COLOUR_WORDS)})\s*[.!]?\s*$")
# every phrasing scenes._POSITION_PHRASES uses, plus the obvious variants a person would write
_POS_RE = re.compile(
    r"\b(?:in|at|on|to)\s+the\s+(top[ -]left|top[ -]right|bottom[ -]left|bottom[ -]right|upper[ -]left|"
    r"upper[ -]right|lower[ -]left|lower[ -]right|top|bottom|left|right|center|centre|middle)\b(?:\s+corner)?"
)
_POS_ALIASES = {"centre": "center", "middle": "center", "upper": "top", "lower": "bottom"}
_SIZE_WORDS = {"small": "small", "little": "small", "tiny": "small", "large": "large", "big": "large",
               "huge": "large"}
_SIZE_RE = re.compile(rf"\b({_alternation(_SIZE_WORDS)})\s+$")
assert set(_SIZE_WORDS.values()) == set(SIZES)


def _position_of(phrase: str) -> str:
    words = [_POS_ALIASES.get(w, w) for w in re.split(r"[ -]", phrase)]
    return " ".join(words)


def parse_caption(caption: str) -> CaptionFacts:
    """Read a scene prompt back into facts: the inverse of ``SceneGenerator._caption``.

    Object names are found with word boundaries, longest name first; each object's position is the
    position phrase between its name and the next object's; its size is the size word just before
    it; the background is "<colour> background/backdrop" or a trailing "on <colour>". Lenient on
    purpose ("upper left", "centre", "grey"), since callers pass prompts written by people too.
    """
    if not isinstance(caption, str) or not caption.strip():
        raise StepsaverError("caption is empty; pass a scene prompt such as 'a cat on the left, blue background'")
    text = " ".join(caption.lower().split())
    matches = list(_NAME_RE.finditer(text))
    if not matches:
        raise StepsaverError(
            f"caption {caption!r} names none of the {len(OBJECT_NAMES)} scene objects; "
            "use names from stepsaver.scenes.VOCABULARY, e.g. 'a cat on the left, blue background'"
        )
    objects = []
    for k, m in enumerate(matches):
        end = matches[k + 1].start() if k + 1 < len(matches) else len(text)
        pos = _POS_RE.search(text, m.end(), end)
        size = _SIZE_RE.search(text[: m.start()])
        objects.append(ObjectFact(
            m.group(1),
            _position_of(pos.group(1)) if pos else None,
            _SIZE_WORDS[size.group(1)] if size else None,
        ))
    bg = _BG_RE.search(text) or _BG_TAIL_RE.search(text)
    background = _COLOUR_WORDS[bg.group(1)] if bg else None
    return CaptionFacts(background, tuple(objects))


def facts_of(item: Scene | CaptionFacts | str) -> CaptionFacts:
    if isinstance(item, CaptionFacts):
        return item
    if isinstance(item, Scene):
        return CaptionFacts.from_scene(item)
    if isinstance(item, str):
        return parse_caption(item)
    raise StepsaverError(f"cannot score against a {type(item).__name__}; pass caption strings or Scene objects")
