import os
import sys
from pathlib import Path

import pytest

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """Random SD-1.5- and SDXL-layout pipelines saved to disk once per test session."""
    import tiny

    root = tmp_path_factory.mktemp("tiny_pipelines")
    return {"sd15": tiny.tiny_sd15(root), "sdxl": tiny.tiny_sdxl(root)}


@pytest.fixture(scope="session")
def embedded_pipe():
    from stepsaver import load_pipeline

    return load_pipeline("tiny", device="cpu")
