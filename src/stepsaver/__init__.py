"""stepsaver: spend only the denoising steps each prompt needs.

The front doors: :func:`load_pipeline` (the embedded model, a hub id or a folder, as a regular
diffusers pipeline) and :func:`generate` (one image with its denoiser calls and seconds).
Predict, Skip, Shrink, Measure and Serve live in the sub-packages of the same names.
"""

from stepsaver.errors import StepsaverError
from stepsaver.generate import GenerationResult, generate
from stepsaver.pipelines import SCHEDULERS, load_pipeline, make_scheduler

__all__ = ["SCHEDULERS", "GenerationResult", "StepsaverError", "generate", "load_pipeline", "make_scheduler"]
__version__ = "0.1.0"
