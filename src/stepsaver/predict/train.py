"""Train the step recommender and its baselines in one run, and report them side by side.

Models (all calibrated on the validation split, all scored on the unbalanced and the balanced
test split): majority class; TF-IDF + logistic regression; frozen MiniLM mean embedding +
logistic regression; MiniLM-L6 fine-tuned as a sequence classifier (``preset="paper"``: the
paper's lr 2e-3, batch 16, eval batch 32, 5 epochs, all layers; the default fine-tunes the top
layers with a small grid over learning rate and keeps what validates best). The fine-tuned model
is saved; the baselines are reported.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepsaver.errors import StepsaverError
from stepsaver.predict.dataset import Split, scores, splits_of
from stepsaver.predict.recommender import (
    CONFIG_FILE,
    MAX_LENGTH,
    WEIGHTS_FILE,
    RecommenderConfig,
    classifier,
    fit_temperature,
    softmax,
    tokenizer,
)

PRESETS: dict[str, dict[str, Any]] = {
    "paper": {"lrs": [2e-3], "batch": 16, "eval_batch": 32, "epochs": 5, "trainable_layers": None},
    "default": {"lrs": [1e-4, 3e-4, 1e-3], "batch": 16, "eval_batch": 64, "epochs": 8, "trainable_layers": 2},
}


def _encode(prompts: Sequence[str], tok, batch: int = 64) -> dict[str, torch.Tensor]:
    return tok(list(prompts), padding=True, truncation=True, max_length=MAX_LENGTH, return_tensors="pt")


def _logits(model, prompts: Sequence[str], tok, batch: int) -> np.ndarray:
    model.eval()
    outs = []
    with torch.inference_mode():
        for i in range(0, len(prompts), batch):
            enc = _encode(prompts[i:i + batch], tok)
            outs.append(model(**enc).logits.float().numpy())
    return np.concatenate(outs) if outs else np.zeros((0, model.config.num_labels))


def finetune(splits: dict[str, Split], k: int, lr: float, epochs: int, batch: int, eval_batch: int,
             trainable_layers: int | None, class_weights: np.ndarray | None, seed: int,
             log: Callable[[str], None]) -> tuple[Any, list[dict[str, float]]]:
    """Fine-tune; keep the epoch with the lowest validation loss. Returns (model, history)."""
    from transformers import get_linear_schedule_with_warmup

    torch.manual_seed(seed)
    tok = tokenizer()
    model = classifier(k, trainable_layers)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.01)
    train = splits["train"]
    steps_per_epoch = math.ceil(len(train.prompts) / batch)
    sched = get_linear_schedule_with_warmup(opt, int(0.1 * steps_per_epoch * epochs), steps_per_epoch * epochs)
    weight = torch.tensor(class_weights, dtype=torch.float32) if class_weights is not None else None
    loss_fn = torch.nn.CrossEntropyLoss(weight=weight)
    val_y = torch.from_numpy(splits["val"].y)
    best, best_state, history = float("inf"), None, []
    gen = torch.Generator().manual_seed(seed)
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(len(train.prompts), generator=gen).tolist()
        total = 0.0
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            enc = _encode([train.prompts[j] for j in idx], tok)
            loss = loss_fn(model(**enc).logits, torch.from_numpy(train.y[idx]))
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            total += loss.item() * len(idx)
        val_logits = torch.from_numpy(_logits(model, splits["val"].prompts, tok, eval_batch))
        val_loss = float(torch.nn.functional.cross_entropy(val_logits, val_y))
        history.append({"epoch": epoch + 1, "train_loss": total / len(order), "val_loss": val_loss,
                        "val_accuracy": float((val_logits.argmax(1) == val_y).float().mean())})
        log(f"lr {lr:g} epoch {epoch + 1}/{epochs}: train {history[-1]['train_loss']:.4f} "
            f"val {val_loss:.4f} acc {history[-1]['val_accuracy']:.3f}")
        if val_loss < best:
            best = val_loss
            best_state = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    if best_state is not None:
        model.load_state_dict(best_state, strict=False)
    return model.eval(), history


def _mean_embeddings(prompts: Sequence[str]) -> np.ndarray:
    """Frozen MiniLM sentence embeddings (mean pooling, L2-normalised, as sentence-transformers)."""
    from stepsaver.text import load_text_encoder

    encoder, tok = load_text_encoder(max_tokens=MAX_LENGTH)
    outs = []
    with torch.inference_mode():
        for i in range(0, len(prompts), 128):
            enc = tok(list(prompts[i:i + 128]), padding=True, truncation=True, return_tensors="pt")
            h = encoder(**enc).last_hidden_state
            m = enc["attention_mask"].unsqueeze(-1).float()
            e = (h * m).sum(1) / m.sum(1)
            outs.append(torch.nn.functional.normalize(e, dim=-1).numpy())
    return np.concatenate(outs)


def _calibrated(name: str, val_logits: np.ndarray, splits: dict[str, Split], test_logits: dict[str, np.ndarray],
                k: int, seconds: float) -> dict[str, Any]:
    t = fit_temperature(val_logits, splits["val"].y)
    row = {"model": name, "temperature": t, "train_seconds": round(seconds, 1)}
    row["val"] = scores(softmax(val_logits, t), splits["val"].y, k)
    for split, logits in test_logits.items():
        row[split] = scores(softmax(logits, t), splits[split].y, k)
    return row


def baselines(splits: dict[str, Split], k: int, seed: int) -> list[dict[str, Any]]:
    """Majority class, TF-IDF + LR and frozen-MiniLM + LR, calibrated like the main model."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression

    rows = []
    prior = np.bincount(splits["train"].y, minlength=k) / len(splits["train"].y)
    logit_prior = np.log(np.clip(prior, 1e-6, 1))
    tests = ("test", "test_balanced")
    rows.append(_calibrated("majority class", np.tile(logit_prior, (len(splits["val"].y), 1)), splits,
                            {s: np.tile(logit_prior, (len(splits[s].y), 1)) for s in tests}, k, 0.0))
    t0 = time.perf_counter()
    vec = TfidfVectorizer(ngram_range=(1, 2), min_df=1, sublinear_tf=True)
    x = vec.fit_transform(splits["train"].prompts)
    lr = LogisticRegression(max_iter=2000, C=4.0, random_state=seed).fit(x, splits["train"].y)

    def full_logits(model, feats) -> np.ndarray:
        out = np.full((feats.shape[0], k), -30.0)
        out[:, model.classes_] = model.predict_log_proba(feats)
        return out

    rows.append(_calibrated("TF-IDF + logistic regression", full_logits(lr, vec.transform(splits["val"].prompts)),
                            splits, {s: full_logits(lr, vec.transform(splits[s].prompts)) for s in tests}, k,
                            time.perf_counter() - t0))
    t0 = time.perf_counter()
    emb = {s: _mean_embeddings(splits[s].prompts) for s in ("train", "val", *tests)}
    lr2 = LogisticRegression(max_iter=2000, C=4.0, random_state=seed).fit(emb["train"], splits["train"].y)
    rows.append(_calibrated("frozen MiniLM + logistic regression", full_logits(lr2, emb["val"]), splits,
                            {s: full_logits(lr2, emb[s]) for s in tests}, k, time.perf_counter() - t0))
    return rows


