
"""Skip: the AdaptiveDiffusion criterion (pure) and its hook on the embedded model, tiny SD-1.5/SDXL and PixArt."""

import contextlib
import dataclasses
import itertools
import math

import pytest
import torch

from stepsaver import StepsaverError, generate, load_pipeline, make_scheduler
from stepsaver.calls import count_denoiser_calls
from stepsaver.skip import (
    AdaptiveSkipConfig,
    consecutive_skips,
    disable_adaptive_skip,
    enable_adaptive_skip,
    is_flat,
    latent_difference,
    next_step_skipped,
    next_step_skipped_batched,
    official_next_step_skipped,
    skip_path,
    skip_report,
)
from stepsaver.skip.hook import HOOK_NAME

ALL_SCHEDULERS = ["ddim", "dpmpp_2m", "euler", "euler_a", "heun", "dpm2_karras", "unipc"]
LINEAR = [10.0 - k for k in range(12)]  # D_1.. falling by 1 a step: always flat (exactly, in binary)
T, F = True, False




# --- the criterion ----------------------------------------------------------------------------

def test_third_order_test_on_hand_computed_values():
    assert is_flat(4.0, 3.0, 2.0, 0.01)  # (2 + 4) / 2 - 3 = 0
    assert is_flat(4.0, 3.0, 2.5, 0.1)  # |3.25 - 3| = 0.25 <= 0.3
    assert not is_flat(4.0, 3.0, 2.5, 0.05)  # 0.25 > 0.15
    assert not is_flat(4.0, 1.0, 4.0, 2.9)  # |4 - 1| = 3 > 2.9
    assert is_flat(4.0, 1.0, 4.0, 3.0)


def test_latent_difference_per_sample_and_total():
    a = torch.zeros(2, 1, 2, 2)
    b = torch.tensor([1.0, -1.0, 3.0, -3.0]).reshape(1, 1, 2, 2).repeat(2, 1, 1, 1)
    b[1] *= 2
    assert latent_difference(b, a).tolist() == [2.0, 4.0]
    assert latent_difference(b, a, per_sample=False).item() == 3.0


def test_warmup_then_at_most_max_skips_in_a_row():
    # steps 0-3 compute, then C_max=2 skips, one compute, two skips, ...
    assert skip_path(LINEAR, 12, threshold=0.01, max_skips=2) == [F, F, F, F, T, T, F, T, T, F, T, T]
    assert skip_path(LINEAR, 12, threshold=0.01, max_skips=4) == [F, F, F, F, T, T, T, T, F, T, T, T]
    assert skip_path(LINEAR, 9, threshold=0.01, max_skips=4, warmup=6) == [F] * 6 + [T, T, T]
    assert skip_path(LINEAR, 10, max_skips=0) == [F] * 10
    assert skip_path(LINEAR, 10, threshold=0.0) == [F] * 10  # delta = 0: never skip, even on exact ties
    assert consecutive_skips([F, T, F, T, T]) == 2


def test_decisions_follow_the_differences():
    # D_1..D_5: flat at D_3 (4,3,2), then a kink: (0.5 + 3)/2 - 2 = -0.25 vs 0.01 * 2
    diffs = [4.0, 3.0, 2.0, 0.5, 0.25]
    assert next_step_skipped(diffs[:3], [F, F, F, F]) is True
    assert next_step_skipped(diffs[:4], [F, F, F, F, T]) is False
    assert next_step_skipped(diffs[:2], [F, F, F]) is False  # step 3 is warmup
    assert skip_path(diffs, 7) == [F, F, F, F, T, F, F]  # (0.25 + 2) / 2 - 0.5 = 0.625: not flat
    with pytest.raises(ValueError, match="one flag per step"):
        next_step_skipped(diffs, [F, F])
    with pytest.raises(ValueError, match="at least 5 differences"):
        skip_path(diffs[:2], 7)


