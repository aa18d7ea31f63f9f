"""Predict: labelling rules, prompt files, language filter, the sweep, datasets, the recommender."""

import json
from pathlib import Path

import numpy as np
import pytest

from stepsaver.errors import StepsaverError
from stepsaver.predict import converged, first_decline, parse_grid, read_prompts
from stepsaver.predict.dataset import DatasetConfig, prepare_dataset, write_dataset
from stepsaver.predict.language import is_english
from tests.helpers import GRID, REPO, synthetic_rows

SHARED = REPO.parent / "shared" / "data" / "prompts"


# ---- rules -----------------------------------------------------------------------------------
def test_first_decline_paper_example():
    # SSIMs rise 0.5261 ... 0.6769, then drop to 0.4103 for the pair 50->60: the label is 50
    s = [0.5261, 0.58, 0.62, 0.6769, 0.4103, 0.7, 0.8, 0.85, 0.9]
    assert first_decline(GRID, s) == 50


def test_first_decline_edges():
    assert first_decline(GRID, [0.5 + 0.01 * i for i in range(9)]) == 100  # never declines: spend the max
    assert first_decline(GRID, [0.9, 0.9, 0.9, 0.8, 0.95, 0.95, 0.95, 0.95, 0.95]) == 40  # ties are not declines
    assert first_decline(GRID, [0.9, 0.5, 0.95, 0.1, 0.95, 0.95, 0.95, 0.95, 0.95]) == 20  # the first decline wins
    with pytest.raises(StepsaverError, match="consecutive"):
        first_decline(GRID, [0.5] * 5)


def test_converged_rule():
    ref = [0.5, 0.8, 0.95, 0.97, 0.99, 0.99, 0.99, 0.99, 0.99, 0.2]  # last entry counts as 1 whatever is stored
    assert converged(GRID, ref, 0.9) == 30
    assert converged(GRID, ref, 0.999) == 100
    assert converged(GRID, ref, 0.5) == 10
    with pytest.raises(StepsaverError, match="tau"):
        converged(GRID, ref, 0.0)


def test_grid_parsing_and_validation():
    assert parse_grid("10:100:10") == tuple(GRID)
    assert parse_grid("10,20,50") == (10, 20, 50)
    for bad in ("10:100:0", "20,10", "10", "a:b:c", "0,5"):
        with pytest.raises(StepsaverError):
            parse_grid(bad)


# ---- prompt files ------------------------------------------------------------------------------
def test_shared_prompt_files_load():
    if not SHARED.exists():
        pytest.skip("../shared/data/prompts not present")
    assert len(read_prompts(SHARED / "PartiPrompts.tsv")) == 1632
    assert len(read_prompts(SHARED / "DrawBench.csv")) == 200
    assert len(read_prompts(SHARED / "geneval" / "evaluation_metadata.jsonl")) == 553
    assert len(read_prompts(SHARED / "coco" / "coco_val2017_5k_first_caption.tsv")) == 5000
    assert len(read_prompts(SHARED / "t2i_compbench" / "color_val.txt")) == 300


def test_prompt_formats_and_errors(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "p.txt").write_text("a cat\n\n  a dog  \n")
    assert read_prompts(tmp_path / "p.txt") == ["a cat", "a dog"]
    (tmp_path / "p.jsonl").write_text('{"prompt": "a cat"}\n"a dog"\n')
    assert read_prompts(tmp_path / "p.jsonl") == ["a cat", "a dog"]
    pq.write_table(pa.table({"text": ["a cat", "a dog"]}), tmp_path / "p.parquet")
    assert read_prompts(tmp_path / "p.parquet") == ["a cat", "a dog"]
    (tmp_path / "bad.jsonl").write_text('{"prompt": "a cat"}\n{"prompt": "a dog"\n')
    with pytest.raises(StepsaverError, match="line 2"):
        read_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "p.csv").write_text("id,words\n1,a cat\n")
    with pytest.raises(StepsaverError, match="--column"):
        read_prompts(tmp_path / "p.csv")
    assert read_prompts(tmp_path / "p.csv", column="words") == ["a cat"]
    (tmp_path / "short.csv").write_text("id,prompt\n1,a cat\n2\n")
    with pytest.raises(StepsaverError, match="line 3"):
        read_prompts(tmp_path / "short.csv")
    with pytest.raises(StepsaverError, match="does not exist"):
        read_prompts(tmp_path / "missing.txt")