def confusion_plot(y: np.ndarray, pred: np.ndarray, classes: list[int], path: Path, title: str) -> Path:
    from stepsaver.measure.report import pyplot, save_plot

    plt = pyplot()
    from sklearn.metrics import confusion_matrix

    cm = confusion_matrix(y, pred, labels=list(range(len(classes))))
    fig, ax = plt.subplots(figsize=(4.5, 4))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(classes)), classes)
    ax.set_yticks(range(len(classes)), classes)
    for (i, j), v in np.ndenumerate(cm):
        ax.text(j, i, str(v), ha="center", va="center", fontsize=8, color="black" if v < cm.max() / 2 else "white")
    ax.set_xlabel("predicted steps")
    ax.set_ylabel("labelled steps")
    ax.set_title(title, fontsize=9)
    return save_plot(fig, path)


INT8_MIN_AGREEMENT = 0.97
INT8_MAX_NLL_INCREASE = 0.02


def int8_check(out: Path, config: RecommenderConfig, splits: dict[str, Split]) -> dict[str, Any]:
    """Does int8 ONNX keep what the fp32 model predicts? Decides ``config.int8`` for ``out``.

    Both paths run the same weights, so every accuracy difference between them comes from the
    prompts where quantisation flips the argmax. Counting those flips over all train + val
    prompts (no labels needed) measures that directly; comparing accuracies on the ~80 val rows
    cannot, since one row is 1.3 points. int8 is kept when it gives fp32's argmax on at least
    ``INT8_MIN_AGREEMENT`` of the prompts and its val log loss is within
    ``INT8_MAX_NLL_INCREASE`` of fp32's.
    """
    from stepsaver.predict.recommender import StepRecommender

    probs, val_nll = {}, {}
    prompts = splits["train"].prompts + splits["val"].prompts
    for int8 in (True, False):
        config.int8 = int8
        (out / CONFIG_FILE).write_text(json.dumps(config.__dict__, indent=1))
        probs[int8] = StepRecommender.load(out).predict_proba(prompts)
        val_nll[int8] = scores(probs[int8][len(splits["train"].prompts):], splits["val"].y,
                                len(config.classes))["log_loss"]
    agreement = float((probs[True].argmax(1) == probs[False].argmax(1)).mean())
    keep = agreement >= INT8_MIN_AGREEMENT and val_nll[True] <= val_nll[False] + INT8_MAX_NLL_INCREASE
    return {"keep": keep, "argmax_agreement": agreement, "prompts": len(prompts),
            "val_log_loss": {"int8": val_nll[True], "fp32": val_nll[False]}}


