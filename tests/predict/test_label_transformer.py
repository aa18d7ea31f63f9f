"""Labelling goes through the core generation path, so a transformer (PixArt-layout) pipeline labels too."""

import json

from stepsaver.pipelines import load_pipeline
from stepsaver.predict.label import LabelConfig, Labeler, LabelStore, label_prompts
from tests.helpers import tiny_pixart

PIXART = (("clean_caption", False), ("max_sequence_length", 16), ("use_resolution_binning", False))


def test_labelling_a_tiny_pixart_pipeline_writes_rows_and_resumes(tmp_path):
    folder = tiny_pixart(tmp_path)
    pipe = load_pipeline(str(folder), scheduler="ddim", device="cpu")
    assert not hasattr(pipe, "unet") and pipe.transformer is not None
    cfg = LabelConfig(model=str(folder), steps=(2, 4), call_kwargs=PIXART)
    out = tmp_path / "labels"
    store = label_prompts(["a red cat", "a blue dog"], out, cfg, batch=2, pipe=pipe)
    rows = list(store.rows())
    assert [r["prompt"] for r in rows] == ["a red cat", "a blue dog"]
    assert all(r["label_converged"] in (2, 4) and r["ssim_ref"][-1] == 1.0 for r in rows)
    meta = json.loads((out / "meta.json").read_text())
    assert meta["call_kwargs"] == dict(PIXART)
    again = label_prompts(["a red cat", "a green bird"], out, cfg, batch=2, pipe=pipe)  # resumes: one new row
    assert len(list(again.rows())) == 3 and LabelStore(out, cfg).done == {"a red cat", "a blue dog", "a green bird"}
    # the batch path equals one prompt at a time (same noise per prompt)
    lab = Labeler(cfg, pipe=pipe)
    both, _ = lab.render(["a red cat", "a blue dog"])
    one, _ = lab.render(["a blue dog"])
    assert abs(both[4][1] - one[4][0]).max() < 1e-4
