"""MACs against the closed form, timing, cost arithmetic, the report writer, the FID bootstrap."""

import json

import pytest
import torch

from stepsaver.measure.cost import CostModel, count_macs, time_call
from stepsaver.measure.report import (
    bootstrap_fid_difference,
    frechet_distance_from_rows,
    machine_info,
    markdown_table,
    write_report,
)


def test_macs_of_a_conv_layer_equal_the_closed_form():
    conv = torch.nn.Conv2d(4, 8, kernel_size=3, padding=1, bias=False)
    x = torch.randn(2, 4, 16, 16)
    # each output element: C_in * k * k multiply-adds
    assert count_macs(lambda: conv(x)) == 2 * 8 * 16 * 16 * 4 * 3 * 3
    lin = torch.nn.Linear(10, 5)
    assert count_macs(lambda: lin(torch.randn(3, 10))) == 3 * 10 * 5


def test_denoiser_macs_scale_with_the_batch(embedded_pipe):
    unet = embedded_pipe.unet
    emb = torch.zeros(1, 40, 384)

    def call(n):
        return lambda: unet(torch.zeros(n, 4, 16, 16), torch.tensor([500] * n), emb.expand(n, -1, -1))

    one, two = count_macs(call(1)), count_macs(call(2))
    assert one > 10_000_000 and two == 2 * one


def test_time_call_reports_median_of_repeats():
    calls = []
    out = time_call(lambda: calls.append(1), repeats=5, warmup=2)
    assert len(calls) == 7 and out["repeats"] == 5
    assert out["min_s"] <= out["median_s"] <= out["max_s"]
    assert out["peak_memory_bytes"] > 0
    with pytest.raises(ValueError):
        time_call(lambda: None, repeats=0)


def test_cost_model_arithmetic():
    c = CostModel(price_per_gpu_hour=3.6, power_watts=1000, kg_co2_per_kwh=0.5)
    out = c.per_10k_images(0.36)  # 10k images * 0.36 s = 1 hour
    assert out["usd_per_10k"] == pytest.approx(3.6)
    assert out["kg_co2_per_10k"] == pytest.approx(0.5)


def test_write_report_holds_numbers_machine_and_table(tmp_path):
    rows = [{"method": "fixed 50", "calls": 50, "fid": 12.3456}, {"method": "auto", "calls": 21, "fid": 12.9}]
    paths = write_report("demo", rows, title="Demo", summary="two rows", out_dir=tmp_path)
    payload = json.loads(paths["json"].read_text())
    assert payload["rows"] == rows and "cpu" in payload["machine"] and "torch" in payload["machine"]["versions"]
    md = paths["md"].read_text()
    assert "| method | calls | fid |" in md and "12.35" in md and "Machine:" in md
    assert markdown_table([{"a": 1}]).splitlines()[2] == "| 1 |"
    assert machine_info()["cores"] >= 1


def test_bootstrap_ci_separates_a_clearly_better_method():
    g = torch.Generator().manual_seed(0)
    real = torch.rand(48, 2048, generator=g)
    close = real + 0.01 * torch.randn(48, 2048, generator=g)
    far = real + 0.3 * torch.randn(48, 2048, generator=g) + 0.2
    out = bootstrap_fid_difference(real, close, far, n_boot=4)
    assert out["fid_diff"] < 0 and out["ci_high"] < 0


def test_frechet_distance_from_rows_equals_torchmetrics_fid():
    from torchmetrics.image.fid import _compute_fid

    from stepsaver.measure.report import _stats

    g = torch.Generator().manual_seed(1)
    real = torch.rand(120, 300, generator=g)
    for fake in (real[torch.randint(0, 120, (90,), generator=g)] + 0.1 * torch.randn(90, 300, generator=g),
                 0.5 * torch.rand(150, 300, generator=g) + 0.3):
        expected = float(_compute_fid(*_stats(fake), *_stats(real)))
        assert frechet_distance_from_rows(real, fake) == pytest.approx(expected, rel=1e-6)


def test_paired_bootstrap_is_narrower_for_two_renderings_of_the_same_prompts():
    # 200 "prompts" that differ a lot from each other; a and b render each one with a small,
    # method-specific error. Resampling prompts jointly removes the shared prompt variation.
    g = torch.Generator().manual_seed(0)
    real = 3 * torch.randn(200, 16, generator=g)
    a = real + 0.3 * torch.randn(200, 16, generator=g)
    b = real + 0.6 * torch.randn(200, 16, generator=g)
    paired = bootstrap_fid_difference(real, a, b, n_boot=40, paired=True)
    loose = bootstrap_fid_difference(real, a, b, n_boot=40)
    assert paired["paired"] and not loose["paired"]
    assert paired["fid_diff"] == pytest.approx(loose["fid_diff"])
    assert paired["ci_high"] < 0 < loose["ci_high"]
    assert paired["ci_high"] - paired["ci_low"] < 0.5 * (loose["ci_high"] - loose["ci_low"])
    with pytest.raises(ValueError, match="row-aligned"):
        bootstrap_fid_difference(real, a[:100], b, paired=True)


def test_linear_fit_recovers_a_line_and_r2():
    from stepsaver.bench.time import linear_fit

    fit = linear_fit([10, 20, 30, 40], [1.2, 2.2, 3.2, 4.2])
    assert fit["slope"] == pytest.approx(0.1) and fit["intercept"] == pytest.approx(0.2)
    assert fit["r2"] == pytest.approx(1.0)
    noisy = linear_fit([1, 2, 3, 4], [1, 3, 2, 4])
    assert 0 < noisy["r2"] < 1
    with pytest.raises(ValueError):
        linear_fit([1], [1])
