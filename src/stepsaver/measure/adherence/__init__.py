"""Measure's prompt adherence of scene images: the fraction of a caption's facts an image shows.

CLIP score needs a hub download, so stepsaver measures adherence the way GenEval does, with a
detector trained for the world at hand: a small CNN, trained here on real rendered scenes
(``stepsaver.scenes``), reads an image as *background colour* (12-way) and, for each of the
107 vocabulary objects, *absent or one of the 9 positions* (10-way). Objects in a scene are
distinct, so that per-object head describes every scene exactly.

A caption states facts: its background colour (one fact), each object's presence (one fact each)
and each stated position (one fact each; a lone object's position is sometimes left unsaid).
``AdherenceScorer.load().score(images, captions)`` returns, per image, the fraction of those facts
the classifier sees, with per-fact-type accuracies. Captions may be :class:`Scene` objects or plain
prompt text; text is parsed back into facts with the scene vocabulary (:func:`parse_caption`),
so a caller holding only prompts can score.

The metric is only as good as the classifier: its accuracy on held-out real scenes is stored with
the shipped weights (``models/adherence/config.json``) and checked by the tests. Training adds
blur, down/up-sampling, noise and colour jitter, then fine-tunes with scenes round-tripped through
the embedded model's VAE (the decoder every generated image leaves through), so that it reads
diffusion-model outputs (soft, slightly off-colour) rather than only clean renders.
"""

from stepsaver.measure.adherence.captions import CaptionFacts, ObjectFact, parse_caption
from stepsaver.measure.adherence.scoring import AdherenceResult, AdherenceScorer, pipeline_adherence
from stepsaver.measure.adherence.training import (
           build_shipped_weights,
           decoded_pool,
           evaluate_real,
           train_adherence,
           vae_round_trip,
)

__all__ = ["AdherenceResult", "AdherenceScorer", "CaptionFacts", "ObjectFact", "build_shipped_weights", "decoded_pool",
           "evaluate_real", "parse_caption", "pipeline_adherence", "train_adherence", "vae_round_trip"]
