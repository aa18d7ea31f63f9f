"""A distilled student of the step recommender: a bag of word pieces and a small MLP.

Why it exists: the fine-tuned MiniLM-L6 teacher costs about 0.4 GFLOP a prompt, so on a 2-core
CPU it tops out near 400 prompts/s batched even as int8 ONNX, five times short of the 2,000/s
target. What the teacher learned from the labels (which objects, how many, a few phrasings) lives
mostly in the words and word pairs of a prompt rather than in deep context, so a model that only
averages token vectors can imitate it at a tiny fraction of the cost:

* MiniLM's own fast tokenizer (:func:`~stepsaver.predict.recommender.tokenizer`), so the student
  reads the same word pieces as the teacher;
* a mean ``EmbeddingBag`` of those word pieces, its rows initialised from the teacher's
  word-embedding matrix and pruned to the pieces seen in training plus one UNK row (a few hundred
  rows instead of 30,522: the shipped file stays under a megabyte). Training replaces a few
  pieces by UNK at random, so an unseen word lands on a row that means "some other word" rather
  than on an untrained one;
* a mean ``EmbeddingBag`` over hashed pairs of neighbouring pieces ("and a", "the left"), which
  a bag of single pieces cannot see;
* the number of pieces, because mean pooling forgets how long (how crowded) a prompt is;
* a two-layer MLP to one logit per step class, temperature-calibrated on the validation split like
  the teacher, because ``recommend(prompt, confidence)`` reads the output as probabilities.

It learns by distillation: KL divergence to the teacher's calibrated probabilities on scene
captions generated for free (:class:`~stepsaver.scenes.SceneGenerator`, training split,
validation and test prompts removed), plus cross-entropy on the hard labels of the labelled
training rows. The teacher's probabilities are cached per chunk of captions (keyed by the
teacher's weights and the chunk's text), so a killed or repeated run never recomputes them and
the student itself trains in about a minute on one core.

The one public door is :class:`Student`: ``Student.distill(...)`` makes one, and
``StepRecommender.load(..., backend="student")`` runs one (through :meth:`Student.load`).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from stepsaver.errors import StepsaverError
from stepsaver.predict.recommender import (
    CONFIG_FILE,
    EMBEDDED_RECOMMENDER,
    MAX_LENGTH,
    WEIGHTS_FILE,
    StepRecommender,
    _cache_dir,
    fit_temperature,
    softmax,
    steps_for_confidence,
    tokenizer,
)

__all__ = ["Student"]

_UNK = 0  # row 0 of the unigram table: every word piece not seen in training
_PAIR_PRIME = 1_000_003  # bigram bucket = (row_a * prime + row_b) % buckets
_LENGTH_SCALE = 32.0  # the token-count feature is n_pieces / 32 (scene prompts: 8-30 pieces)
_CHUNK = 1000  # captions per cached file of teacher probabilities


class Student(nn.Module):
    """Word-piece bag + hashed bigram bag + token count -> MLP -> step-class logits.

    Build one with :meth:`distill`; load a saved one with :meth:`load` (``StepRecommender`` does
    this for ``backend="student"``). :meth:`logits` takes raw prompts; the caller applies
    :attr:`temperature` (``StepRecommender.predict_proba`` does).
    """

    FILE = "student.safetensors"

    def __init__(self, vocab_ids: Sequence[int] | np.ndarray, num_classes: int, *, dim: int = 384,
                 bigram_buckets: int = 8192, bigram_dim: int = 32, hidden: int = 256, dropout: float = 0.1,
                 temperature: float = 1.0) -> None:
        super().__init__()
        self._tok = _word_pieces()
        self.vocab_ids = np.asarray(vocab_ids, dtype=np.int64)
        if self.vocab_ids.ndim != 1 or len(self.vocab_ids) == 0:
            raise StepsaverError("a student needs a non-empty vocabulary of word-piece ids")
        self._rows = np.zeros(max(self._tok.get_vocab_size(), int(self.vocab_ids.max()) + 1), dtype=np.int64)
        self._rows[self.vocab_ids] = np.arange(1, len(self.vocab_ids) + 1)
        self.spec: dict[str, Any] = {"dim": dim, "bigram_buckets": bigram_buckets, "bigram_dim": bigram_dim,
                                     "hidden": hidden, "dropout": dropout, "num_classes": num_classes}
        self.temperature = float(temperature)
        self.unigrams = nn.EmbeddingBag(len(self.vocab_ids) + 1, dim, mode="mean")
        self.bigrams = nn.EmbeddingBag(bigram_buckets, bigram_dim, mode="mean") if bigram_buckets else None
        if self.bigrams is not None:
            nn.init.normal_(self.bigrams.weight, std=0.02)
        width = dim + (bigram_dim if bigram_buckets else 0) + 1
        self.mlp = nn.Sequential(nn.Linear(width, hidden), nn.GELU(), nn.Dropout(dropout),
                                 nn.Linear(hidden, num_classes))

    # ---- features ---------------------------------------------------------------------------
    def _encode(self, prompts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Unigram rows of all prompts, flattened, and the number of pieces per prompt."""
        encs = self._tok.encode_batch(list(prompts), add_special_tokens=False)
        lengths = np.fromiter((len(e.ids) for e in encs), dtype=np.int64, count=len(encs))
        flat = np.fromiter((i for e in encs for i in e.ids), dtype=np.int64, count=int(lengths.sum()))
        return self._rows[flat], lengths

    def _forward_rows(self, rows: np.ndarray, lengths: np.ndarray) -> torch.Tensor:
        ends = np.cumsum(lengths)
        offsets = torch.from_numpy(ends - lengths)
        parts = [self.unigrams(torch.from_numpy(rows), offsets)]
        if self.bigrams is not None:
            # a pair (k, k+1) stays inside one prompt unless k is the last piece of its prompt
            last = np.zeros(len(rows), dtype=bool)
            last[ends[lengths > 0] - 1] = True
            keep = ~last[:-1]
            pairs = (rows[:-1][keep] * _PAIR_PRIME + rows[1:][keep]) % self.spec["bigram_buckets"]
            pair_lengths = np.maximum(lengths - 1, 0)
            pair_offsets = torch.from_numpy(np.cumsum(pair_lengths) - pair_lengths)
            parts.append(self.bigrams(torch.from_numpy(pairs), pair_offsets))
        parts.append(torch.from_numpy(lengths / _LENGTH_SCALE).float().unsqueeze(1))
        return self.mlp(torch.cat(parts, dim=1))

    def logits(self, prompts: Sequence[str]) -> np.ndarray:
        """Uncalibrated class logits, one row per prompt (divide by :attr:`temperature`)."""
        self.eval()
        with torch.inference_mode():
            return self._forward_rows(*self._encode(prompts)).numpy()

    def probs(self, prompts: Sequence[str]) -> np.ndarray:
        """Calibrated class probabilities, one row per prompt (what ``predict_proba`` would give)."""
        if not len(prompts):
            return np.zeros((0, self.spec["num_classes"]))
        return softmax(self.logits(prompts).astype(np.float64), self.temperature)

    def oov_fraction(self, prompts: Sequence[str]) -> float:
        """Share of the prompts' word pieces the student never saw in training (they read as UNK)."""
        rows, _ = self._encode(prompts)
        return float((rows == _UNK).mean()) if len(rows) else 0.0

    # ---- files ------------------------------------------------------------------------------
    def save(self, folder: str | Path, metrics: dict[str, Any] | None = None,
             training: dict[str, Any] | None = None) -> Path:
        """Write ``student.safetensors`` (fp16) and the ``student`` section of ``recommender.json``."""
        from safetensors.torch import save_file

        folder = Path(folder)
        config_path = folder / CONFIG_FILE
        if not config_path.exists():
            raise StepsaverError(f"{config_path} does not exist; a student is saved next to its teacher")
        state = {k: v.detach().to(torch.float16).contiguous() for k, v in self.state_dict().items()}
        state["vocab_ids"] = torch.from_numpy(self.vocab_ids.astype(np.int32))
        save_file(state, folder / self.FILE)
        config = json.loads(config_path.read_text())
        config["student"] = {"file": self.FILE, **self.spec, "vocab": int(len(self.vocab_ids)),
                             "temperature": self.temperature, "metrics": metrics or {}, "training": training or {}}
        config_path.write_text(json.dumps(config, indent=1))
        return folder / self.FILE

    @classmethod
    def load(cls, folder: str | Path, spec: dict[str, Any] | None) -> Student:
        """The student saved in a recommender folder (``spec``: that folder's ``config.student``)."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        folder = Path(folder)
        path = folder / (spec or {}).get("file", cls.FILE)
        if not spec or not path.exists():
            raise StepsaverError(f"no distilled student in {folder}; make one with `stepsaver distill-recommender`")
        try:
            state = load_file(path)
            student = cls(state.pop("vocab_ids").numpy(), int(spec["num_classes"]), dim=int(spec["dim"]),
                          bigram_buckets=int(spec["bigram_buckets"]), bigram_dim=int(spec["bigram_dim"]),
                          hidden=int(spec["hidden"]), dropout=float(spec.get("dropout", 0.0)),
                          temperature=float(spec["temperature"]))
            student.load_state_dict({k: v.float() for k, v in state.items()})
        except (KeyError, ValueError, RuntimeError, OSError, SafetensorError) as exc:
            raise StepsaverError(f"student at {path} is corrupt ({str(exc).splitlines()[0]}); "
                                 "distill it again") from None
        return student.eval()

    # ---- training ---------------------------------------------------------------------------
    @classmethod
    def distill(cls, dataset: str | Path, out: str | Path, *, teacher: str | Path = "tiny",
                captions: Sequence[str] | None = None, n_captions: int = 50_000, caption_seed: int = 2,
                n_eval_captions: int = 1000, epochs: int = 30, batch: int = 256, lr: float = 1e-2,
                hard_weight: float = 0.5, token_dropout: float = 0.05, bigram_buckets: int = 8192,
                bigram_dim: int = 32, hidden: int = 256, seed: int = 0,
                log: Callable[[str], None] = print) -> dict[str, Any]:
        """Distil the teacher recommender into a student saved in ``out``; return the comparison.

        ``dataset`` is the folder of ``stepsaver dataset`` the teacher was trained on (its train
        rows give hard labels, val calibrates, test is where student and teacher are compared).
        ``captions`` (default: ``n_captions`` training-split scene captions of ``caption_seed``) are
        the unlabelled distillation set; ``n_eval_captions`` evaluation-split captions (held-out
        compositions and phrasing) measure agreement off the training distribution. ``out`` becomes
        a complete recommender folder: the teacher's files (copied unless ``out`` is the teacher's
        folder) plus the student.
        """
        from stepsaver.predict.dataset import splits_of

        t_start = time.perf_counter()
        torch.manual_seed(seed)
        rng = np.random.default_rng(seed)
        teacher_dir = EMBEDDED_RECOMMENDER if str(teacher) == "tiny" else Path(teacher)
        rec = StepRecommender.load(teacher_dir, backend="torch")
        classes = rec.classes
        splits = splits_of(Path(dataset), classes)
        held = {p for name in ("val", "test", "test_balanced") for p in splits[name].prompts}
        generated = captions is None
        if captions is None:
            from stepsaver.scenes import SceneGenerator

            gen = SceneGenerator(seed=caption_seed, split="train")
            captions = [gen.sample(i).caption for i in range(n_captions)]
        drawn = len(captions)
        train_prompts = set(splits["train"].prompts)
        captions = [c for c in dict.fromkeys(c.strip() for c in captions) if c and c not in held
                    and c not in train_prompts]
        log(f"{len(captions)} distillation captions ({drawn} drawn; duplicates and labelled prompts removed)")
        probs = _TeacherCache(rec, teacher_dir, log)
        cap_p = probs(captions)
        train_p = probs(splits["train"].prompts)

        texts = captions + splits["train"].prompts
        targets = np.concatenate([cap_p, train_p]).astype(np.float32)
        hard = np.concatenate([np.full(len(captions), -1), splits["train"].y]).astype(np.int64)
        student = cls._initialised(rec, texts, len(classes), bigram_buckets, bigram_dim, hidden)
        rows_of = _rows_per_text(student, texts)
        order = rng.permutation(len(captions))
        n_hold = max(1, round(0.05 * len(captions))) if len(captions) >= 20 else 0
        hold, fit = order[:n_hold], np.concatenate([order[n_hold:], np.arange(len(captions), len(texts))])
        history = _train(student, rows_of, targets, hard, fit, hold, epochs=epochs, batch=batch, lr=lr,
                         hard_weight=hard_weight, token_dropout=token_dropout, rng=rng, log=log)
        with torch.no_grad():  # what is shipped is fp16: measure that
            for p in student.parameters():
                p.copy_(p.half().float())
        student.eval()
        val_logits = student.logits(splits["val"].prompts).astype(np.float64)
        student.temperature = fit_temperature(val_logits, splits["val"].y)

        metrics: dict[str, Any] = {}
        for name in ("val", "test", "test_balanced"):
            t_probs = probs(splits[name].prompts)
            metrics[name] = _compare(classes, splits[name].y, t_probs, student.probs(splits[name].prompts))
        metrics["distillation_holdout"] = _agreement(classes, cap_p[hold], student.probs([captions[i] for i in hold]))
        if n_eval_captions > 0:
            from stepsaver.scenes import SceneGenerator

            gen = SceneGenerator(seed=caption_seed, split="eval")
            eval_caps = list(dict.fromkeys(gen.sample(i).caption for i in range(n_eval_captions)))
            metrics["eval_split_captions"] = {**_agreement(classes, probs(eval_caps), student.probs(eval_caps)),
                                              "oov_fraction": student.oov_fraction(eval_caps)}

        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        if out.resolve() != teacher_dir.resolve():
            for name in (CONFIG_FILE, WEIGHTS_FILE):
                shutil.copyfile(teacher_dir / name, out / name)
        training = {"captions": len(captions), "caption_seed": caption_seed if generated else None,
                    "labelled_train_rows": len(splits["train"].prompts), "epochs": epochs, "batch": batch, "lr": lr,
                    "hard_weight": hard_weight, "token_dropout": token_dropout, "seed": seed,
                    "best_epoch": min(history, key=lambda h: h["holdout_kl"])["epoch"] if history else None,
                    "seconds": round(time.perf_counter() - t_start, 1)}
        path = student.save(out, metrics, training)
        log(f"student saved to {path} ({path.stat().st_size / 1e6:.2f} MB)")
        return {"out": str(out), "file": str(path), "bytes": path.stat().st_size, "metrics": metrics,
                "training": training, "history": history, "classes": classes}

    @classmethod
    def _initialised(cls, rec: StepRecommender, texts: Sequence[str], k: int, bigram_buckets: int, bigram_dim: int,
                     hidden: int) -> Student:
        """A student whose vocabulary is the pieces of ``texts`` and whose rows are the teacher's."""
        encs = _word_pieces().encode_batch(list(texts), add_special_tokens=False)
        ids = np.unique(np.fromiter((i for e in encs for i in e.ids), dtype=np.int64))
        table = rec.model.get_input_embeddings().weight.detach().float()
        student = cls(ids, k, dim=table.shape[1], bigram_buckets=bigram_buckets, bigram_dim=bigram_dim,
                      hidden=hidden)
        with torch.no_grad():
            student.unigrams.weight[_UNK] = table[rec.tokenizer.unk_token_id]
            student.unigrams.weight[1:] = table[torch.from_numpy(ids)]
        return student