def test_batched_version_matches_the_scalar_one_column_by_column():
    torch.manual_seed(0)
    cols = [LINEAR[:10], [4.0, 3.0, 2.0, 0.5, 0.25, 0.2, 0.15, 0.1, 0.05, 0.0],
            [float(v) for v in torch.rand(10) + 1]]
    mixed = False
    for max_skips, threshold in ((2, 0.01), (4, 0.3), (1, 1.0), (0, 0.5)):
        paths = [[F] for _ in cols]
        for j in range(len(cols[0])):
            diffs = torch.tensor([c[:j] for c in cols], dtype=torch.float64).T.reshape(j, len(cols))
            flags = next_step_skipped_batched(diffs, torch.tensor(paths).T, threshold, max_skips)
            for i, col in enumerate(cols):
                assert bool(flags[i]) == next_step_skipped(col[:j], paths[i], threshold, max_skips)
                paths[i].append(bool(flags[i]))
        assert [p[:11] for p in paths] == [skip_path(c, 11, threshold, max_skips) for c in cols]
        mixed |= any(len(set(col)) > 1 for col in zip(*paths, strict=True))
    assert mixed  # the samples did not all agree


def test_official_decision_enforces_max_skips_only_from_the_sixth_decision():
    ours = skip_path(LINEAR, 12, max_skips=4)
    official = skip_path(LINEAR, 12, max_skips=4, compat=True)
    assert ours == [F, F, F, F, T, T, T, T, F, T, T, T]
    assert official == [F, F, F, F, T, T, T, T, T, F, T, T]  # five skips before the first forced compute
    # max_skips=6: the 6th decision already sees five skips and Python's mask[-6:] takes all five
    assert skip_path(LINEAR, 12, max_skips=6, compat=True) == [F, F, F, F, T, T, T, T, T, F, T, T]
    # max_skips=0: mask[-0:] is the whole mask, so only an all-skip history forces a compute
    assert skip_path(LINEAR, 12, max_skips=0, compat=True) == [F, F, F, F, T, T, T, T, T, F, T, T]
    assert skip_path(LINEAR, 12, max_skips=0) == [F] * 12
    # ties skip at threshold 0 in the official code, never in ours
    assert official_next_step_skipped([4.0, 3.0, 2.0], [F, F, F, F], threshold=0.0) is True
    assert next_step_skipped([4.0, 3.0, 2.0], [F, F, F, F], threshold=0.0) is False
    # same arithmetic on 0-dim tensors (the hook feeds the latents' dtype in compat mode)
    half = [torch.tensor(v, dtype=torch.float16) for v in (4.0, 3.0, 2.5)]
    assert official_next_step_skipped(half, [F, F, F, F], threshold=0.1) is True


# --- helpers for the hook tests -----------------------------------------------------------------

@contextlib.contextmanager
def network_runs(pipe):
    """Count real network runs: the first layer of the denoiser runs once per forward, skipped calls never reach it.

    ``count_denoiser_calls`` counts the pipeline's calls of the denoiser module, which include the calls the
    hook answers from its cache.
    """
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    first = denoiser.conv_in if hasattr(denoiser, "conv_in") else denoiser.pos_embed
    counter = [0]
    handle = first.register_forward_pre_hook(lambda *_: counter.__setitem__(0, counter[0] + 1))
    try:
        yield counter
    finally:
        handle.remove()


def bits(t: torch.Tensor) -> bytes:
    return t.detach().cpu().numpy().tobytes()  # bit-exact, NaN included


def replayed(report, sample=0, compat=False):
    diffs = [d[sample] for d in report.diffs]
    return skip_path(diffs, report.steps, report.threshold, report.max_skips, report.warmup, compat=compat)


EXTRA = {"pixart": {"use_resolution_binning": False, "clean_caption": False, "max_sequence_length": 16}}


def run(pipe, prompts, steps, seeds=None, kind="embedded", output_type="latent"):
    seeds = seeds if seeds is not None else list(range(len(prompts)))
    kwargs = dict(EXTRA.get(kind, {}))
    if kind != "embedded":
        kwargs.update(height=32, width=32)
    gens = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    return pipe(list(prompts), num_inference_steps=steps, guidance_scale=5.0, generator=gens,
                output_type=output_type, **kwargs).images


