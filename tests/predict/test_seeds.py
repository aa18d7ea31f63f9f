"""Predict with several seeds per prompt: `label --seeds N`, its resume, and the predictability report."""

import json

import numpy as np
import pytest

from stepsaver.errors import StepsaverError
from stepsaver.predict import LabelConfig, LabelStore, label_prompts, predictability
from stepsaver.predict.dataset import read_label_rows
from tests.helpers import GRID, synthetic_rows

PROMPTS = ["a red cat", "a blue dog", "a green bird"]
GRID3 = (2, 4, 6)
RENDERED = ("steps", "ssim_next", "ssim_ref", "label_first_decline", "label_converged", "seed")


@pytest.fixture(scope="module")
def sd15_pipe(tiny_folders):
    from stepsaver import load_pipeline

    return load_pipeline(str(tiny_folders["sd15"]), device="cpu")


def _cfg(**kw) -> LabelConfig:
    return LabelConfig(model="tiny-sd15", steps=GRID3, guidance=3.0, **kw)


def _pairs(store: LabelStore) -> list[tuple[str, int]]:
    return [(r["prompt"], r["seed"]) for r in store.rows()]


# ---- label --seeds ---------------------------------------------------------------------------
def test_seeds_label_every_prompt_from_each_noise_and_seed_0_is_the_single_seed_run(sd15_pipe, tmp_path):
    one = label_prompts(PROMPTS, tmp_path / "one", _cfg(), batch=2, pipe=sd15_pipe, save_images=True)
    three = label_prompts(PROMPTS, tmp_path / "three", _cfg(n_seeds=3), batch=2, pipe=sd15_pipe, save_images=True)
    # seed by seed, every (prompt, seed) once, each row carrying its seed
    assert _pairs(three) == [(p, s) for s in (0, 1, 2) for p in PROMPTS]
    assert three.done == set(PROMPTS) and len(three.pairs) == 9
    # seed 0 is today's single-seed run, digit for digit; the noise matters (other seeds differ)
    old = {r["prompt"]: r for r in one.rows()}
    new = {(r["prompt"], r["seed"]): r for r in three.rows()}
    for p in PROMPTS:
        assert {k: new[p, 0][k] for k in RENDERED} == {k: old[p][k] for k in RENDERED}
    assert any(new[p, 0]["ssim_ref"] != new[p, 1]["ssim_ref"] for p in PROMPTS)
    # one labels folder per seed setting is the same folder: meta.json does not record n_seeds
    assert json.loads((tmp_path / "one" / "meta.json").read_text()) == \
        json.loads((tmp_path / "three" / "meta.json").read_text())
    # renders: seed 0 keeps the single-seed file name (bench flexi reads it), other seeds their own
    assert three.render_path("a red cat", 0).name == one.render_path("a red cat").name
    assert np.array_equal(np.load(three.render_path("a red cat")), np.load(one.render_path("a red cat")))
    paths = {three.render_path("a red cat", s) for s in (0, 1, 2)}
    assert len(paths) == 3 and all(p.exists() for p in paths)
    assert not np.array_equal(np.load(three.render_path("a red cat", 1)), np.load(three.render_path("a red cat")))


def test_seeds_resume_without_relabelling_a_finished_pair(sd15_pipe, tmp_path):
    out = tmp_path / "labels"
    added: list[int] = []
    label_prompts(PROMPTS, out, _cfg(), batch=2, pipe=sd15_pipe)  # a single-seed folder of before
    before = (out / "labels.jsonl").read_text()
    store = label_prompts(PROMPTS, out, _cfg(n_seeds=3), batch=2, pipe=sd15_pipe, on_batch=added.append)
    assert sum(added) == 6  # grown to three seeds in place: only seeds 1 and 2 rendered
    assert (out / "labels.jsonl").read_text().startswith(before)  # the seed-0 rows untouched
    # a run killed after 5 rows, mid-write of the 6th
    lines = (out / "labels.jsonl").read_text().splitlines(keepends=True)
    (out / "labels.jsonl").write_text("".join(lines[:5]) + lines[5][:30])
    kept = LabelStore(out, _cfg(n_seeds=3))
    assert len(kept.pairs) == 5 and not kept.done  # seed 0 of all, seed 1 of two prompts
    assert LabelStore(out, _cfg(n_seeds=2)).done == {"a red cat", "a blue dog"}  # done: every seed asked for
    added.clear()
    store = label_prompts(PROMPTS + ["a red cat"], out, _cfg(n_seeds=3), batch=2, pipe=sd15_pipe,
                          on_batch=added.append)
    assert sum(added) == 4 and (out / "labels.jsonl").read_text().startswith("".join(lines[:5]))
    assert sorted(_pairs(store)) == sorted((p, s) for s in (0, 1, 2) for p in PROMPTS)  # no duplicate, none lost
    added.clear()
    label_prompts(PROMPTS, out, _cfg(n_seeds=2), pipe=sd15_pipe, on_batch=added.append)
    assert sum(added) == 0  # fewer seeds: all there already
    # what changes a render is refused as before: another first seed, another grid
    for other in (_cfg(seed=1, n_seeds=3), LabelConfig(model="tiny-sd15", steps=(2, 4), guidance=3.0, n_seeds=3)):
        with pytest.raises(StepsaverError, match="other settings"):
            label_prompts(PROMPTS, out, other, pipe=sd15_pipe)