def _word_pieces() -> Any:
    """MiniLM's fast tokenizer as a private ``tokenizers.Tokenizer``: no padding, truncated like the teacher.

    A copy, because the transformers wrapper leaves padding and truncation settings on its backend
    between calls, which would fill the bags with [PAD] pieces.
    """
    from tokenizers import Tokenizer

    tok = Tokenizer.from_str(tokenizer().backend_tokenizer.to_str())
    tok.no_padding()
    tok.enable_truncation(MAX_LENGTH)
    return tok


class _TeacherCache:
    """The teacher's calibrated probabilities, computed once per chunk of prompts and kept on disk."""

    def __init__(self, rec: StepRecommender, folder: Path, log: Callable[[str], None]) -> None:
        self.rec = rec
        self.log = log
        digest = hashlib.sha1((folder / WEIGHTS_FILE).read_bytes())
        digest.update(repr(rec.config.temperature).encode())
        self.key = digest.hexdigest()[:16]
        self.dir = _cache_dir() / "distill"
        self.dir.mkdir(parents=True, exist_ok=True)

    def __call__(self, prompts: Sequence[str]) -> np.ndarray:
        prompts = list(prompts)
        chunks = []
        t0, computed = time.perf_counter(), 0
        for i in range(0, len(prompts), _CHUNK):
            chunk = prompts[i:i + _CHUNK]
            text = "\n".join(chunk).encode()
            path = self.dir / f"{self.key}-{hashlib.sha1(text).hexdigest()[:16]}.npy"
            if path.exists():
                chunks.append(np.load(path))
                continue
            order = sorted(range(len(chunk)), key=lambda j: len(chunk[j]))  # less padding per batch
            probs = np.empty((len(chunk), len(self.rec.classes)))
            for j in range(0, len(order), 64):
                idx = order[j:j + 64]
                probs[idx] = self.rec.predict_proba([chunk[m] for m in idx])
            self.rec._cache.clear()
            tmp = path.with_suffix(".tmp.npy")
            np.save(tmp, probs)
            tmp.replace(path)  # a killed run leaves whole chunks only
            chunks.append(probs)
            computed += len(chunk)
            rate = computed / (time.perf_counter() - t0)
            self.log(f"teacher: {i + len(chunk)}/{len(prompts)} prompts ({rate:.0f}/s, cached in {self.dir})")
        return np.concatenate(chunks) if chunks else np.zeros((0, len(self.rec.classes)))


