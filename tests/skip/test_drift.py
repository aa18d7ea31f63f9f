"""Skip's drift rule: reuse while the measured error of reusing, extrapolated from computed steps, stays small.

The families are the matrix's tiny random pipelines (tests/skip/test_matrix.py); the rule's arithmetic is
replayed from the report on the embedded model, so a change of the estimator fails here.
"""

import pytest
import torch

from stepsaver import StepsaverError
from stepsaver.calls import count_denoiser_calls
from stepsaver.skip import AdaptiveSkipConfig, CriterionPolicy, disable_adaptive_skip, enable_adaptive_skip, skip_report
from stepsaver.skip.criterion import consecutive_skips
from tests.skip.test_matrix import FAMILIES, _hooked, _pipe, bits, generate, network_runs, reference

DRIFT_FAMILIES = ["sd15", "flux_true_cfg", "dit", "t2v_2_frames", "ddim", "pixart_alpha", "sd15_euler_a"]
ALWAYS = AdaptiveSkipConfig(rule="drift", threshold=1e6, max_skips=2)  # skip whenever an estimate exists


@pytest.fixture
def drift_family(request):
    name = request.param
    pipe = _pipe(name)
    assert not _hooked(pipe)
    yield name
    disable_adaptive_skip(pipe)


cells = pytest.mark.parametrize("drift_family", DRIFT_FAMILIES, indirect=True)


@cells
def test_drift_at_threshold_zero_is_bit_identical(drift_family):
    pipe = _pipe(drift_family)
    ref = reference(drift_family)
    enable_adaptive_skip(pipe, AdaptiveSkipConfig(rule="drift", threshold=0.0))
    same = generate(drift_family)
    report = skip_report(pipe)
    assert bits(same) == bits(ref) and report.calls_saved == 0 and report.rule == "drift"
    assert "calls saved 0 because threshold" in report.why_no_savings()


@cells
def test_drift_skips_counts_what_ran_and_batches_like_singles(drift_family):
    fam, pipe = FAMILIES[drift_family], _pipe(drift_family)
    reference(drift_family)
    enable_adaptive_skip(pipe, ALWAYS)
    with count_denoiser_calls(pipe) as calls, network_runs(pipe) as runs:
        generate(drift_family)
    report = skip_report(pipe)
    assert report.calls_saved > 0 and report.skipped_steps()[0] >= report.warmup
    assert calls[0] == report.pipeline_calls and runs[0] == report.denoiser_calls
    # the reuse error is measured at every computed step that had a cache, never at a skipped one
    assert len(report.drift) == report.steps
    for step, (row, ran) in enumerate(zip(report.drift, report.computed, strict=True)):
        assert (row[0] is None) == (step == 0 or not ran[0]), f"step {step}: {row[0]} (ran {ran[0]})"
    assert all(e > 0 for row in report.drift for e in row if e is not None)
    if not fam.per_sample:
        return
    batch = generate(drift_family, seeds=(0, 1))
    both = skip_report(pipe)
    for i in (0, 1):
        alone = generate(drift_family, seeds=(i,))
        assert both.path(i) == skip_report(pipe).path(0)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-4, atol=1e-4)


def replay(errors: list[float | None], path: list[bool], threshold: float, max_skips: int, warmup: int) -> list[bool]:
    """The documented rule, from the measured errors: rate = error / gap at a computed step; skip step m while
    rate * (m - last call) <= threshold and C_max allows."""
    decided, last, rate = [False], 0, None
    for j in range(len(path) - 1):  # after step j, decide step j + 1
        if not path[j] and j > 0:
            if errors[j] is not None:
                rate = errors[j] / (j - last)
            last = j
        estimate = None if rate is None else rate * (j + 1 - last)
        decided.append(len(decided) >= warmup and consecutive_skips(decided) < max_skips
                       and estimate is not None and estimate <= threshold)
    return decided


def test_the_drift_rule_is_the_documented_estimator(embedded_pipe):
    from stepsaver.generation import generate_images

    prompts = ["a cat, blue background", "two dogs and a tree, red background"]
    enable_adaptive_skip(embedded_pipe, AdaptiveSkipConfig(rule="drift", threshold=1e6, max_skips=1))
    try:
        generate_images(embedded_pipe, prompts[:1], steps=16, seeds=[0], output_type="latent")
        probe = skip_report(embedded_pipe)
    finally:
        disable_adaptive_skip(embedded_pipe)
    rates = sorted(e for row in probe.drift for e in row if e is not None)
    threshold = rates[len(rates) // 2] * 2  # a value some steps pass and some do not
    config = AdaptiveSkipConfig(rule="drift", threshold=threshold, max_skips=3)
    enable_adaptive_skip(embedded_pipe, config)
    try:
        results = generate_images(embedded_pipe, prompts, steps=16, seeds=[0, 1], output_type="latent")
        report = skip_report(embedded_pipe)
    finally:
        disable_adaptive_skip(embedded_pipe)
    assert report.calls_saved > 0
    for i in range(2):
        path = report.path(i)
        errors = [row[i] for row in report.drift]
        assert path == replay(errors, path, threshold, 3, config.warmup), f"sample {i}"
        assert results[i].denoiser_calls == report.calls_of(i)
    assert CriterionPolicy(config).decide([[1.0]] * 4, [None] * 5, 1, drift=[None]) == [False]  # nothing measured
    with pytest.raises(StepsaverError, match="drop compat=True"):
        AdaptiveSkipConfig(rule="drift", compat=True)
