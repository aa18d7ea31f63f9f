"""Skip's config is frozen and hashable (it keys batches and caches); the decision rule is a policy object."""

import dataclasses

import pytest
import torch

from stepsaver import StepsaverError
from stepsaver.serve.engine import BatchKey
from stepsaver.skip import AdaptiveSkipConfig, CriterionPolicy, SkipPolicy, skip_report
from stepsaver.skip.config import COMPAT_DEFAULTS, DEFAULT_RULE, RULE_DEFAULTS, adds_fresh_noise
from stepsaver.skip.hook import HOOK_NAME, AdaptiveSkipHook


def test_config_is_frozen_hashable_and_keeps_the_only_defaults():
    a, b = AdaptiveSkipConfig(), AdaptiveSkipConfig(threshold=0.1, max_skips=6, scale="sigma", reuse="auto",
                                                    rule="drift")
    assert a == b and hash(a) == hash(b) and len({a, b, AdaptiveSkipConfig(threshold=0.01)}) == 2
    assert (a.rule, a.threshold, a.max_skips) == (DEFAULT_RULE, *RULE_DEFAULTS[DEFAULT_RULE])
    with pytest.raises(dataclasses.FrozenInstanceError):
        a.max_skips = 2
    assert hash(BatchKey(steps=20, skip=a)) == hash(BatchKey(steps=20, skip=b))
    assert BatchKey(steps=20, skip=a) != BatchKey(steps=20, skip=AdaptiveSkipConfig(max_skips=2))
    with pytest.raises(StepsaverError, match="threshold"):
        AdaptiveSkipConfig(threshold=float("nan"))
    for bad in (dict(scale="log"), dict(reuse="latent"), dict(rule="third-order")):
        with pytest.raises(StepsaverError, match=next(iter(bad))):
            AdaptiveSkipConfig(**bad)
    official = AdaptiveSkipConfig(compat=True)  # compat implies the criterion, its measure, reuse and the paper's delta
    assert (official.rule, official.scale, official.reuse, official.threshold, official.max_skips) == \
        ("criterion", "latent", "output", *COMPAT_DEFAULTS)
    with pytest.raises(StepsaverError, match="compat mode reproduces the official criterion"):
        AdaptiveSkipConfig(compat=True, rule="drift")


def test_each_rule_gets_its_own_defaults_and_written_out_defaults_compare_equal():
    """A rule left to its defaults must not inherit another rule's threshold (they mean different things)."""
    criterion = AdaptiveSkipConfig(rule="criterion")
    assert (criterion.threshold, criterion.max_skips) == RULE_DEFAULTS["criterion"] == (0.02, 4)
    assert AdaptiveSkipConfig(rule="criterion", threshold=0.05).max_skips == 4
    assert AdaptiveSkipConfig(rule="fixed", max_skips=2).threshold == 0.0
    assert AdaptiveSkipConfig(rule="criterion") == AdaptiveSkipConfig(rule="criterion", threshold=0.02, max_skips=4)


def test_auto_reuse_takes_the_data_prediction_on_schedulers_that_add_fresh_noise():
    from diffusers import (
        DDIMScheduler,
        DPMSolverMultistepScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
    )

    cfg = AdaptiveSkipConfig()
    assert cfg.reuse == "auto"
    for scheduler, expected in ((DDIMScheduler(), "noise"), (EulerDiscreteScheduler(), "noise"),
                                (DPMSolverMultistepScheduler(), "noise"), (EulerAncestralDiscreteScheduler(), "x0"),
                                (LCMScheduler(), "x0"),
                                (DPMSolverMultistepScheduler(algorithm_type="sde-dpmsolver++"), "x0")):
        assert cfg.reuse_for(scheduler) == expected, type(scheduler).__name__
        assert adds_fresh_noise(scheduler) == (expected == "x0")
    assert AdaptiveSkipConfig(reuse="noise").reuse_for(EulerAncestralDiscreteScheduler()) == "noise"