@pytest.fixture
def pipe(embedded_pipe):
    """The shared embedded pipeline, handed back with its scheduler and without the hook."""
    scheduler = embedded_pipe.scheduler
    yield embedded_pipe
    disable_adaptive_skip(embedded_pipe)
    embedded_pipe.scheduler = scheduler
    embedded_pipe.__dict__.pop("adaptive_skip_report", None)


@pytest.fixture(scope="module")
def tiny_pipes(tiny_folders, tmp_path_factory):
    from tests import helpers as tiny

    folders = dict(tiny_folders, pixart=tiny.tiny_pixart(tmp_path_factory.mktemp("tiny_pixart")))
    cache = {}

    def get(kind, scheduler):
        if (kind, scheduler) not in cache:
            cache[kind, scheduler] = load_pipeline(folders[kind], scheduler=scheduler, device="cpu")
        return cache[kind, scheduler]

    yield get
    for p in cache.values():
        disable_adaptive_skip(p)


def check_hook(pipe, kind, steps, skips_expected=True):
    """threshold=0 is bit-identical, a large threshold saves calls, disabling restores the forward."""
    prompts = ["a red cat"]
    denoiser = getattr(pipe, "unet", None) or pipe.transformer
    ref = run(pipe, prompts, steps, kind=kind)

    enable_adaptive_skip(pipe, AdaptiveSkipConfig(threshold=0.0))
    with count_denoiser_calls(pipe) as calls, network_runs(pipe) as runs:
        same = run(pipe, prompts, steps, kind=kind)
    report = skip_report(pipe)
    assert bits(same) == bits(ref)
    assert report.pipeline_calls == report.denoiser_calls == calls[0] == runs[0]
    assert report.calls_saved == 0 and all(all(row) for row in report.computed)
    disable_adaptive_skip(pipe)

    enable_adaptive_skip(pipe, AdaptiveSkipConfig(threshold=5.0, max_skips=2))
    with count_denoiser_calls(pipe) as calls, network_runs(pipe) as runs:
        fast = run(pipe, prompts, steps, kind=kind)
    report = skip_report(pipe)
    assert report == pipe.adaptive_skip_report
    assert report.steps == steps
    assert calls[0] == report.pipeline_calls  # every call reaches the module; the hook answers some from cache
    assert runs[0] == report.denoiser_calls
    assert report.path() == replayed(report)  # the hook decided exactly as the pure criterion
    if skips_expected:
        assert report.calls_saved > 0 and not torch.equal(fast, ref)
        assert report.skipped_steps()[0] == 4  # first skip right after warmup
        assert max(len(list(g)) for k, g in itertools.groupby(report.path()) if k) <= 2
    assert disable_adaptive_skip(pipe) is True
    assert "forward" not in denoiser.__dict__ and HOOK_NAME not in denoiser._diffusers_hook.hooks
    assert "step" not in pipe.scheduler.__dict__ and "set_timesteps" not in pipe.scheduler.__dict__
    assert bits(run(pipe, prompts, steps, kind=kind)) == bits(ref)
    return report


# --- the hook -----------------------------------------------------------------------------------

@pytest.mark.parametrize("scheduler", ALL_SCHEDULERS)
def test_hook_on_the_embedded_model(pipe, scheduler):
    pipe.scheduler = make_scheduler(scheduler, pipe.scheduler.config)
    # KDPM2 with Karras sigmas turns this zero-terminal-SNR model's latents into NaN with or without the
    # hook (sigma_max ~ 2e4); NaN differences never pass the criterion, so nothing is skipped there.
    report = check_hook(pipe, "embedded", steps=8, skips_expected=scheduler != "dpm2_karras")
    second_order = scheduler in ("heun", "dpm2_karras")
    assert report.pipeline_calls == (2 * 8 - 1 if second_order else 8)


@pytest.mark.parametrize("kind,scheduler", [("sd15", "ddim"), ("sd15", "heun"), ("sd15", "dpm2_karras"),
                                            ("sdxl", "euler"), ("sdxl", "dpmpp_2m"), ("pixart", "ddim"),
                                            ("pixart", "unipc"), ("pixart", "euler_a")])