def test_language_filter_keeps_real_english_and_drops_others():
    if SHARED.exists():
        parti = read_prompts(SHARED / "PartiPrompts.tsv")
        assert sum(not is_english(p) for p in parti) == 0
    for text in ("un chat assis sur une chaise rouge", "ein Hund spielt im Garten mit einem Ball",
                 "一只猫坐在桌子上", "кошка сидит на красном стуле", "uma casa amarela perto do rio"):
        assert not is_english(text), text
    assert is_english("a small red apple at the top left on a blue background")


# ---- the sweep ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sd15_pipe(tiny_folders):
    from stepsaver import load_pipeline

    return load_pipeline(str(tiny_folders["sd15"]), device="cpu")


def test_sweep_uses_generate_noise_and_resumes(sd15_pipe, tmp_path):
    from stepsaver import generate
    from stepsaver.predict import LabelConfig, Labeler, label_prompts

    cfg = LabelConfig(model="tiny-sd15", steps=(2, 3, 4), guidance=3.0)
    prompts = ["a red cat", "a blue dog", "a green bird"]
    rows = Labeler(cfg, pipe=sd15_pipe).label(prompts[:2], keep_images=True)
    # the render at each step count equals what `generate` makes with the same seed, batch or not
    ref = np.asarray(generate(sd15_pipe, "a blue dog", steps=3, seed=0, guidance=3.0).images[0], dtype=np.float32)
    assert np.abs(rows[1]["images"][1].astype(np.float32) - ref).max() <= 2
    assert len(rows[0]["ssim_next"]) == 2 and len(rows[0]["ssim_ref"]) == 3 and rows[0]["ssim_ref"][-1] == 1.0

    seen = []
    store = label_prompts(prompts[:2], tmp_path, cfg, batch=2, pipe=sd15_pipe, on_batch=seen.append,
                          save_images=True)
    with store.path.open("a") as f:  # a run killed mid-write leaves a torn line
        f.write('{"prompt": "a green')
    store = label_prompts(prompts + ["a red cat"], tmp_path, cfg, batch=2, pipe=sd15_pipe)
    lines = store.path.read_text().splitlines()
    assert [json.loads(line)["prompt"] for line in lines] == prompts  # no duplicates, torn line replaced
    assert store.render_path("a red cat").exists() and np.load(store.render_path("a red cat")).shape[0] == 3
    with pytest.raises(StepsaverError, match="other settings"):
        label_prompts(prompts, tmp_path, LabelConfig(model="tiny-sd15", steps=(2, 4)), pipe=sd15_pipe)


def test_a_labels_folder_refuses_other_weights_of_the_same_model(sd15_pipe, tiny_folders, tmp_path):
    import shutil

    from stepsaver.pipelines import weights_fingerprint
    from stepsaver.predict import LabelConfig, label_prompts

    folder = tmp_path / "model"
    shutil.copytree(tiny_folders["sd15"], folder)
    cfg = LabelConfig(model=str(folder), steps=(2, 3), guidance=3.0)
    before = weights_fingerprint(folder)
    assert before and weights_fingerprint("no/such/hub-id") is None
    store = label_prompts(["a red cat"], tmp_path / "labels", cfg, pipe=sd15_pipe)
    assert json.loads((store.root / "meta.json").read_text())["weights"] == before
    weights = next((folder / "unet").glob("*.safetensors"))
    weights.write_bytes(weights.read_bytes() + b" ")  # a retrained model under the same name
    assert weights_fingerprint(folder) != before
    with pytest.raises(StepsaverError, match="weights changed"):
        label_prompts(["a blue dog"], tmp_path / "labels", cfg, pipe=sd15_pipe)
    assert [r["prompt"] for r in store.rows()] == ["a red cat"]  # nothing appended, nothing lost
    # a folder written before fingerprints existed: say how to adopt it, don't guess
    meta = store.root / "meta.json"
    old = json.loads(meta.read_text())
    old.pop("weights")
    meta.write_text(json.dumps(old))
    with pytest.raises(StepsaverError, match='add "weights"'):
        label_prompts(["a blue dog"], tmp_path / "labels", cfg, pipe=sd15_pipe)


