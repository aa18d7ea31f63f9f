import os

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` runs one pytest-xdist worker per core. Each worker keeps to one torch thread (and
    # so do the processes it starts): two workers of two threads each on two cores run torch ~10x
    # slower than one, from threads spinning on each other's cores.
    os.environ["OMP_NUM_THREADS"] = "1"
    os.environ["MKL_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """Random SD-1.5- and SDXL-layout pipelines saved to disk once per test session."""
    from tests import helpers

    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {"sd15": helpers.tiny_sd15(root), "sdxl": helpers.tiny_sdxl(root)}


@pytest.fixture(scope="session")
def embedded_pipe():
    from stepsaver import load_pipeline

    return load_pipeline("tiny", device="cpu")


@pytest.fixture(scope="session")
def trained_recommender(tmp_path_factory):
    """A step recommender fine-tuned for 3 epochs on synthetic labels (object count decides steps)."""
    from stepsaver.predict.dataset import DatasetConfig, prepare_dataset, write_dataset
    from stepsaver.predict.train import train_recommender
    from tests.helpers import synthetic_rows

    root = tmp_path_factory.mktemp("rec")
    write_dataset(prepare_dataset(synthetic_rows(), DatasetConfig(tau=0.9)), root / "ds")
    monkey = pytest.MonkeyPatch()
    monkey.setenv("STEPSAVER_CACHE", str(root / "cache"))
    result = train_recommender(root / "ds", root / "rec", epochs=3, lrs=[3e-4], log=lambda _m: None)
    yield root / "rec", result
    monkey.undo()
