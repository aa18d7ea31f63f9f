"""Predict: StepSaver's step labelling, dataset preparation and the step recommender.

``rules`` holds the labelling rules as pure functions; ``label`` renders prompts over a step
grid and writes resumable label files (optionally on Ray actors); ``prompts`` reads prompt files;
``dataset`` turns labels into splits and measures how far the prompt predicts the label
(``predictability``, from labels of several seeds per prompt); ``train`` fits the recommender and its baselines;
``recommender`` is the fast path: ``StepRecommender.load("tiny").recommend(prompt)``; ``student``
distils it into a bag-of-word-pieces model for bulk scoring (``backend="student"``).
"""

from stepsaver.predict.dataset import predictability
from stepsaver.predict.label import LabelConfig, Labeler, LabelStore, label_prompts, parse_grid
from stepsaver.predict.prompts import read_prompts
from stepsaver.predict.recommender import Recommendation, StepRecommender, resolve_steps, step_chooser
from stepsaver.predict.rules import DEFAULT_TAU, apply_rule, converged, first_decline

__all__ = ["DEFAULT_TAU", "LabelConfig", "LabelStore", "Labeler", "Recommendation", "StepRecommender",
           "apply_rule", "converged", "first_decline", "label_prompts", "parse_grid", "predictability",
           "read_prompts", "resolve_steps", "step_chooser"]