# ---- dataset -----------------------------------------------------------------------------------
def test_dataset_splits_counts_and_balancing(tmp_path):
    rows = synthetic_rows()
    rows += [dict(rows[0]), {**rows[1], "prompt": "  "}, {**rows[2], "prompt": "un chat assis sur une chaise rouge"}]
    ds = prepare_dataset(rows, DatasetConfig(rule="converged", tau=0.9, test=0.2))
    assert ds["dropped"] == {"duplicate": 1, "empty": 1, "non_english": 1}
    sp = ds["splits"]
    prompts = [set(r["prompt"] for r in sp[s]) for s in ("train", "val", "test")]
    assert not (prompts[0] & prompts[1]) and not (prompts[0] & prompts[2]) and not (prompts[1] & prompts[2])
    assert sum(len(p) for p in prompts) == 240
    assert ds["classes"] == [10, 30, 60]
    bal = ds["counts"]["test_balanced"]
    assert len(set(bal.values())) == 1  # balanced test: equal class counts
    under = prepare_dataset(rows, DatasetConfig(balance="undersample", tau=0.9))
    pool = under["counts"]["pool"]
    assert max(pool.values()) == sorted(pool.values())[-2]
    dropped = prepare_dataset(rows, DatasetConfig(min_count=45, tau=0.9))  # the ~15% class (60) goes
    assert dropped["classes"] == [10, 30] and 60 not in dropped["counts"]["test"]
    write_dataset(ds, tmp_path)
    assert (tmp_path / "train.jsonl").exists() and json.loads((tmp_path / "dataset.json").read_text())["classes"]
    with pytest.raises(StepsaverError, match="class"):
        prepare_dataset(rows, DatasetConfig(rule="converged", tau=0.1))  # everything converges at 10


# ---- the recommender ---------------------------------------------------------------------------
@pytest.fixture(scope="module")
def trained(trained_recommender):
    return trained_recommender


def test_training_reports_baselines_and_learns(trained):
    _, result = trained
    names = [r["model"] for r in result["rows"]]
    assert names[:3] == ["majority class", "TF-IDF + logistic regression", "frozen MiniLM + logistic regression"]
    selected = next(r for r in result["rows"] if r.get("selected"))
    majority = result["rows"][0]
    assert selected["test"]["accuracy"] > majority["test"]["accuracy"] + 0.2  # object count is learnable
    assert Path(result["confusion"]).exists()
    # int8 is kept only if it keeps fp32's predictions (argmax flips counted over train + val)
    check = result["onnx_int8_check"]
    assert check["prompts"] > 0 and 0 <= check["argmax_agreement"] <= 1
    assert check["keep"] == (check["argmax_agreement"] >= 0.97
                             and check["val_log_loss"]["int8"] <= check["val_log_loss"]["fp32"] + 0.02)
    assert json.loads((Path(result["out"]) / "recommender.json").read_text())["int8"] == check["keep"]


def test_recommend_fast_path(trained):
    from stepsaver.predict import StepRecommender

    path, _ = trained
    onnx, torch_path = StepRecommender.load(path), StepRecommender.load(path, backend="torch")
    prompts = ["a cat on background 5", "a cat and a dog and a boat on background 7"]
    p1, p2 = onnx.predict_proba(prompts), torch_path.predict_proba(prompts)
    assert np.allclose(p1.sum(1), 1) and np.abs(p1 - p2).max() < 0.1  # int8 ONNX ~ fp32 torch
    r = onnx.recommend(prompts[0])
    assert r.steps in (10, 30, 60) and r.milliseconds >= 0 and r.english
    safe = [onnx.recommend(prompts[1], confidence=c).steps for c in (0.5, 0.9, 0.999)]
    assert safe == sorted(safe)  # more confidence never means fewer steps
    assert onnx.recommend(prompts[1], confidence=1.0).steps == 60
    assert prompts[0] in onnx._cache  # LRU cache
    note = onnx.recommend("un chat assis sur une chaise rouge")
    assert not note.english and "English" in note.note
    assert onnx.recommend("a " * 5000).steps in (10, 30, 60)  # long prompts are truncated, not an error
    with pytest.raises(StepsaverError, match="empty"):
        onnx.recommend("   ")
    with pytest.raises(StepsaverError, match="characters"):
        onnx.recommend("x" * 10_001)
    with pytest.raises(StepsaverError, match="confidence"):
        onnx.recommend("a cat", confidence=1.5)
    with pytest.raises(StepsaverError, match="no recommender"):
        StepRecommender.load(path / "missing")


# ---- the CLI -----------------------------------------------------------------------------------
def _cli(*args):
    from typer.testing import CliRunner

    from stepsaver.cli import app

    return CliRunner().invoke(app, [str(a) for a in args])