def test_hook_on_tiny_random_pipelines(tiny_pipes, kind, scheduler):
    p = tiny_pipes(kind, scheduler)
    report = check_hook(p, kind, steps=8)
    if scheduler in ("heun", "dpm2_karras"):
        # one decision per scheduler step covers both of its denoiser calls
        assert report.pipeline_calls == 15
        saved_steps = len(report.skipped_steps())
        assert report.calls_saved == 2 * saved_steps - (1 if report.path()[-1] else 0)


def test_threshold_zero_gives_the_same_png_through_generate(pipe):
    ref = generate(pipe, "a large apple on a blue background", steps=6, seed=3)
    enable_adaptive_skip(pipe, AdaptiveSkipConfig(threshold=0.0))
    same = generate(pipe, "a large apple on a blue background", steps=6, seed=3)
    assert same.images[0].tobytes() == ref.images[0].tobytes()
    assert skip_report(pipe).denoiser_calls == same.denoiser_calls == 6


def test_state_resets_every_call_and_follows_a_swapped_scheduler(pipe):
    enable_adaptive_skip(pipe, AdaptiveSkipConfig(threshold=0.05, rule="criterion"))
    a = run(pipe, ["a blue car"], 10)
    first = skip_report(pipe)
    b = run(pipe, ["a blue car"], 10)
    assert bits(a) == bits(b) and skip_report(pipe) == first and first.calls_saved > 0
    run(pipe, ["a blue car"], 6)
    assert skip_report(pipe).steps == 6
    old = pipe.scheduler
    pipe.scheduler = make_scheduler("euler", old.config)  # swapped between calls: wrapped on the next call
    c = run(pipe, ["a blue car"], 10)
    assert "step" not in old.__dict__ and "step" in pipe.scheduler.__dict__
    swapped = skip_report(pipe)
    disable_adaptive_skip(pipe)
    enable_adaptive_skip(pipe, AdaptiveSkipConfig(threshold=0.05, rule="criterion"))
    assert bits(run(pipe, ["a blue car"], 10)) == bits(c) and skip_report(pipe) == swapped


def test_a_call_stopped_mid_way_leaves_no_state_for_the_next(pipe):
    """A pipeline call that raises at step 5 (user callback, Ctrl-C): the next call starts fresh."""
    enable_adaptive_skip(pipe, AdaptiveSkipConfig(threshold=0.05, rule="criterion"))
    try:
        fresh = run(pipe, ["a blue car"], 10)
        report = skip_report(pipe)

        def stop(p, i, t, kwargs):
            if i == 5:
                raise KeyboardInterrupt
            return kwargs

        with pytest.raises(KeyboardInterrupt):
            pipe(["a red cat"], num_inference_steps=10, callback_on_step_end=stop)
        again = run(pipe, ["a blue car"], 10)
        assert bits(again) == bits(fresh) and skip_report(pipe) == report
    finally:
        disable_adaptive_skip(pipe)


def check_batch_equals_separate_calls(p, kind, prompts, steps, config, atol):
    enable_adaptive_skip(p, config)
    batch = run(p, prompts, steps, kind=kind)
    report = skip_report(p)
    assert any(len(set(row)) > 1 for row in report.computed), "no step mixed computing and skipping samples"
    assert report.rows_computed < report.rows_requested
    for i, prompt in enumerate(prompts):
        alone = run(p, [prompt], steps, seeds=[i], kind=kind)
        assert skip_report(p).path() == report.path(i)
        assert report.path(i) == replayed(report, i)
        torch.testing.assert_close(batch[i:i + 1], alone, rtol=1e-5, atol=atol)
    disable_adaptive_skip(p)
    return report


def test_per_sample_paths_batch_equals_separate_calls_embedded(pipe):
    prompts = ["a red cat on grass", "a blue car", "two yellow stars at night"]
    config = AdaptiveSkipConfig(threshold=0.01, rule="criterion")
    check_batch_equals_separate_calls(pipe, "embedded", prompts, 12, config, atol=1e-4)


