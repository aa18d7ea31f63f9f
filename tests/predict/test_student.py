"""The distilled student: it follows its teacher, reads like the other backends, ships and loads."""

import json

import numpy as np
import pytest

from stepsaver.errors import StepsaverError
from stepsaver.predict import StepRecommender


def _captions(n: int = 300) -> list[str]:
    """Unlabelled prompts from the synthetic world of ``synthetic_rows`` (different draws)."""
    from tests.helpers import synthetic_rows

    return [r["prompt"].replace("background", "backdrop colour") for r in synthetic_rows(n, seed=1)]


@pytest.fixture(scope="module")
def distilled(trained_recommender, tmp_path_factory):
    """A small student distilled from the session's synthetic teacher, saved to its own folder.

    The teacher's outputs are cached under the session's ``STEPSAVER_CACHE`` (a temporary folder
    the ``trained_recommender`` fixture sets, where that teacher's ONNX exports already are).
    """
    from stepsaver.predict.student import Student

    teacher_dir, _ = trained_recommender
    root = tmp_path_factory.mktemp("student")
    captions = _captions()
    report = Student.distill(teacher_dir.parent / "ds", root / "out", teacher=teacher_dir, captions=captions,
                             n_eval_captions=0, epochs=25, lr=1e-2, hidden=64, bigram_buckets=512, bigram_dim=8,
                             log=lambda _m: None)
    return teacher_dir, root / "out", captions, report


def test_student_follows_the_teacher_on_distillation_data(distilled):
    teacher_dir, out, captions, report = distilled
    teacher = StepRecommender.load(teacher_dir, backend="torch")
    student = StepRecommender.load(out, backend="student")
    t, s = teacher.predict_proba(captions), student.predict_proba(captions)
    assert (t.argmax(1) == s.argmax(1)).mean() >= 0.9
    assert report["metrics"]["test"]["agreement"]["argmax_agreement"] >= 0.8  # and on held-out labelled rows
    for who in ("teacher", "student"):
        assert {"accuracy", "f1_macro", "log_loss", "spearman_expected_steps"} <= set(report["metrics"]["test"][who])
    spec = json.loads((out / "recommender.json").read_text())["student"]
    assert spec["vocab"] < 1000 and report["bytes"] < 1_000_000  # pruned: not MiniLM's 30,522 x 384 table
    assert (out / "classifier.safetensors").exists()  # a full recommender folder: every backend loads from it


def test_student_probabilities_and_recommendations(distilled):
    _, out, _, _ = distilled
    rec = StepRecommender.load(out, backend="student")
    assert rec.model is None and rec._session is None  # the teacher is never built
    prompts = ["a cat on backdrop colour 5", "a cat and a dog and a boat on backdrop colour 7",
               "\u200b", "an astronaut riding a horse"]  # no word pieces at all; words never seen in training
    p = rec.predict_proba(prompts)
    assert p.shape == (4, len(rec.classes)) and np.allclose(p.sum(1), 1) and (p >= 0).all()
    r = rec.recommend(prompts[1], confidence=0.9)
    assert r.steps in rec.classes and abs(sum(r.probabilities.values()) - 1) < 1e-9
    safe = [rec.recommend(prompts[1], confidence=c).steps for c in (0.5, 0.9, 0.999)]
    assert safe == sorted(safe)
    assert rec.student.oov_fraction(["an astronaut riding a horse"]) > 0.5
    assert rec.temperature == rec.student.temperature != rec.config.temperature


@pytest.mark.parametrize("prompts, message", [([], "no prompts"), (["   "], "empty"), (["x" * 10_001], "characters")])
def test_student_rejects_bad_prompts_like_the_teacher(distilled, prompts, message):
    teacher_dir, out, _, _ = distilled
    for rec in (StepRecommender.load(out, backend="student"), StepRecommender.load(teacher_dir, backend="torch")):
        with pytest.raises(StepsaverError, match=message):
            rec.recommend(prompts)
    with pytest.raises(StepsaverError, match="confidence"):
        StepRecommender.load(out, backend="student").recommend("a cat", confidence=0)