class EveryOtherStep(SkipPolicy):
    """Reuse the cache at every odd step after step 1; counts the network calls it was asked to run."""

    def __init__(self) -> None:
        self.runs: list[int] = []

    def decide(self, diffs, path, batch):
        return len(path) % 2 == 1 and len(path) > 1

    def run(self, step, forward):
        self.runs.append(step)
        return forward()


def test_the_hook_takes_a_policy_instead_of_being_subclassed(embedded_pipe):
    from diffusers.hooks import HookRegistry

    from stepsaver import disable_adaptive_skip

    policy = EveryOtherStep()
    hook = AdaptiveSkipHook(AdaptiveSkipConfig(per_sample=False), embedded_pipe, policy=policy)
    registry = HookRegistry.check_if_exists_or_initialize(embedded_pipe.unet)
    registry.register_hook(hook, HOOK_NAME)
    hook.bind_scheduler(embedded_pipe.scheduler)
    try:
        with torch.inference_mode():
            embedded_pipe("a cat, blue background", num_inference_steps=8, output_type="latent")
        report = skip_report(embedded_pipe)
    finally:
        disable_adaptive_skip(embedded_pipe)
    assert report.skipped_steps() == [3, 5, 7] and policy.runs == [0, 1, 2, 4, 6]
    assert report.calls_of(0) == report.denoiser_calls == 5 and report.saved_of(0) == 3


def test_the_criterion_policy_decides_by_the_third_order_test():
    flat = [[1.0]] * 4  # D_1..D_4 after step 4, one sample: a straight trajectory
    assert CriterionPolicy(AdaptiveSkipConfig(threshold=0.5, rule="criterion")).decide(flat, [None] * 5, 1) == [True]
    assert CriterionPolicy(AdaptiveSkipConfig(threshold=0.0, rule="criterion")).decide(flat, [None] * 5, 1) == [False]
    shared = CriterionPolicy(AdaptiveSkipConfig(threshold=0.5, per_sample=False, rule="criterion"))
    assert shared.decide([1.0] * 4, [False] * 5, 1) is True and not shared.per_sample


def test_the_fixed_rule_reuses_whenever_warmup_and_cmax_allow(embedded_pipe):
    from stepsaver import disable_adaptive_skip, enable_adaptive_skip
    from stepsaver.generation import generate_images

    # Policy level: no test of the differences, only warm-up and C_max (per sample).
    fixed = CriterionPolicy(AdaptiveSkipConfig(rule="fixed", max_skips=2))
    wild = [[5.0, 1.0], [0.1, 1.0], [9.0, 1.0], [0.0, 1.0]]  # a trajectory the criterion would never skip
    assert fixed.decide(wild[:2], [None] * 3, 2) == [False, False]  # still warming up
    assert fixed.decide(wild, [None] * 5, 2) == [True, True]
    assert fixed.decide(wild, [None, None, None, None, [True, False], [True, True]], 2) == [False, True]
    assert CriterionPolicy(AdaptiveSkipConfig(rule="fixed", max_skips=0)).decide(wild, [None] * 5, 1) == [False]
    # In a pipeline: one call every max_skips + 1 steps after the warm-up, for both prompts of a batch.
    enable_adaptive_skip(embedded_pipe, AdaptiveSkipConfig(rule="fixed", max_skips=2))
    try:
        results = generate_images(embedded_pipe, ["a cat, blue background", "a dog, red background"], steps=12,
                                  seeds=[0, 1], output_type="latent")
        report = skip_report(embedded_pipe)
    finally:
        disable_adaptive_skip(embedded_pipe)
    assert report.skipped_steps(0) == report.skipped_steps(1) == [4, 5, 7, 8, 10, 11]
    assert [r.denoiser_calls for r in results] == [6, 6] and report.summary()["rule"] == "fixed"
    for bad, match in ((dict(rule="every"), "rule must be one of criterion, fixed, drift"),
                       (dict(rule="fixed", compat=True), "drop compat=True")):
        with pytest.raises(StepsaverError, match=match):
            AdaptiveSkipConfig(**bad)