@pytest.mark.parametrize("kind,scheduler,threshold", [("sdxl", "euler", 0.17), ("pixart", "euler", 0.4)])
def test_per_sample_paths_batch_equals_separate_calls_tiny(tiny_pipes, kind, scheduler, threshold):
    prompts = ["a red cat", "blue car", "stars"]
    check_batch_equals_separate_calls(tiny_pipes(kind, scheduler), kind, prompts, 10,
                                      AdaptiveSkipConfig(threshold=threshold, scale="latent", rule="criterion"),
                                      atol=1e-4)


def test_compat_mode_shares_one_path_with_the_official_quirk(pipe):
    prompts = ["a red cat on grass", "a blue car"]
    paths = {}
    for compat in (False, True):
        config = AdaptiveSkipConfig(threshold=5.0, max_skips=4, per_sample=False, compat=compat)
        enable_adaptive_skip(pipe, config)
        run(pipe, prompts, 12)
        report = skip_report(pipe)
        disable_adaptive_skip(pipe)
        assert report.mode == ("compat" if compat else "shared") and len(report.diffs[0]) == 1
        assert report.path(0) == report.path(1) == replayed(report, compat=compat)
        paths[compat] = report.skipped_steps()
    assert paths[False] == [4, 5, 6, 7, 9, 10, 11]
    assert paths[True] == [4, 5, 6, 7, 8, 10, 11]


def test_compat_mode_decides_per_scheduler_call_on_second_order_samplers(pipe):
    pipe.scheduler = make_scheduler("heun", pipe.scheduler.config)
    enable_adaptive_skip(pipe, AdaptiveSkipConfig(threshold=5.0, compat=True))
    run(pipe, ["a blue car"], 6)
    report = skip_report(pipe)
    assert report.steps == report.pipeline_calls == 11  # each of Heun's 2 * 6 - 1 calls is a "step" there
    assert report.calls_saved > 0


# --- bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs,match", [
    ({"threshold": -0.1}, "threshold must be a finite number >= 0"),
    ({"threshold": math.nan}, "threshold must be a finite number >= 0"),
    ({"threshold": "0.1"}, "threshold must be a finite number >= 0"),
    ({"max_skips": -1}, "max_skips must be an integer >= 0"),
    ({"max_skips": 2.5}, "max_skips must be an integer >= 0"),
    ({"warmup": 3}, "warmup must be an integer >= 4"),
    ({"per_sample": "yes"}, "per_sample must be True or False"),
    ({"compat": True, "warmup": 6}, "whose warmup is 4"),
])
def test_bad_configs_are_one_line_errors(kwargs, match):
    with pytest.raises(StepsaverError, match=match) as info:
        AdaptiveSkipConfig(**kwargs)
    assert "\n" not in str(info.value)


def test_bad_pipelines_and_double_enabling_leave_nothing_behind(pipe, monkeypatch):
    unet = pipe.unet

    def hooks():
        registry = getattr(unet, "_diffusers_hook", None)
        return list(registry.hooks) if registry is not None else []

    config = AdaptiveSkipConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.threshold = -1.0  # frozen: it keys batches and caches, so it cannot change under them
    object.__setattr__(config, "threshold", -1.0)  # forced past the guard: still checked again on enable
    with pytest.raises(StepsaverError, match="threshold"):
        enable_adaptive_skip(pipe, config)
    with pytest.raises(StepsaverError, match="AdaptiveSkipConfig"):
        enable_adaptive_skip(pipe, {"threshold": 0.01})
    with pytest.raises(StepsaverError, match="no `unet` or `transformer`"):
        enable_adaptive_skip(object())

    class NoScheduler:
        unet = torch.nn.Linear(1, 1)

    with pytest.raises(StepsaverError, match="no diffusers scheduler"):
        enable_adaptive_skip(NoScheduler())
    assert HOOK_NAME not in hooks() and "forward" not in unet.__dict__ and "step" not in pipe.scheduler.__dict__

    # a failure half-way through enabling rolls the hook back
    from stepsaver.skip.hook import AdaptiveSkipHook

    def broken(self, scheduler):
        raise RuntimeError("boom")

    monkeypatch.setattr(AdaptiveSkipHook, "bind_scheduler", broken)
    with pytest.raises(RuntimeError, match="boom"):
        enable_adaptive_skip(pipe)
    assert HOOK_NAME not in hooks() and "forward" not in unet.__dict__
    monkeypatch.undo()

    enable_adaptive_skip(pipe)
    with pytest.raises(StepsaverError, match="already enabled") as info:
        enable_adaptive_skip(pipe, AdaptiveSkipConfig(threshold=0.5))
    assert "\n" not in str(info.value)
    assert hooks().count(HOOK_NAME) == 1
    assert pipe.unet._diffusers_hook.get_hook(HOOK_NAME).config == AdaptiveSkipConfig()
    assert disable_adaptive_skip(pipe) is True and disable_adaptive_skip(pipe) is False


