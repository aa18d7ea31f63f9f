"""Prompt adherence: the shipped classifier reads held-out real scenes, and the score can fail.

Scenes here use seeds that neither training (seed 7, train split) nor the accuracy stored with the
weights (seed 12345) used, so these are fresh held-out compositions and phrasings.
"""

import numpy as np
import pytest
import torch

from stepsaver.errors import StepsaverError
from stepsaver.measure.adherence import (
    AdherenceScorer,
    CaptionFacts,
    ObjectFact,
    parse_caption,
    train_adherence,
)
from stepsaver.scenes import HELD_OUT_TEMPLATES, SceneGenerator


@pytest.fixture(scope="module")
def scorer():
    return AdherenceScorer.load()


@pytest.fixture(scope="module")
def eval_set():
    gen = SceneGenerator(seed=2024, split="eval")
    scenes = [gen.sample(i) for i in range(200)]
    return np.stack([gen.render(s) for s in scenes]), scenes


def test_shipped_classifier_reads_held_out_real_scenes(scorer, eval_set):
    images, scenes = eval_set
    s = scorer.score(images, scenes).summary()
    for kind in ("background", "presence", "position", "overall"):
        assert s[kind] >= 0.95, (kind, s)
    assert s["adherence"] >= 0.95
    assert scorer.config["eval_real"]["overall"] >= 0.95  # the number the docs quote travels with the weights


def test_shipped_classifier_reads_scenes_decoded_by_the_embedded_vae(scorer, eval_set):
    # every generated image leaves through this decoder; clean-render training read only ~62% of
    # the objects in such round trips, the shipped (fine-tuned) classifier ~93%
    from diffusers import AutoencoderKL

    from stepsaver.measure.adherence import vae_round_trip
    from stepsaver.pipelines import EMBEDDED_DIR

    images, scenes = eval_set
    vae = AutoencoderKL.from_pretrained(EMBEDDED_DIR / "vae", torch_dtype=torch.float32).eval()
    x = torch.from_numpy(images[:64]).permute(0, 3, 1, 2).float() / 255
    s = scorer.score(vae_round_trip(vae, x, sample=False), scenes[:64]).summary()
    assert s["background"] >= 0.95 and s["overall"] >= 0.85, s


def test_mismatched_captions_score_much_lower(scorer, eval_set):
    images, scenes = eval_set
    captions = [s.caption for s in scenes]
    right = scorer.score(images, captions)
    wrong = scorer.score(images, captions[1:] + captions[:1])
    assert wrong.adherence.mean() < 0.35 < 0.95 < right.adherence.mean()
    assert (right.adherence > wrong.adherence).mean() > 0.9


def test_text_and_scene_captions_score_the_same(scorer, eval_set):
    images, scenes = eval_set
    a = scorer.score(images[:32], scenes[:32])
    b = scorer.score(images[:32], [s.caption for s in scenes[:32]])
    np.testing.assert_array_equal(a.adherence, b.adherence)
    one = scorer.score(images[:3], scenes[0].caption)  # one caption serves every image
    assert one.adherence.shape == (3,)


def test_predict_names_what_the_scene_holds(scorer, eval_set):
    images, scenes = eval_set
    seen = scorer.predict(images[:20])
    hits = sum(p["background"] == s.background and p["objects"] == {o.name: o.position for o in s.objects}
               for p, s in zip(seen, scenes[:20], strict=True))
    assert hits >= 17


def test_blank_background_shows_no_objects(scorer):
    blank = np.zeros((1, 64, 64, 3), np.uint8) + np.array([45, 85, 205], np.uint8)
    r = scorer.score(blank, "a cat on the left and a dog on the right, blue background")
    assert r.background[0] == 1.0 and r.presence[0] == 0.0 and r.position[0] == 0.0
    assert r.adherence[0] == pytest.approx(1 / 5)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_parser_inverts_generated_captions(split):
    gen = SceneGenerator(seed=11, split=split)
    scenes = [gen.sample(i) for i in range(1500)]
    for s in scenes:
        assert parse_caption(s.caption) == CaptionFacts.from_scene(s), s.caption
    templates = {s.template for s in scenes}
    assert (templates & HELD_OUT_TEMPLATES) if split == "eval" else not (templates & HELD_OUT_TEMPLATES)


def test_parser_reads_prompts_people_write():
    f = parse_caption("A Top Hat at the top, a teddy bear in the upper-left corner and a big fire truck "
                      "in the centre on a grey backdrop")
    assert f == CaptionFacts("gray", (ObjectFact("top hat", "top"), ObjectFact("teddy bear", "top left"),
                                      ObjectFact("fire truck", "center", "large")))
    assert f.n_facts == 7
    assert parse_caption("a sunflower and a pineapple").background is None  # not 'sun' nor 'pine tree'
    assert [o.name for o in parse_caption("a sunflower and a pineapple").objects] == ["sunflower", "pineapple"]


def test_user_errors_are_one_line(scorer):
    img = np.zeros((1, 64, 64, 3), np.uint8)
    with pytest.raises(StepsaverError, match="names none of the") as err:
        scorer.score(img, "a spaceship on a blue background")
    assert "\n" not in str(err.value)
    with pytest.raises(StepsaverError, match="caption is empty"):
        parse_caption("  ")
    for bad in (np.zeros((1, 64, 64, 4), np.uint8), np.zeros((1, 64, 48, 3), np.uint8), np.zeros((64,), np.uint8)):
        with pytest.raises(StepsaverError, match="shape|images must be"):
            scorer.score(bad, "a cat")
    with pytest.raises(StepsaverError, match="one caption per image"):
        scorer.score(np.zeros((3, 64, 64, 3), np.uint8), ["a cat", "a dog"])
    with pytest.raises(StepsaverError, match="no adherence classifier"):
        AdherenceScorer.load("/nonexistent/adherence")


def test_other_square_sizes_are_read_at_64(scorer, eval_set):
    images, scenes = eval_set
    big = np.repeat(np.repeat(images[:16], 2, axis=1), 2, axis=2)  # 128x128
    assert scorer.score(big, scenes[:16]).summary()["overall"] >= 0.9


def test_training_runs_and_round_trips_through_fp16(tmp_path):
    scorer, history = train_adherence(steps=3, batch=8, widths=(8, 8, 16), log=None, log_every=1)
    assert len(history) == 3 and np.isfinite(history[-1]["loss"])
    scorer.save(tmp_path / "adh")
    again = AdherenceScorer.load(tmp_path / "adh")
    x = torch.rand(4, 3, 64, 64)
    with torch.no_grad():
        (bg_a, obj_a), (bg_b, obj_b) = scorer.net(x), again.net(x)
    torch.testing.assert_close(bg_a, bg_b, atol=0.05, rtol=0.05)  # fp16 storage, fp32 compute
    torch.testing.assert_close(obj_a, obj_b, atol=0.05, rtol=0.05)