def test_cli_label_dataset_recommend_and_generate_auto(trained, tiny_folders, tmp_path):
    (tmp_path / "p.txt").write_text("a red cat\na blue dog\n")
    r = _cli("label", "--prompts", tmp_path / "p.txt", "--out", tmp_path / "lab", "--model", tiny_folders["sd15"],
             "--steps", "2,3,4", "--batch", 2, "--json")
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["labelled"] == 2 and (tmp_path / "lab" / "labels.parquet").exists()
    r = _cli("label", "--prompts", tmp_path / "p.txt", "--out", tmp_path / "lab", "--model", tiny_folders["sd15"],
             "--steps", "2,3,4", "--json")
    assert json.loads(r.stdout)["new"] == 0  # resumed: nothing relabelled

    rows = synthetic_rows(120)
    (tmp_path / "labels.jsonl").write_text("".join(json.dumps(x) + "\n" for x in rows))
    r = _cli("dataset", tmp_path / "labels.jsonl", "--out", tmp_path / "ds", "--tau", 0.9, "--json")
    assert r.exit_code == 0, r.output
    assert set(json.loads(r.stdout)["counts"]) >= {"labelled", "train", "val", "test", "test_balanced"}

    path, _ = trained
    r = _cli("recommend", "a cat on background 5", "a dog and a boat on background 1", "--recommender", path, "--json")
    assert r.exit_code == 0, r.output
    recs = json.loads(r.stdout)["recommendations"]
    assert len(recs) == 2 and all(x["steps"] in (10, 30, 60) for x in recs)
    r = _cli("generate", "a small cat on the left, yellow background", "--steps", "auto", "--recommender", path,
             "--out", tmp_path / "auto.png", "--json")
    assert r.exit_code == 0, r.output
    g = json.loads(r.stdout)
    assert g["steps_source"] == "recommended" and g["steps"] in (10, 30, 60) and g["denoiser_calls"] == g["steps"]


@pytest.mark.parametrize("args, message", [
    (["label", "--prompts", "missing.txt", "--out", "x"], "does not exist"),
    (["label", "--prompts", "{p}", "--out", "x", "--steps", "30,20"], "increasing"),
    (["label", "--prompts", "{p}", "--out", "x", "--rule", "magic"], "unknown --rule"),
    (["recommend", "  "], "empty"),
    (["recommend", "a cat", "--recommender", "nowhere"], "no recommender"),
    (["generate", "a cat", "--steps", "many"], "integer or 'auto'"),
    (["dataset", "nowhere.jsonl", "--out", "x"], "does not exist"),
])
def test_cli_errors_are_one_line(tmp_path, args, message):
    (tmp_path / "p.txt").write_text("a cat\n")
    r = _cli(*[a.replace("{p}", str(tmp_path / "p.txt")) for a in args])
    assert r.exit_code == 2, r.output
    assert message in r.output and "Traceback" not in r.output


def test_shipped_recommender_for_the_embedded_model():
    from stepsaver.predict import StepRecommender

    rec = StepRecommender.load("tiny")
    assert rec.classes == list(range(10, 101, 10)) and rec.config.rule == "converged"
    one = rec.recommend("a small cat at the top left, blue background")
    crowd = rec.recommend("a cat at the top left, a dog at the top right, a car on the left and a fish at the bottom, "
                          "blue background")
    assert abs(sum(one.probabilities.values()) - 1) < 1e-6
    expected = [sum(k * v for k, v in r.probabilities.items()) for r in (one, crowd)]
    assert expected[1] > expected[0]  # crowded scenes need more steps: the labels say so, the model learnt it


