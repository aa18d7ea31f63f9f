"""The report records what ran; disabling Skip leaves hooks registered after it working; no-savings notes."""

import torch
from diffusers.hooks import HookRegistry, ModelHook

from stepsaver.calls import count_denoiser_calls
from stepsaver.skip import AdaptiveSkipConfig, disable_adaptive_skip, enable_adaptive_skip, skip_report

PROMPT = "a cat on the left, blue background"


class Counting(ModelHook):
    """Counts the calls that reach it (it wraps whatever forward it was registered over)."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def new_forward(self, module, *args, **kwargs):
        self.calls += 1
        return self.fn_ref.original_forward(*args, **kwargs)


class DoublesRowsLate(ModelHook):
    """From the 6th call on, sends the denoiser twice the rows (as a row-changing cache would) and halves back."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def new_forward(self, module, sample, timestep, encoder_hidden_states, **kwargs):
        self.calls += 1
        if self.calls < 6:
            return self.fn_ref.original_forward(sample, timestep, encoder_hidden_states, **kwargs)
        out = self.fn_ref.original_forward(torch.cat([sample, sample]), timestep,
                                           torch.cat([encoder_hidden_states, encoder_hidden_states]), **kwargs)
        n = sample.shape[0]
        return (out[0][:n], *out[1:]) if isinstance(out, tuple) else type(out)(sample=out.sample[:n])


def _run(pipe, steps=20):
    with torch.inference_mode():
        return pipe(PROMPT, num_inference_steps=steps, output_type="latent",
                    generator=torch.Generator().manual_seed(0)).images


def test_disabling_skip_leaves_a_later_hook_running_in_either_order(embedded_pipe):
    unet = embedded_pipe.unet
    for ours_first in (True, False):
        counting = Counting()
        registry = HookRegistry.check_if_exists_or_initialize(unet)
        if ours_first:
            enable_adaptive_skip(embedded_pipe, AdaptiveSkipConfig(threshold=0.05))
            registry.register_hook(counting, "counting")
        else:
            registry.register_hook(counting, "counting")
            enable_adaptive_skip(embedded_pipe, AdaptiveSkipConfig(threshold=0.05))
        assert disable_adaptive_skip(embedded_pipe)
        _run(embedded_pipe, steps=8)
        assert counting.calls == 8, (ours_first, counting.calls)  # was 0 when ours was removed from below it
        registry.remove_hook("counting", recurse=False)
    assert "forward" not in unet.__dict__ or not HookRegistry.check_if_exists_or_initialize(unet).hooks


def test_the_report_says_computed_where_a_row_change_forced_a_compute(embedded_pipe):
    unet = embedded_pipe.unet
    enable_adaptive_skip(embedded_pipe, AdaptiveSkipConfig(threshold=0.5, max_skips=4))
    outer = DoublesRowsLate()
    registry = HookRegistry.check_if_exists_or_initialize(unet)
    ours = registry._fn_refs[registry._hook_order.index("stepsaver_adaptive_skip")]
    original, runs = ours.original_forward, []

    def counted(*args, **kwargs):  # the real network runs under our hook
        runs.append(1)
        return original(*args, **kwargs)

    ours.original_forward = counted
    registry.register_hook(outer, "rows")  # registered after ours: it calls into ours with other row counts
    try:
        with count_denoiser_calls(embedded_pipe) as calls:
            _run(embedded_pipe)
        report = skip_report(embedded_pipe)
    finally:
        registry.remove_hook("rows", recurse=False)
        ours.original_forward = original
        disable_adaptive_skip(embedded_pipe)
    assert calls[0] == 20
    assert report.denoiser_calls == len(runs) == report.calls_of(0)
    assert 20 - len(report.skipped_steps()) == len(runs)  # flags say exactly which steps ran


def test_a_call_that_saves_nothing_says_why(embedded_pipe):
    enable_adaptive_skip(embedded_pipe, AdaptiveSkipConfig())
    try:
        _run(embedded_pipe, steps=4)
        report = skip_report(embedded_pipe)
    finally:
        disable_adaptive_skip(embedded_pipe)
    assert report.calls_saved == 0 and "warmup" in report.summary()["note"]
    assert "note" not in AdaptiveSkipConfig.__dataclass_fields__  # the note is the report's, not a setting
