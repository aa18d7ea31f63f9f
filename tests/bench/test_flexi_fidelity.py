"""bench flexi's fidelity view ("Predict's honest view"): the pure functions on images with known answers,
(the toy-size run of the command that checks the second table, the JSON key and the plot is
tests/predict/test_predict.py's bench flexi test, which shares its labelling with the FID report's checks)."""


import numpy as np
import pytest

from stepsaver.bench.flexi import (
    VISIBLY_DIFFERENT_SSIM,
    fidelity_rows,
    fidelity_scores,
    iso_cost_verdict,
    verdict_line,
)
from stepsaver.errors import StepsaverError

P, SIDE = 4, 48  # LPIPS-alex needs images of 31 pixels and more


def _scene(p: int) -> np.ndarray:
    """A smooth image with a bright square whose place depends on the prompt: structure SSIM can see."""
    y, x = np.mgrid[0:SIDE, 0:SIDE]
    img = np.stack([x * 4, y * 4, (x + y) * 2], -1).astype(np.float64)
    img[8 + 4 * p:24 + 4 * p, 10:26] = [250, 240, 30]
    return img.clip(0, 255).astype(np.uint8)


@pytest.fixture(scope="module")
def renders() -> dict[int, np.ndarray]:
    """50 steps is the reference; 30 steps is identical to it; 10 steps is heavily noised."""
    ref = np.stack([_scene(p) for p in range(P)])
    noise = np.random.default_rng(0).normal(0, 80, ref.shape)
    return {10: (ref + noise).clip(0, 255).astype(np.uint8), 30: ref.copy(), 50: ref}


@pytest.fixture(scope="module")
def scores(renders):
    return fidelity_scores(renders)


def test_identical_renders_score_ssim_1_lpips_0_and_none_visibly_different(renders, scores):
    rows = fidelity_rows(renders, {"fixed 30": [30] * P, "fixed 50": [50] * P}, 50, scores=scores)
    for r in rows:
        assert r["ssim_to_ref"] == pytest.approx(1.0, abs=1e-9)
        assert r["lpips_to_ref"] == pytest.approx(0.0, abs=1e-6)
        assert r["share_visibly_different"] == 0.0 and r["prompts"] == P
    assert [r["mean_steps"] for r in rows] == [30.0, 50.0]
    # the default reference is the largest step count, and the scores computed inside agree
    assert fidelity_rows(renders, {"fixed 30": [30] * P})[0]["ssim_to_ref"] == pytest.approx(1.0, abs=1e-9)


def test_a_noisy_render_scores_lower_and_counts_as_visibly_different(renders, scores):
    assert (scores[10]["ssim"] < VISIBLY_DIFFERENT_SSIM).all() and (scores[10]["lpips"] > 0.05).all()
    rows = {r["method"]: r for r in fidelity_rows(renders, {"fixed 10": [10] * P, "mixed": [10, 50, 50, 50]},
                                                  scores=scores)}
    noisy, mixed = rows["fixed 10"], rows["mixed"]
    assert noisy["ssim_to_ref"] < VISIBLY_DIFFERENT_SSIM and noisy["share_visibly_different"] == 1.0
    # one prompt of four took the noisy render: a quarter of the prompts, a quarter of its SSIM loss
    assert mixed["mean_steps"] == 40.0 and mixed["share_visibly_different"] == 0.25
    assert mixed["ssim_to_ref"] == pytest.approx((scores[10]["ssim"][0] + 3) / 4)
    assert mixed["lpips_to_ref"] == pytest.approx(scores[10]["lpips"][0] / 4)
    # a stricter or looser threshold moves the share, not the means
    loose = fidelity_rows(renders, {"fixed 10": [10] * P}, scores=scores, threshold=0.01)[0]
    assert loose["share_visibly_different"] == 0.0 and loose["ssim_to_ref"] == noisy["ssim_to_ref"]