def test_student_load_errors_and_cached_teacher(distilled, monkeypatch, tmp_path):
    from stepsaver.predict.student import Student

    teacher_dir, out, captions, _ = distilled
    with pytest.raises(StepsaverError, match="no distilled student"):
        StepRecommender.load(teacher_dir, backend="student")  # train-recommender folders have none
    with pytest.raises(StepsaverError, match="backend must be"):
        StepRecommender.load(out, backend="tensorrt")
    (tmp_path / "bad").mkdir()
    for name in ("recommender.json", "classifier.safetensors"):
        (tmp_path / "bad" / name).write_bytes((out / name).read_bytes())
    (tmp_path / "bad" / Student.FILE).write_bytes(b"not a safetensors file")
    with pytest.raises(StepsaverError, match="corrupt"):
        StepRecommender.load(tmp_path / "bad", backend="student")

    # a second run reads the teacher's probabilities from the cache: the teacher is never called
    def no_teacher(*_a, **_k):
        raise AssertionError("teacher called although its outputs were cached")

    monkeypatch.setattr(StepRecommender, "predict_proba", no_teacher)
    Student.distill(teacher_dir.parent / "ds", tmp_path / "again", teacher=teacher_dir, captions=captions,
                    n_eval_captions=0, epochs=1, hidden=16, bigram_buckets=0, log=lambda _m: None)
    assert json.loads((tmp_path / "again" / "recommender.json").read_text())["student"]["bigram_buckets"] == 0


def test_shipped_student_loads_and_answers():
    rec = StepRecommender.load("tiny", backend="student")
    spec = rec.config.student
    assert spec and spec["metrics"]["test"]["agreement"]["argmax_agreement"] >= 0.9
    one = rec.recommend("a small cat at the top left, blue background")
    crowd = rec.recommend("a cat at the top left, a dog at the top right, a car on the left and a fish at the bottom, "
                          "blue background")
    assert abs(sum(one.probabilities.values()) - 1) < 1e-6 and one.steps in rec.classes
    expected = [sum(k * v for k, v in r.probabilities.items()) for r in (one, crowd)]
    assert expected[1] > expected[0]  # like the teacher: crowded scenes need more steps


def test_cli_recommend_with_the_student_backend():
    from typer.testing import CliRunner

    from stepsaver.cli import app

    r = CliRunner().invoke(app, ["recommend", "a fox at the top, green background", "--backend", "student", "--json"])
    assert r.exit_code == 0, r.output
    assert json.loads(r.stdout)["steps"] in range(10, 101, 10)
    r = CliRunner().invoke(app, ["recommend", "a fox", "--backend", "gpu"])
    assert r.exit_code == 2 and "backend must be" in r.output


def test_bench_recommend_times_the_student_as_a_fourth_row(distilled, tmp_path):
    from stepsaver.bench.recommend import STUDENT_PATH, TARGET_PER_SECOND, bench_recommend

    _, out, captions, _ = distilled
    result = bench_recommend(out, captions[:40], n_single=4, batch=16, threads=1, out_dir=tmp_path, name="speed")
    rows = {r["path"]: r for r in result["rows"]}
    assert list(rows)[-1] == STUDENT_PATH and len(rows) == 4 and rows[STUDENT_PATH]["model"] == "student"
    student = rows[STUDENT_PATH]
    assert student["throughput_target_met"] == (student["prompts_per_s"] >= TARGET_PER_SECOND)
    assert "teacher" in result["summary"] and "distilled student" in result["summary"]
    assert (tmp_path / "speed.json").exists()


def test_cli_distill_recommender(distilled, tmp_path):
    from typer.testing import CliRunner

    from stepsaver.cli import app

    teacher_dir, _, _, _ = distilled
    args = ["distill-recommender", str(teacher_dir.parent / "ds"), "--teacher", str(teacher_dir), "--out",
            str(tmp_path / "rec"), "--captions", "60", "--eval-captions", "20", "--epochs", "2", "--json"]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    payload = json.loads(r.stdout)
    assert payload["training"]["captions"] <= 60 and payload["training"]["caption_seed"] == 2
    assert {"test", "val", "eval_split_captions"} <= set(payload["metrics"])
    assert StepRecommender.load(tmp_path / "rec", backend="student").recommend("a cat").steps in (10, 30, 60)
    r = CliRunner().invoke(app, [*args[:-2], "0", "--json"])  # --epochs 0
    assert r.exit_code == 2 and "--epochs" in r.output
