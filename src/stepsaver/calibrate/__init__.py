"""Calibrate: the cheapest configuration that keeps a quality tolerance, found for the user's own model.

The public door: :func:`calibrate` (search and validate), :func:`parse_tolerance` /
:class:`Tolerance` (what "keeps quality" means), :class:`SearchSpace` / :class:`Candidate`
(what is searched), and :class:`CalibratedConfig` / :func:`load_calibrated` (the config file
that ``generate --config``, the Python API and ``serve --config`` run).
"""

from stepsaver.calibrate.config import CalibratedConfig, is_calibrated_config, load_calibrated, pipeline_fingerprint
from stepsaver.calibrate.search import CalibrationResult, Evaluation, calibrate, split_prompts
from stepsaver.calibrate.space import OWN, Candidate, SearchSpace
from stepsaver.calibrate.tolerance import Tolerance, parse_tolerance

__all__ = ["OWN", "CalibratedConfig", "CalibrationResult", "Candidate", "Evaluation", "SearchSpace", "Tolerance",
           "calibrate", "is_calibrated_config", "load_calibrated", "parse_tolerance", "pipeline_fingerprint",
           "split_prompts"]