def test_rows_without_a_seed_field_are_the_folders_seed(sd15_pipe, tmp_path):
    out = tmp_path / "labels"
    label_prompts(PROMPTS[:2], out, _cfg(seed=5), pipe=sd15_pipe)
    rows = [json.loads(line) for line in (out / "labels.jsonl").read_text().splitlines()]
    for r in rows:
        del r["seed"]  # written before rows recorded their seed
    (out / "labels.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert LabelStore(out, _cfg(seed=5)).pairs == {("a red cat", 5), ("a blue dog", 5)}
    assert [r["seed"] for r in read_label_rows([out])] == [5, 5]  # from meta.json beside them
    added: list[int] = []
    store = label_prompts(PROMPTS[:2], out, _cfg(seed=5, n_seeds=2), pipe=sd15_pipe, on_batch=added.append)
    assert sum(added) == 2 and {r.get("seed") for r in store.rows()} == {None, 6}


def test_bad_seed_counts_are_one_line_errors():
    for bad in (0, -1, 1.5, True):
        with pytest.raises(StepsaverError, match="--seeds"):
            LabelConfig(n_seeds=bad)
    with pytest.raises(StepsaverError, match="seed must be"):
        LabelConfig(seed=2**63 - 2, n_seeds=3)  # the last seed would overflow
    assert LabelConfig(seed=3, n_seeds=2).seeds == (3, 4) and LabelConfig().seeds == (0,)


# ---- predictability --------------------------------------------------------------------------
def _rows(labels: dict[str, list[float]]) -> list[dict]:
    return [{"prompt": p, "seed": s, "label": lab} for p, labs in labels.items() for s, lab in enumerate(labs)]


def test_predictability_of_a_hand_computed_unbalanced_example():
    # A: 10, 20, 30 (three seeds); B: 40, 40 (two); C: one seed only, left out
    p = predictability(_rows({"A": [10, 20, 30], "B": [40, 40], "C": [70]}))
    # N=5, k=2: MSB = 480, MSW = 200/3, n0 = (5 - 13/5) / 1 = 2.4, between = (MSB - MSW) / n0
    between = (480 - 200 / 3) / 2.4
    assert p["n_prompts"] == 2 and p["n_seeds"] == 3 and p["n_labels"] == 5 and p["single_seed_prompts"] == 1
    assert p["n0"] == pytest.approx(2.4)
    assert p["within_var"] == pytest.approx(200 / 3) and p["between_var"] == pytest.approx(between)
    assert p["icc"] == pytest.approx(between / (between + 200 / 3))
    assert p["accuracy_ceiling"] == pytest.approx((1 / 3 + 1) / 2)  # A's mode is one seed of three
    assert p["majority_accuracy"] == pytest.approx(0.5)  # 40 for all
    assert p["mae_floor"] == pytest.approx((20 / 3 + 0) / 2)  # medians 20 and 40
    assert p["mae_constant"] == pytest.approx((30 / 3 + 10) / 2)  # median 30 for all
    assert p["seed_agreement"] == pytest.approx((0 + 1) / 2)
    # balanced: A 10, 20; B 30, 40 -> MSB 400, MSW 50, n0 2, between 175
    assert predictability(_rows({"A": [10, 20], "B": [30, 40]}))["icc"] == pytest.approx(175 / 225)


def test_predictability_known_answers_from_label_rows():
    # label rows (similarities, labelled by the converged rule), each prompt relabelled with two more seeds
    base = synthetic_rows(60)
    decided = [{**r, "seed": s} for s in (0, 1, 2) for r in base]  # the prompt decides the label
    p = predictability(decided, tau=0.9)
    assert p["icc"] == pytest.approx(1.0) and p["within_var"] == 0 and p["between_var"] > 0
    assert p["accuracy_ceiling"] == 1 and p["mae_floor"] == 0 and p["seed_agreement"] == 1
    assert p["n_prompts"] == 60 and p["n_seeds"] == 3 and p["majority_accuracy"] < 1
    rng = np.random.default_rng(0)
    noise = [{**r, "seed": s, "ssim_ref": [0.5 if g < c else 0.99 for g in GRID]}
             for s in (0, 1, 2) for r in synthetic_rows(300) for c in [int(rng.choice(GRID))]]
    q = predictability(noise, tau=0.9)  # the seed decides: the prompt explains nothing
    assert q["icc"] < 0.1 and q["within_var"] > 500
    assert q["accuracy_ceiling"] < 0.5 and q["seed_agreement"] < 0.2 and q["mae_floor"] > 10
    assert predictability(_rows({"A": [10, 10], "B": [10, 10]}))["icc"] is None  # nothing to explain


@pytest.mark.parametrize("rows, message", [
    ([], "needs >= 2 prompts"),
    ([{"prompt": "a", "seed": 0, "label": 10}, {"prompt": "b", "seed": 0, "label": 20}], "--seeds 3"),
    (_rows({"A": [10, 20, 30]}), "needs >= 2 prompts"),
    (_rows({"A": [10, float("nan")], "B": [10, 20]}), "finite"),
    (_rows({"A": [10, "many"], "B": [10, 20]}), "finite"),
    ([{"prompt": "a", "seed": 1.5, "label": 10}], "integer"),
    ([{"prompt": "a", "seed": "0", "label": 10}], "integer"),
    ([{"seed": 0, "label": 10}], "no prompt"),
    ([{"prompt": "a", "seed": 0}], "neither a label"),
    ([{**synthetic_rows(1)[0], "seed": 0, "ssim_ref": [float("inf")] * 10}], "non-finite"),
])
def test_predictability_bad_input_is_one_line(rows, message):
    with pytest.raises(StepsaverError, match=message) as e:
        predictability(rows)
    assert "\n" not in str(e.value)


# ---- the CLI -----------------------------------------------------------------------------------
def _cli(*args):
    from typer.testing import CliRunner

    from stepsaver.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_label_seeds_and_the_dataset_predictability_report(tiny_folders, tmp_path):
    (tmp_path / "p.txt").write_text("a red cat\na blue dog\n")
    args = ("label", "--prompts", tmp_path / "p.txt", "--out", tmp_path / "lab", "--model", tiny_folders["sd15"],
            "--steps", "2,4", "--seeds", 2, "--json")
    r = _cli(*args)
    assert r.exit_code == 0, r.output
    out = json.loads(r.stdout)
    assert out["labelled"] == 4 and out["new"] == 4 and out["seeds"] == [0, 1] and out["prompts"] == 2
    assert json.loads(_cli(*args).stdout)["new"] == 0  # resumed: nothing relabelled
    r = _cli(*args[:-3], "--seeds", 0)
    assert r.exit_code == 2 and "--seeds" in r.output and "Traceback" not in r.output

    base = synthetic_rows(120)
    rows = [{**x, "seed": s} for s in (0, 1) for x in base]
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = _cli("dataset", tmp_path / "labels.jsonl", "--out", tmp_path / "ds", "--tau", 0.9, "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["predictability"]["icc"] == pytest.approx(1.0) and payload["predictability"]["n_seeds"] == 2
    assert payload["dropped"] == {"other_seed": 120}  # the second seed is not a duplicate prompt
    assert sum(payload["counts"]["labelled"].values()) == 120  # training keeps one row per prompt
    assert json.loads((tmp_path / "ds" / "dataset.json").read_text())["predictability"]["n_prompts"] == 120
    r = _cli("dataset", tmp_path / "labels.jsonl", "--out", tmp_path / "ds", "--tau", 0.9)
    assert "the prompt explains 100%" in r.output.replace("\n", " ")

    (tmp_path / "one.jsonl").write_text("".join(json.dumps(x) + "\n" for x in base))
    r = _cli("dataset", tmp_path / "one.jsonl", "--out", tmp_path / "ds1", "--tau", 0.9, "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["predictability"] is None and "--seeds 3" in payload["predictability_note"]
    assert "predictability" not in json.loads((tmp_path / "ds1" / "dataset.json").read_text())
