"""Skip oracle: the forced-path hook, the greedy search on the embedded model, and the agreement statistics."""

import math

import pytest
import torch

from stepsaver import StepsaverError, load_pipeline
from stepsaver.skip import (
    AdaptiveSkipConfig,
    disable_adaptive_skip,
    enable_adaptive_skip,
    forced_skips,
    greedy_oracle,
    path_agreement,
    position_agreement,
    relative_l2,
    run_skip_path,
    skip_position_chi2,
)
from stepsaver.skip.hook import HOOK_NAME

T, F = True, False
PROMPT = "a small cat on the left, yellow background"
STEPS = 10




@pytest.fixture
def pipe(embedded_pipe):
    yield embedded_pipe
    disable_adaptive_skip(embedded_pipe)
    embedded_pipe.__dict__.pop("adaptive_skip_report", None)


def plain_latent(pipe, steps=STEPS, seed=0):
    with torch.inference_mode():
        return pipe(PROMPT, num_inference_steps=steps, guidance_scale=5.0, output_type="latent",
                    generator=torch.Generator("cpu").manual_seed(seed)).images


# --- the forced path --------------------------------------------------------------------------------

def test_forced_path_without_skips_is_the_plain_pipeline_and_detaches(pipe):
    ref = plain_latent(pipe)
    assert torch.equal(run_skip_path(pipe, PROMPT, [], steps=STEPS), ref)
    assert "forward" not in pipe.unet.__dict__ and HOOK_NAME not in pipe.unet._diffusers_hook.hooks
    assert "step" not in pipe.scheduler.__dict__
    assert torch.equal(plain_latent(pipe), ref)


def test_forced_skips_reuse_the_previous_output_on_exactly_those_steps(pipe):
    with forced_skips(pipe) as hook:
        hook.plan([5, 6, 8])
        skipped = plain_latent(pipe)
        report = pipe.adaptive_skip_report
        assert report.skipped_steps() == [5, 6, 8]
        assert hook.network_runs == report.denoiser_calls == STEPS - 3
        assert [step for step, _, _ in hook.record] == [0, 1, 2, 3, 4, 7, 9]
    assert not torch.equal(skipped, plain_latent(pipe))
    with pytest.raises(StepsaverError, match="steps >= 1"), forced_skips(pipe) as hook:
        hook.plan([0])


def test_replayed_prefix_is_exact(pipe):
    """Answering steps < j from a recorded run gives the very same latent as running them."""
    with forced_skips(pipe) as hook:
        hook.plan([4])
        plain_latent(pipe)
        record = hook.record
        hook.plan([4, 7], replay=record, replay_before=7)
        replayed = plain_latent(pipe)
        assert hook.network_runs == STEPS - 7 - 1  # only steps 8, 9 ran the network
    assert torch.equal(replayed, run_skip_path(pipe, PROMPT, [4, 7], steps=STEPS))


def test_oracle_refuses_a_pipeline_with_skip_enabled_and_bad_settings(pipe):
    enable_adaptive_skip(pipe)
    with pytest.raises(StepsaverError, match="adaptive skip is enabled"):
        greedy_oracle(pipe, PROMPT, steps=6)
    disable_adaptive_skip(pipe)
    for kwargs, match in (({"tolerance": -1.0}, "tolerance must be a number >= 0"),
                          ({"tolerance": None}, "estimator"), ({"max_skips": -1}, "max_skips"),
                          ({"first": 0}, "first must be a step >= 1")):
        with pytest.raises(StepsaverError, match=match) as info:
            greedy_oracle(pipe, PROMPT, steps=6, **kwargs)
        assert "\n" not in str(info.value)
    assert "forward" not in pipe.unet.__dict__


# --- the greedy search ----------------------------------------------------------------------------

def test_tolerance_zero_keeps_only_exact_skips(pipe):
    result = greedy_oracle(pipe, PROMPT, steps=STEPS, tolerance=0.0)
    assert all(result.errors[s] == 0.0 for s in result.skipped_steps)
    assert result.final_error == 0.0
    assert result.trials == sum(e is not None for e in result.errors)
    if not result.skipped_steps:  # the usual case: no skip leaves the final latent bit for bit unchanged
        assert result.trials == STEPS - 4
    assert [e is None for e in result.errors[:4]] == [True] * 4


@pytest.mark.parametrize("max_skips,expected", [
    (2, [F, F, F, F, T, T, F, T, T, F]),
    (4, [F, F, F, F, T, T, T, T, F, T]),
    (0, [F] * STEPS),
])
def test_huge_tolerance_skips_as_much_as_max_skips_allows(pipe, max_skips, expected):
    result = greedy_oracle(pipe, PROMPT, steps=STEPS, tolerance=1e9, max_skips=max_skips)
    assert result.path == expected
    tried = [s for s in range(STEPS) if result.errors[s] is not None]
    assert result.trials == len(tried)
    # replay: the reference run, then each trial j only runs steps j+1.. (all computed)
    assert result.network_runs == STEPS + sum(STEPS - j - 1 for j in tried)
    # the recorded final error is the one of the accepted path, run from scratch
    ref = plain_latent(pipe)
    assert result.final_error == relative_l2(run_skip_path(pipe, PROMPT, result.skipped_steps, steps=STEPS), ref)