def train_recommender(dataset: str | Path, out: str | Path, preset: str = "default", *, model: str = "tiny",
                      class_weights: bool = False, seed: int = 0, epochs: int | None = None,
                      lrs: Sequence[float] | None = None, log: Callable[[str], None] = print) -> dict[str, Any]:
    """Train, compare with the baselines, save the fine-tuned recommender to ``out``; return the report."""
    from safetensors.torch import save_file

    if preset not in PRESETS:
        raise StepsaverError(f"unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    folder, out = Path(dataset), Path(out)
    meta_path = folder / "dataset.json"
    if not meta_path.exists():
        raise StepsaverError(f"{meta_path} does not exist; make the dataset with `stepsaver dataset`")
    meta = json.loads(meta_path.read_text())
    classes = [int(c) for c in meta["classes"]]
    k = len(classes)
    splits = splits_of(folder, classes)
    p = dict(PRESETS[preset])
    if epochs is not None:
        p["epochs"] = epochs
    if lrs is not None:
        p["lrs"] = list(lrs)
    weights = None
    if class_weights:
        counts = np.bincount(splits["train"].y, minlength=k).astype(np.float64)
        weights = counts.sum() / (k * np.maximum(counts, 1))
    rows = baselines(splits, k, seed)
    best = None
    for lr in p["lrs"]:
        t0 = time.perf_counter()
        m, history = finetune(splits, k, lr, p["epochs"], p["batch"], p["eval_batch"], p["trainable_layers"],
                              weights, seed, log)
        tok = tokenizer()
        val_logits = _logits(m, splits["val"].prompts, tok, p["eval_batch"])
        tests = {s: _logits(m, splits[s].prompts, tok, p["eval_batch"]) for s in ("test", "test_balanced")}
        row = _calibrated(f"MiniLM-L6 fine-tuned ({preset}, lr {lr:g})", val_logits, splits, tests, k,
                          time.perf_counter() - t0)
        row["history"] = history
        rows.append(row)
        if best is None or row["val"]["log_loss"] < best[1]["val"]["log_loss"]:
            best = (m, row)
    assert best is not None
    model_, row = best
    row["selected"] = True
    state = {n: p_.detach().to(torch.float16).contiguous() for n, p_ in model_.named_parameters()
             if p["trainable_layers"] is None or p_.requires_grad}
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, out / WEIGHTS_FILE)
    config = RecommenderConfig(classes=classes, temperature=row["temperature"],
                               trainable_layers=p["trainable_layers"], int8=True, model=model,
                               rule=meta["config"]["rule"], tau=meta["config"]["tau"])
    (out / CONFIG_FILE).write_text(json.dumps(config.__dict__, indent=1))
    check = int8_check(out, config, splits)
    config.int8 = check["keep"]
    tok = tokenizer()
    test_pred = _logits(model_, splits["test"].prompts, tok, p["eval_batch"]).argmax(1)
    plot = confusion_plot(splits["test"].y, test_pred, classes, out / "confusion.png",
                          f"{row['model']}: test accuracy {row['test'].get('accuracy', float('nan')):.3f}")
    config.metrics = {"selected": row["model"], "val": row["val"], "test": row["test"],
                      "test_balanced": row["test_balanced"], "onnx_int8_check": check}
    (out / CONFIG_FILE).write_text(json.dumps(config.__dict__, indent=1))
    return {"classes": classes, "rows": rows, "selected": row["model"], "int8": config.int8,
            "onnx_int8_check": check, "confusion": str(plot), "dataset": meta, "out": str(out)}


def result_rows(result: dict[str, Any]) -> list[dict[str, Any]]:
    """One flat row per model of a :func:`train_recommender` result (what the CLI and reports show)."""
    return [{"model": r["model"], "val_acc": r["val"].get("accuracy"), "test_acc": r["test"].get("accuracy"),
             "test_f1": r["test"].get("f1_macro"), "test_bal_acc": r["test_balanced"].get("accuracy"),
             "test_bal_f1": r["test_balanced"].get("f1_macro"), "val_loss": r["val"].get("log_loss"),
             "T": r["temperature"], "selected": r.get("selected", False)} for r in result["rows"]]


def write_recommender_report(name: str, result: dict[str, Any]) -> None:
    """docs/results/<name>.{json,md}: the recommender beside its baselines."""
    from stepsaver.measure.report import write_report

    write_report(name, result_rows(result), title="Step recommender vs baselines",
                 summary=f"Classes {result['classes']}; selected: {result['selected']}; "
                         f"ONNX int8: {result['int8']} (argmax agreement with fp32 "
                         f"{result['onnx_int8_check']['argmax_agreement']:.3f}).",
                 extra={"detail": result})

