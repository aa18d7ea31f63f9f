"""Emoji scene data: determinism, layout metadata, held-out compositions, errors."""

import time

import numpy as np
import pytest

from stepsaver.errors import StepsaverError
from stepsaver.scenes import (
    BACKGROUNDS,
    HELD_OUT_TEMPLATES,
    POSITIONS,
    VOCABULARY,
    SceneGenerator,
    find_emoji_font,
    is_held_out,
    load_scene_set,
    write_scene_set,
)


def test_vocabulary_is_about_one_hundred_plain_english_names():
    assert 90 <= len(VOCABULARY) <= 130
    for name in VOCABULARY:
        assert name == name.lower() and name.replace(" ", "").replace("-", "").isalpha(), name
        assert name not in BACKGROUNDS  # no object is called like a colour


def test_scenes_are_deterministic_by_seed_and_index():
    a, b = SceneGenerator(seed=3), SceneGenerator(seed=3)
    for i in (0, 7, 123):
        im1, s1 = a[i]
        im2, s2 = b[i]
        assert s1 == s2
        assert np.array_equal(im1, im2)
    assert SceneGenerator(seed=4).sample(0) != a.sample(0)


def test_caption_states_the_layout_and_image_shows_the_background():
    gen = SceneGenerator(seed=0)
    for i in range(200):
        img, sc = gen[i]
        assert img.shape == (64, 64, 3) and img.dtype == np.uint8
        assert 1 <= len(sc.objects) <= 4
        assert sc.background in sc.caption
        positions = [o.position for o in sc.objects]
        assert len(set(positions)) == len(positions)
        for o in sc.objects:
            assert o.name in sc.caption
            assert o.position in POSITIONS
            x0, y0, x1, y1 = o.box
            assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
        # a corner pixel not covered by any object has the background colour
        covered = np.zeros((64, 64), bool)
        for o in sc.objects:
            covered[o.box[1]:o.box[3], o.box[0]:o.box[2]] = True
        ys, xs = np.nonzero(~covered)
        if len(ys):
            assert tuple(img[ys[0], xs[0]]) == BACKGROUNDS[sc.background]


def test_held_out_compositions_and_phrasings_never_reach_training():
    train, ev = SceneGenerator(seed=0, split="train"), SceneGenerator(seed=0, split="eval")
    for i in range(500):
        s = train.sample(i)
        assert not is_held_out(tuple(o.name for o in s.objects), s.background)
        assert s.template not in HELD_OUT_TEMPLATES
        e = ev.sample(i)
        assert is_held_out(tuple(o.name for o in e.objects), e.background)
    assert any(ev.sample(i).template in HELD_OUT_TEMPLATES for i in range(100))


def test_rendering_is_fast_enough_for_100k_scenes_in_minutes():
    gen = SceneGenerator(seed=1)
    gen[0]  # sprite cache
    t0 = time.perf_counter()
    for images, _ in gen.iter_batches(0, 1000, batch=500):
        assert images.shape == (500, 64, 64, 3)
    per_scene = (time.perf_counter() - t0) / 1000
    assert per_scene * 100_000 < 300, f"{per_scene * 1e3:.2f} ms/scene"


def test_missing_font_is_a_clear_error(tmp_path):
    with pytest.raises(StepsaverError, match="fonts-noto-color-emoji"):
        find_emoji_font(tmp_path / "nope.ttf")
    with pytest.raises(StepsaverError, match="fonts-noto-color-emoji"):
        SceneGenerator(font=str(tmp_path / "nope.ttf"))


def test_scene_set_roundtrip(tmp_path):
    out = write_scene_set(tmp_path / "set", 50, seed=2, split="eval", progress=False)
    images, scenes = load_scene_set(out)
    gen = SceneGenerator(seed=2, split="eval")
    assert images.shape == (50, 64, 64, 3)
    assert scenes[10] == gen.sample(10)
    assert np.array_equal(images[10], gen.render(scenes[10]))
    with pytest.raises(StepsaverError, match="no complete scene set"):
        load_scene_set(tmp_path / "missing")