def test_oracle_with_the_estimator_budget_and_first_step(pipe):
    config = AdaptiveSkipConfig(threshold=0.05, rule="criterion")
    result = greedy_oracle(pipe, PROMPT, steps=12, tolerance=None, estimator=config, first=6)
    assert result.tolerance == result.estimator_error > 0
    assert result.final_error <= result.tolerance
    assert not any(result.path[:6])
    enable_adaptive_skip(pipe, config)
    plain_latent(pipe, steps=12)
    assert result.estimator_path == pipe.adaptive_skip_report.path()
    disable_adaptive_skip(pipe)
    assert result.agreement() == path_agreement(result.path, result.estimator_path, 6)
    summary = result.to_dict()
    assert summary["skipped_steps"] == result.skipped_steps and summary["estimator_config"]["threshold"] == 0.05


def test_oracle_on_a_tiny_random_sd15_pipeline(tiny_folders):
    p = load_pipeline(tiny_folders["sd15"], scheduler="euler", device="cpu")
    result = greedy_oracle(p, "a red cat", steps=8, tolerance=1e9, max_skips=2, height=32, width=32)
    assert result.path == [F, F, F, F, T, T, F, T]


# --- agreement statistics (pure) ---------------------------------------------------------------------

def test_path_agreement_by_hand():
    a = [F, F, F, F, T, T, F, T]
    b = [F, F, F, F, T, F, F, F]
    assert path_agreement(a, b) == 2 / 4
    assert path_agreement(a, a) == 1.0
    assert path_agreement(a, b, start=0) == 6 / 8
    with pytest.raises(ValueError, match="differ in length"):
        path_agreement(a, b[:-1])


def test_position_agreement_and_confusion_by_hand():
    oracle = [[F, F, T, T], [F, T, T, F]]
    estimator = [[F, F, T, F], [F, F, T, T]]
    out = position_agreement(oracle, estimator, start=1)
    assert out["per_position"] == [0.5, 1.0, 0.0]  # step 1: 1 of 2 agree; step 2: both; step 3: neither
    assert out["confusion"] == {"both_skip": 2, "only_a": 2, "only_b": 1, "both_compute": 1}
    assert out["overall"] == 3 / 6


def test_chi_squared_over_skip_positions_by_hand():
    # counts per position 4..6: a = [3, 1, 0], b = [1, 1, 2] (4 skips each)
    a = [[F] * 4 + [T, F, F], [F] * 4 + [T, T, F], [F] * 4 + [T, F, F]]
    b = [[F] * 4 + [T, F, T], [F] * 4 + [F, T, F], [F] * 4 + [F, F, T]]
    out = skip_position_chi2(a, b)
    assert out["counts_a"] == [3, 1, 0] and out["counts_b"] == [1, 1, 2] and out["positions"] == [4, 5, 6]
    # expected counts are column total / 2 each: (3-2)^2/2 * 2 + 0 + (0-1)^2/1 * 2 = 1 + 2 = 3
    assert out["statistic"] == pytest.approx(3.0) and out["dof"] == 2 and out["min_expected"] == 1.0
    assert out["p_value"] == pytest.approx(math.exp(-1.5))  # chi2 sf with 2 dof is exp(-x/2)
    same = skip_position_chi2(a, a)
    assert same["statistic"] == pytest.approx(0.0) and same["p_value"] == pytest.approx(1.0)


def test_chi_squared_degenerate_tables():
    none = [[F] * 6]
    one = [[F] * 4 + [T, F]]
    assert skip_position_chi2(none, none)["p_value"] == 1.0
    lopsided = skip_position_chi2(one, none)
    assert math.isnan(lopsided["p_value"]) and "one side" in lopsided["reason"]
    single = skip_position_chi2(one, one)
    assert single["p_value"] == 1.0 and single["statistic"] == 0.0
    with pytest.raises(ValueError, match="same positive number"):
        skip_position_chi2(one, [])
    with pytest.raises(ValueError, match="same number of steps"):
        skip_position_chi2(one, [[F] * 5])


def test_relative_l2():
    x = torch.tensor([3.0, 4.0])
    assert relative_l2(x, x) == 0.0
    assert relative_l2(torch.zeros(2), x) == 1.0
    assert relative_l2(x, torch.zeros(2)) == math.inf
    with pytest.raises(StepsaverError, match="differ in shape"):
        relative_l2(x, torch.zeros(3))