def _split_cfg_loop(pipe, steps, reuse=()):
    """A denoising loop that calls the denoiser twice a step (cond, then uncond), as Flux's true CFG does.

    Steps in ``reuse`` take both outputs of the previous step instead of calling the network.
    """
    sched = pipe.scheduler
    cond_e, uncond_e = pipe.encode_prompt("a cat on the left, blue background", "cpu", 1, True, "")
    sched.set_timesteps(steps)
    x = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * sched.init_noise_sigma
    outs = None
    with torch.inference_mode():
        for i, t in enumerate(sched.timesteps):
            xin = sched.scale_model_input(x, t)
            if i not in reuse:
                outs = (pipe.unet(xin, t, encoder_hidden_states=cond_e).sample,
                        pipe.unet(xin, t, encoder_hidden_states=uncond_e).sample)
            eps = outs[1] + 5.0 * (outs[0] - outs[1])
            x = sched.step(eps, t, x).prev_sample
    return x


def test_pipelines_that_split_cfg_into_two_calls_reuse_each_call_by_position(embedded_pipe):
    plain = _split_cfg_loop(embedded_pipe, 12)
    enable_adaptive_skip(embedded_pipe, AdaptiveSkipConfig(threshold=0.0))
    try:
        assert torch.equal(_split_cfg_loop(embedded_pipe, 12), plain)  # threshold 0: bit-identical
    finally:
        disable_adaptive_skip(embedded_pipe)
    enable_adaptive_skip(embedded_pipe, AdaptiveSkipConfig(threshold=0.5, reuse="output"))
    try:
        skipped = _split_cfg_loop(embedded_pipe, 12)
        report = skip_report(embedded_pipe)
    finally:
        disable_adaptive_skip(embedded_pipe)
    assert report.pipeline_calls == 24 and report.calls_saved == 2 * len(report.skipped_steps()) > 0
    # one decision per step covers both calls, and each reuses its own position's output (cond/uncond)
    assert torch.equal(skipped, _split_cfg_loop(embedded_pipe, 12, reuse=set(report.skipped_steps())))


def test_generate_after_disabling_counts_plain_calls(embedded_pipe):
    """A report kept after disable_adaptive_skip must not be read as the next plain call's."""
    from stepsaver import generate
    from stepsaver.skip import AdaptiveSkipConfig, disable_adaptive_skip, enable_adaptive_skip, skip_report

    enable_adaptive_skip(embedded_pipe, AdaptiveSkipConfig(threshold=0.05, max_skips=4))
    try:
        skipped = generate(embedded_pipe, "a cat, blue background", steps=20)
    finally:
        disable_adaptive_skip(embedded_pipe)
    assert skipped.extra["denoiser_calls_saved"] > 0
    assert skip_report(embedded_pipe) is not None  # the last report is kept, as documented
    plain = generate(embedded_pipe, "a cat, blue background", steps=13)
    assert plain.denoiser_calls == 13 and "denoiser_calls_saved" not in plain.extra