def test_bad_inputs_are_one_line_errors(renders, scores):
    with pytest.raises(StepsaverError, match="uint8"):
        fidelity_scores({10: renders[10].astype(np.float32), 50: renders[50]})
    with pytest.raises(StepsaverError, match="one image per prompt"):
        fidelity_scores({10: renders[10][:2], 50: renders[50]})
    with pytest.raises(StepsaverError, match="reference 100 steps has no renders"):
        fidelity_scores(renders, 100)
    with pytest.raises(StepsaverError, match="none"):
        fidelity_scores({})
    with pytest.raises(StepsaverError, match=r"chose \[20\] steps, not rendered"):
        fidelity_rows(renders, {"odd": [20, 10, 10, 10]}, scores=scores)
    with pytest.raises(StepsaverError, match="for 3 prompts, the renders hold 4"):
        fidelity_rows(renders, {"short": [10, 10, 10]}, scores=scores)
    with pytest.raises(StepsaverError, match="at least one method"):
        fidelity_rows(renders, {}, scores=scores)
    with pytest.raises(StepsaverError, match="threshold"):
        fidelity_rows(renders, {"fixed 10": [10] * P}, scores=scores, threshold=1.5)
    with pytest.raises(StepsaverError, match="no scores for uniform"):
        iso_cost_verdict(scores, [10] * P, uniform_steps=[10, 20])


def _synthetic_scores(n: int = 20) -> dict[int, dict[str, np.ndarray]]:
    """Half the prompts are easy (10 steps already match the reference), half hard (10 steps fall short)."""
    easy = np.arange(n) < n // 2
    s10 = np.where(easy, 1.0, 0.6)
    return {10: {"ssim": s10, "lpips": 1 - s10}, 20: {"ssim": (s10 + 1) / 2, "lpips": (1 - s10) / 2},
            30: {"ssim": np.ones(n), "lpips": np.zeros(n)}}


def test_iso_cost_verdict_compares_with_uniform_interpolated_at_the_same_mean_steps():
    sc = _synthetic_scores()
    easy = np.arange(20) < 10
    # the oracle: 10 steps where they suffice, 30 where they don't -> mean 20, every render converged
    good = iso_cost_verdict(sc, np.where(easy, 10, 30), uniform_steps=[10, 30], n_boot=200)
    assert good["mean_steps"] == 20 and good["uniform_between"] == [10, 30] and good["weight_of_upper"] == 0.5
    assert good["ssim"] == 1.0 and good["uniform_ssim"] == pytest.approx(0.9)
    assert good["ssim_diff"] == pytest.approx(0.1)
    assert good["ssim_ci_low"] > 0 and good["verdict"] == "better" and good["lpips_verdict"] == "better"
    assert good["share_visibly_different"] == 0.0 and good["uniform_share_visibly_different"] == pytest.approx(0.25)
    assert "**better than uniform at the same cost**" in verdict_line("oracle", good)
    # the anti-oracle at the same cost: worse, with the whole CI below 0
    bad = iso_cost_verdict(sc, np.where(easy, 30, 10), uniform_steps=[10, 30], n_boot=200)
    assert bad["ssim_diff"] == pytest.approx(-0.1) and bad["ssim_ci_high"] < 0 and bad["verdict"] == "worse"
    # uniform itself sits on the curve: no difference, whatever the sample
    same = iso_cost_verdict(sc, [20] * 20, n_boot=200)
    assert same["ssim_diff"] == pytest.approx(0.0) and same["verdict"] == "no difference"
    assert "no difference this sample can detect" in verdict_line("fixed 20", same)
    # between two grid points: linear in steps; the nearest grid point is reported beside it
    mid = iso_cost_verdict(sc, [20] * 10 + [30] * 10, n_boot=200)
    assert mid["mean_steps"] == 25 and mid["uniform_between"] == [20, 30]
    assert mid["uniform_ssim"] == pytest.approx((sc[20]["ssim"].mean() + 1) / 2)
    assert mid["nearest_uniform"]["steps"] == 30 and mid["nearest_uniform"]["ssim"] == 1.0
    assert not mid["clamped"]
    # beyond the uniform range the end of the curve is used, and the verdict says so
    out = iso_cost_verdict(sc, [30] * 20, uniform_steps=[10, 20], n_boot=200)
    assert out["clamped"] and out["uniform_between"] == [20, 20] and "clamped to 20" in verdict_line("x", out)