# ---- bench flexi (toy size: the machinery, not the numbers) ----------------------------------
def test_bench_flexi_compares_every_method_from_one_labelling_and_resumes(tmp_path, capsys):
    """One toy run through the CLI (4 prompts, grid 10/30/50) checks both reports, the FID one and
    "Predict's honest view"; a second run through Python on the same work folder checks the resume."""
    from typer.testing import CliRunner

    from stepsaver.bench.flexi import bench_flexi
    from stepsaver.cli import app
    from stepsaver.predict.label import LabelConfig

    res_dir = tmp_path / "res"
    r = CliRunner().invoke(app, ["bench", "flexi", "--n", "4", "--steps", "10:50:20",
                                 "--work", str(tmp_path / "labels"), "--batch", "8", "--repeats", "1",
                                 "--n-boot", "2", "--out-dir", str(res_dir)])
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())  # rich wraps titles and cells to the terminal's width
    assert "labelled 4 new prompts" in text
    for shown in ("Predict's honest view", "% visibly different)", "than uniform at the same cost"):
        assert shown in text, r.output
    report = json.loads((res_dir / "flexi.json").read_text())
    rows = {r["method"]: r for r in report["rows"]}
    for s in (10, 30, 50):
        assert any(m.startswith(f"fixed {s}") for m in rows)
    assert sum(m.endswith("= iso-cost") for m in rows) == 1
    assert any(m.startswith("flexi-calculated (first-decline") for m in rows)
    assert any(m.startswith("flexi-recommended @ confidence") for m in rows)
    for row in rows.values():
        assert 10 <= row["denoiser_calls"] <= 50 and row["mean_s"] > 0 and np.isfinite(row["fid"])
    # the recommender knows the 10..100 grid: its choices are snapped onto the rendered one
    rec = next(r for m, r in rows.items() if m.startswith("flexi-recommended ("))
    from stepsaver.predict.recommender import StepRecommender
    from stepsaver.scenes import SceneGenerator

    gen = SceneGenerator(seed=1, split="eval")
    chosen = [r.steps for r in StepRecommender.load("tiny").recommend([gen.sample(i).caption for i in range(4)])]
    snapped = [min((10, 30, 50), key=lambda g: (abs(g - c), -g)) for c in chosen]
    assert rec["mean_steps"] == pytest.approx(np.mean(snapped))
    assert set(report["targets"]) == {"no_worse_than_fixed50_and_faster", "beats_iso_cost"}
    assert set(report["seconds_per_step_count"]) == {"10", "30", "50"}
    # verdicts use the prompt-paired bootstrap; the independent-sets CI is kept next to it
    assert report["bootstrap_vs_iso"]["paired"] is True and "unpaired_ci_high" in report["bootstrap_vs_iso"]
    oracle = report["bootstrap_labels_vs_their_iso"]
    assert oracle["labels"].startswith("flexi-calculated (converged") and oracle["iso_cost_steps"] in (10, 30, 50)
    md = (res_dir / "flexi.md").read_text()
    assert md.count("Target") >= 2 and (res_dir / "flexi.png").exists()
    # Predict's honest view: fidelity to the longest render, the labels as the text-only bound
    fid = report["fidelity"]
    assert fid["reference_steps"] == 50 and (res_dir / "flexi-fidelity.png").exists()
    view = {row["method"]: row for row in fid["rows"]}
    assert {"fixed 10", "fixed 30", "fixed 50", fid["bound"]} <= set(view)
    for c in (0.7, 0.8, 0.9):  # the bench's --confidence (0.8) and the two
        assert f"flexi-recommended @ confidence {c}" in view
    assert view["fixed 50"]["ssim_to_ref"] == 1.0 and view["fixed 50"]["lpips_to_ref"] == 0.0
    assert view[fid["bound"]]["role"] == "labels = text-only bound"
    # the SSIM the labeller stored for each render against the longest one, up to 8-bit rounding: the
    # labeller scores the float renders, the view the uint8 ones kept on disk (about 0.002 lower here)
    labels = [json.loads(line) for line in (tmp_path / "labels" / "labels.jsonl").read_text().splitlines()]
    assert view["fixed 10"]["ssim_to_ref"] == pytest.approx(np.mean([row["ssim_ref"][0] for row in labels]), abs=5e-3)
    assert {v["method"] for v in fid["verdicts"]} >= {fid["bound"], "flexi-recommended @ confidence 0.7"}
    assert all(v["verdict"] in ("better", "worse", "no difference") for v in fid["verdicts"])
    assert md.index("| method | mean_steps | denoiser_calls |") < md.index("## Predict's honest view") \
        < md.index("| method | role |") < md.index("Machine: ")
    assert "![flexi-fidelity](flexi-fidelity.png)" in md
    # a second run reuses every label and render: nothing is labelled again, the same FIDs
    capsys.readouterr()
    again = bench_flexi(4, work=tmp_path / "labels", config=LabelConfig(steps=(10, 30, 50)), batch=8, repeats=1,
                        n_boot=2, out_dir=tmp_path / "again")
    assert "labelled" not in capsys.readouterr().out
    assert [r["fid"] for r in again["rows"]] == [r["fid"] for r in report["rows"]]


def test_bench_flexi_refuses_a_set_of_one_and_a_grid_without_50(tmp_path):
    from stepsaver.bench.flexi import bench_flexi
    from stepsaver.predict.label import LabelConfig

    with pytest.raises(StepsaverError, match="--n must be >= 2"):
        bench_flexi(1)
    with pytest.raises(StepsaverError, match="has no 50"):
        bench_flexi(4, work=tmp_path, config=LabelConfig(steps=(10, 20, 30)))
    assert not any(tmp_path.iterdir())  # refused before anything was rendered
