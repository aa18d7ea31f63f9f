"""``serve --config CALIBRATED.json``: left-out knobs get the calibrated values; other models are refused."""

from __future__ import annotations

import pytest
from fastapi.testclient import TestClient

from stepsaver.calibrate import CalibratedConfig, Candidate, pipeline_fingerprint
from stepsaver.errors import StepsaverError
from stepsaver.serve import ServeSettings, create_app

TOKEN = "s3cret-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def _calibration(pipe, path, fingerprint=None, model="tiny"):
    return CalibratedConfig(model=model, fingerprint=fingerprint or pipeline_fingerprint(pipe),
                            candidate=Candidate("euler", 12, (0.05, 4)), tolerance="lpips<=0.05",
                            reference={"scheduler": "own", "steps": 50}, guidance=4.0).save(path)


def test_a_calibrated_config_is_a_serve_config(embedded_pipe, tmp_path):
    path = _calibration(embedded_pipe, tmp_path / "c.json")
    settings = ServeSettings.load(path, token=TOKEN)
    assert settings.calibration == str(path) and settings.model == "tiny"
    app = create_app(settings, pipe_factory=lambda: embedded_pipe)
    with TestClient(app) as client:
        r = client.post("/v1/generate", json={"prompt": "a red apple", "format": "json"}, headers=AUTH)
        assert r.status_code == 200, r.text
        body = r.json()
        assert (body["steps"], body["scheduler"]) == (12, "euler")  # the calibration's, not the request defaults
        assert body["denoiser_calls"] + body["denoiser_calls_saved"] == 12  # Skip ran (its report counted)
        r = client.post("/v1/generate", json={"prompt": "a red apple", "format": "json", "steps": 6,
                                              "scheduler": "ddim", "skip": False}, headers=AUTH)
        body = r.json()
        assert (body["steps"], body["scheduler"], body["denoiser_calls"], body["denoiser_calls_saved"]) == \
            (6, "ddim", 6, 0)  # what a request sets wins


def test_serving_another_models_calibration_is_refused(embedded_pipe, tmp_path):

    path = _calibration(embedded_pipe, tmp_path / "c.json", fingerprint="f" * 20)
    app = create_app(ServeSettings.load(path, token=TOKEN))
    with pytest.raises(StepsaverError, match="calibrate this model"):
        with TestClient(app):
            pass


def test_a_missing_calibration_fails_at_start_up(tmp_path):
    with pytest.raises(StepsaverError, match="does not exist"):
        create_app(ServeSettings(token=TOKEN, calibration=str(tmp_path / "nope.json")))