def _rows_per_text(student: Student, texts: Sequence[str]) -> list[np.ndarray]:
    rows, lengths = student._encode(texts)
    return np.split(rows, np.cumsum(lengths)[:-1])


def _kl(target: torch.Tensor, logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) per row, from teacher probabilities and student log-probabilities."""
    return (target * (torch.log(target.clamp_min(1e-8)) - logp)).sum(1)


def _batch(rows_of: list[np.ndarray], idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    parts = [rows_of[i] for i in idx]
    return np.concatenate(parts), np.fromiter((len(p) for p in parts), dtype=np.int64, count=len(parts))


def _train(student: Student, rows_of: list[np.ndarray], targets: np.ndarray, hard: np.ndarray, fit: np.ndarray,
           hold: np.ndarray, *, epochs: int, batch: int, lr: float, hard_weight: float, token_dropout: float,
           rng: np.random.Generator, log: Callable[[str], None]) -> list[dict[str, float]]:
    """KL to the teacher (+ ``hard_weight`` x CE where a label exists); keep the best held-out epoch."""
    opt = torch.optim.AdamW(student.parameters(), lr=lr, weight_decay=1e-4)
    total = epochs * max(1, -(-len(fit) // batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total, pct_start=0.1)
    t_all = torch.from_numpy(targets)
    h_all = torch.from_numpy(hard)
    best, best_state, history = float("inf"), None, []
    for epoch in range(epochs):
        student.train()
        t0, seen, loss_sum = time.perf_counter(), 0, 0.0
        perm = fit[rng.permutation(len(fit))]
        for i in range(0, len(perm), batch):
            idx = perm[i:i + batch]
            rows, lengths = _batch(rows_of, idx)
            if token_dropout > 0:
                rows = np.where(rng.random(len(rows)) < token_dropout, _UNK, rows)
            logp = torch.log_softmax(student._forward_rows(rows, lengths), dim=1)
            loss_each = _kl(t_all[idx], logp)
            labelled = h_all[idx] >= 0
            if labelled.any():
                ce = -logp[labelled].gather(1, h_all[idx][labelled].unsqueeze(1)).squeeze(1)
                loss_each = loss_each.clone()
                loss_each[labelled] = loss_each[labelled] + hard_weight * ce
            loss = loss_each.mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            loss_sum += loss.item() * len(idx)
            seen += len(idx)
        row = {"epoch": epoch + 1, "train_loss": loss_sum / max(seen, 1), "seconds": time.perf_counter() - t0}
        if len(hold):
            student.eval()
            with torch.inference_mode():
                logp = torch.log_softmax(student._forward_rows(*_batch(rows_of, hold)), dim=1)
            row["holdout_kl"] = float(_kl(t_all[hold], logp).mean())
            row["holdout_agreement"] = float((logp.argmax(1) == t_all[hold].argmax(1)).float().mean())
        else:
            row["holdout_kl"] = row["train_loss"]
        history.append(row)
        log(f"student epoch {epoch + 1}/{epochs}: train {row['train_loss']:.4f} held-out KL {row['holdout_kl']:.4f}"
            + (f" argmax agreement {row['holdout_agreement']:.3f}" if "holdout_agreement" in row else ""))
        if row["holdout_kl"] < best:
            best = row["holdout_kl"]
            best_state = {k: v.detach().clone() for k, v in student.state_dict().items()}
    if best_state is not None:
        student.load_state_dict(best_state)
    return history


def _agreement(classes: Sequence[int], teacher: np.ndarray, student: np.ndarray) -> dict[str, Any]:
    """How often the student gives the teacher's answer: argmax, and the step count at confidence 0.8."""
    if len(teacher) == 0:
        return {"n": 0}
    t80 = np.array(steps_for_confidence(classes, teacher, 0.8))
    s80 = np.array(steps_for_confidence(classes, student, 0.8))
    kl = (teacher * (np.log(np.clip(teacher, 1e-12, 1)) - np.log(np.clip(student, 1e-12, 1)))).sum(1)
    return {"n": int(len(teacher)), "argmax_agreement": float((teacher.argmax(1) == student.argmax(1)).mean()),
            "confidence_0.8_agreement": float((t80 == s80).mean()),
            "confidence_0.8_mean_abs_diff_steps": float(np.abs(t80 - s80).mean()),
            "kl_teacher_to_student": float(kl.mean())}


def _compare(classes: Sequence[int], y: np.ndarray, teacher: np.ndarray, student: np.ndarray) -> dict[str, Any]:
    """Teacher and student on labelled rows: the scores ``train-recommender`` reports, and agreement."""
    from scipy.stats import spearmanr

    from stepsaver.predict.dataset import scores

    out: dict[str, Any] = {}
    steps = np.asarray(classes, dtype=np.float64)
    for who, probs in (("teacher", teacher), ("student", student)):
        row = scores(probs, y, len(classes))
        if len(y) > 2:
            rho, p = spearmanr(probs @ steps, steps[y])
            row["spearman_expected_steps"] = float(rho)
            row["spearman_p"] = float(p)
        if len(y):
            rec80 = np.array(steps_for_confidence(classes, probs, 0.8))
            row["confidence_0.8_mean_steps"] = float(rec80.mean())
            row["confidence_0.8_covered"] = float((steps[y] <= rec80).mean())
        out[who] = row
    out["agreement"] = _agreement(classes, teacher, student)
    return out
