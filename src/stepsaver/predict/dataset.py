"""From label files to train/val/test splits, the way StepSaver prepared its LAION labels.

Order of operations (each step's class counts are recorded): drop empty, duplicate and
non-English prompts; label by the chosen rule; hold out the test set from the *unbalanced*
rows (so the test set reflects the prompts users send; a balanced copy is derived from it);
then, on the rest, optionally drop classes under a minimum count (the paper dropped its rare
20 class) and undersample the majority class down to the next largest (the paper did this for
its 30 class); finally a 9:1 train/val split, stratified, with a fixed seed.

Labels made with several seeds per prompt (``stepsaver label --seeds N``) train on each prompt's
first row (its first seed), and :func:`predictability` measures what any recommender that reads
only the text can reach: how much of the label's variance the prompt explains, and the accuracy
and error bounds of the best function of the prompt alone.
"""

from __future__ import annotations

import collections
import json
import math
import numbers
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from stepsaver.errors import StepsaverError
from stepsaver.predict.language import is_english
from stepsaver.predict.rules import DEFAULT_TAU, apply_rule

SPLITS = ("train", "val", "test", "test_balanced")


@dataclass(frozen=True)
class DatasetConfig:
    rule: str = "converged"
    tau: float = DEFAULT_TAU
    english_only: bool = True
    balance: str = "none"  # "none" | "undersample"
    min_count: int = 0  # drop classes with fewer training rows than this (0 keeps all)
    test: float = 0.2  # fraction (< 1) or a row count (>= 1)
    val_fraction: float = 0.1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.balance not in ("none", "undersample"):
            raise StepsaverError(f"balance must be 'none' or 'undersample', got {self.balance!r}")
        if self.test < 0 or not 0 <= self.val_fraction < 1:
            raise StepsaverError(f"test must be >= 0 and val fraction in [0, 1), got {self.test}, {self.val_fraction}")


def _folder_seed(labels_file: Path) -> Any:
    """The seed recorded in the ``meta.json`` beside a labels file (None when there is none)."""
    try:
        meta = json.loads((labels_file.parent / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, UnicodeDecodeError):
        return None
    return meta.get("seed") if isinstance(meta, dict) else None


def read_label_rows(paths: Iterable[str | Path]) -> list[dict[str, Any]]:
    """Rows of ``labels.jsonl`` / ``labels.parquet`` files or of folders that hold one.

    A row without a ``seed`` (files written before rows recorded it) gets the seed of the
    ``meta.json`` beside it, the one its run used, so seeds of several files can be told apart.
    """
    rows: list[dict[str, Any]] = []
    for p in paths:
        p = Path(p)
        if p.is_dir():
            p = p / "labels.jsonl"
        if not p.exists():
            raise StepsaverError(f"labels file {p} does not exist; make it with `stepsaver label`")
        start = len(rows)
        if p.suffix == ".parquet":
            import pyarrow.parquet as pq

            rows.extend(pq.read_table(p).to_pylist())
        else:
            lines = p.read_text(encoding="utf-8").splitlines()
            for lineno, line in enumerate(lines, 1):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    if lineno == len(lines):
                        continue  # a torn last line of an interrupted `stepsaver label` run
                    raise StepsaverError(f"{p}, line {lineno}: not valid JSON") from None
        unseeded = [r for r in rows[start:] if isinstance(r, dict) and r.get("seed") is None]
        seed = _folder_seed(p) if unseeded else None
        if seed is not None:
            for r in unseeded:
                r["seed"] = seed
    for i, r in enumerate(rows):
        if not isinstance(r, dict):
            raise StepsaverError(f"label row {i} is not a JSON object; is this a `stepsaver label` output?")
        missing = {"prompt", "steps", "ssim_next", "ssim_ref"} - set(r)
        if missing:
            raise StepsaverError(f"label row {i} lacks {sorted(missing)}; is this a `stepsaver label` output?")
    return rows


def counts(labels: Iterable[int]) -> dict[int, int]:
    return dict(sorted(collections.Counter(labels).items()))


def _stratified_take(items: list[tuple[str, int]], n: int, rng: random.Random) -> tuple[list, list]:
    """Take about ``n`` items with class proportions kept; return (taken, rest)."""
    by: dict[int, list] = collections.defaultdict(list)
    for it in items:
        by[it[1]].append(it)
    taken, rest = [], []
    total = len(items)
    for _label, group in sorted(by.items()):
        rng.shuffle(group)
        k = round(n * len(group) / total) if total else 0
        taken += group[:k]
        rest += group[k:]
    return taken, rest


def prepare_dataset(rows: Sequence[dict[str, Any]], config: DatasetConfig = DatasetConfig()) -> dict[str, Any]:
    """Splits (lists of ``{"prompt", "label"}``) plus the class counts after every stage."""
    rng = random.Random(config.seed)
    stages: dict[str, dict[int, int]] = {}
    seen: set[str] = set()
    clean: list[tuple[str, int]] = []
    dropped = collections.Counter()
    first_seed: dict[str, Any] = {}
    for r in rows:
        prompt = str(r["prompt"]).strip()
        if not prompt:
            dropped["empty"] += 1
            continue
        if prompt in seen or prompt in first_seed:
            seed = r.get("seed")
            other = seed is not None and first_seed.get(prompt) is not None and seed != first_seed[prompt]
            dropped["other_seed" if other else "duplicate"] += 1  # more seeds are for predictability()
            continue
        first_seed[prompt] = r.get("seed")
        if config.english_only and not is_english(prompt):
            dropped["non_english"] += 1
            continue
        seen.add(prompt)
        clean.append((prompt, apply_rule(config.rule, r["steps"], r["ssim_next"], r["ssim_ref"], config.tau)))
    stages["labelled"] = counts(lab for _, lab in clean)
    if len(stages["labelled"]) < 2:
        raise StepsaverError(f"the labels hold {len(stages['labelled'])} class(es) {stages['labelled']} under rule "
                             f"{config.rule!r}; a recommender needs >= 2: label more prompts, "
                             "or try another rule/--tau")
    n_test = int(config.test) if config.test >= 1 else round(config.test * len(clean))
    test, pool = _stratified_take(clean, n_test, rng)
    stages["test"] = counts(lab for _, lab in test)
    if config.min_count > 0:
        keep = {lab for lab, c in counts(lab for _, lab in pool).items() if c >= config.min_count}
        pool = [it for it in pool if it[1] in keep]
        test = [it for it in test if it[1] in keep]
    if config.balance == "undersample":
        c = counts(lab for _, lab in pool)
        if len(c) >= 2:
            major = max(c, key=c.get)
            cap = sorted(c.values())[-2]
            majors = [it for it in pool if it[1] == major]
            rng.shuffle(majors)
            pool = [it for it in pool if it[1] != major] + majors[:cap]
    stages["pool"] = counts(lab for _, lab in pool)
    if len(stages["pool"]) < 2:
        raise StepsaverError(f"after --min-count {config.min_count} only {stages['pool']} remain; lower it")
    val, train = _stratified_take(pool, round(config.val_fraction * len(pool)), rng)
    rng.shuffle(train)
    tc = counts(lab for _, lab in test)
    per = min(tc.values()) if tc else 0
    balanced: list[tuple[str, int]] = []
    for lab in tc:
        group = [it for it in test if it[1] == lab]
        rng.shuffle(group)
        balanced += group[:per]
    splits = {"train": train, "val": val, "test": test, "test_balanced": balanced}
    for name in SPLITS:
        stages[name] = counts(lab for _, lab in splits[name])
    return {"splits": {k: [{"prompt": p, "label": lab} for p, lab in v] for k, v in splits.items()},
            "counts": stages, "dropped": dict(dropped), "config": asdict(config),
            "classes": sorted(stages["pool"])}


def _row_seed(i: int, row: Mapping[str, Any]) -> int | None:
    seed = row.get("seed")
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, numbers.Real) or not math.isfinite(seed) or seed != int(seed):
        raise StepsaverError(f"label row {i} has seed {seed!r}; a seed is an integer")
    return int(seed)


def _row_label(i: int, row: Mapping[str, Any], rule: str, tau: float) -> float:
    """A row's label: its ``label`` (a dataset split's row) or ``rule`` applied to its similarities."""
    if "label" in row:
        value = row["label"]
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
            raise StepsaverError(f"label row {i} has label {value!r}; a label is a finite number of steps")
        return float(value)
    missing = {"steps", "ssim_next", "ssim_ref"} - set(row)
    if missing:
        raise StepsaverError(f"label row {i} has neither a label nor {sorted(missing)}; "
                             "is this a `stepsaver label` output?")
    for key in ("ssim_next", "ssim_ref"):
        values = row[key]
        if not isinstance(values, Sequence) or isinstance(values, str) or not all(
                isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v) for v in values):
            raise StepsaverError(f"label row {i} ({str(row['prompt'])[:40]!r}): {key} holds a non-finite or "
                                 "non-numeric similarity; relabel that prompt")
    return float(apply_rule(rule, row["steps"], row["ssim_next"], row["ssim_ref"], tau))


def _seed_groups(rows: Sequence[Mapping[str, Any]], rule: str, tau: float) -> dict[str, list[float]]:
    """``{prompt: [label of each seed]}``; the first row of a (prompt, seed) wins, as in prepare_dataset."""
    seen: set[tuple[str, int | None]] = set()
    groups: dict[str, list[float]] = collections.defaultdict(list)
    for i, r in enumerate(rows):
        if not isinstance(r, Mapping) or "prompt" not in r:
            raise StepsaverError(f"label row {i} has no prompt; is this a `stepsaver label` output?")
        prompt = str(r["prompt"]).strip()
        if not prompt:
            continue  # dropped, as prepare_dataset drops it
        key = (prompt, _row_seed(i, r))
        label = _row_label(i, r, rule, tau)
        if key in seen:
            continue
        seen.add(key)
        groups[prompt].append(label)
    return groups


def several_seeds(rows: Sequence[Mapping[str, Any]]) -> int:
    """How many prompts have rows of two or more seeds (what :func:`predictability` can use)."""
    seeds: dict[str, set] = collections.defaultdict(set)
    for i, r in enumerate(rows):
        if isinstance(r, Mapping) and "prompt" in r and str(r["prompt"]).strip():
            seeds[str(r["prompt"]).strip()].add(_row_seed(i, r))
    return sum(len(s) >= 2 for s in seeds.values())


def predictability(rows: Sequence[Mapping[str, Any]], rule: str = "converged",
                   tau: float = DEFAULT_TAU) -> dict[str, Any]:
    """How far the prompt alone determines the step label, from rows of several seeds per prompt.

    Why: a recommender reads only the text, but the label depends on the initial noise too; if
    the same prompt gets 20 steps from one seed and 70 from another, no text model can be right
    on both. Rows are label rows (``prompt``, ``seed`` and the sweep's similarities, labelled by
    ``rule``/``tau``) or rows that carry a ``label``; a row without ``seed`` counts as one seed.
    Only prompts with two or more seeds are used (one seed says nothing about the spread), each
    with the seeds it has. Keys:

    * ``n_prompts``: prompts used; ``n_seeds``: the most seeds a prompt has; ``n_labels``: rows
      used; ``n0``: the ANOVA's effective seeds per prompt (= ``n_seeds`` when balanced);
      ``single_seed_prompts``: prompts left out for having one seed.
    * ``icc``: the one-way random-effects intra-class correlation ICC(1) =
      ``between_var / (between_var + within_var)``, the share of label variance the prompt
      explains (1: the prompt decides the label; 0: the seed does). ``within_var`` is the
      within-prompt mean square, ``between_var`` the variance of the prompts' true means,
      ``(MSB - MSW) / n0`` with the standard ``n0`` for unequal group sizes; a negative estimate
      (chance, when the prompt explains nothing) is reported as 0. ``icc`` is None when every
      label is equal (nothing to explain).
    * ``accuracy_ceiling``: the accuracy of the best function of the prompt alone, which predicts
      each prompt's modal label: the mean over prompts of (count of the modal label / seeds).
      With few seeds it is optimistic (with two, at least 0.5); compare ``majority_accuracy``,
      one label for every prompt (the most common one overall).
    * ``mae_floor``: the lowest mean absolute error in steps of such a function (each prompt's
      median); ``mae_constant``: predicting the median of all labels for every prompt.
    * ``seed_agreement``: the chance that two seeds of a prompt give the same label, averaged
      over prompts (with two seeds: the share of prompts whose seeds agree).
    """
    groups = _seed_groups(rows, rule, tau)
    multi = {p: np.asarray(v, dtype=np.float64) for p, v in groups.items() if len(v) >= 2}
    if len(multi) < 2:
        raise StepsaverError(f"predictability needs >= 2 prompts labelled with >= 2 seeds each, got {len(multi)} "
                             f"(of {len(groups)} prompts); relabel with `stepsaver label --seeds 3`")
    sizes = np.array([len(v) for v in multi.values()], dtype=np.float64)
    k, total = len(multi), float(sizes.sum())
    every = np.concatenate(list(multi.values()))
    grand = every.mean()
    means = np.array([v.mean() for v in multi.values()])
    msb = float((sizes * (means - grand) ** 2).sum() / (k - 1))
    msw = float(sum(((v - v.mean()) ** 2).sum() for v in multi.values()) / (total - k))
    n0 = (total - float((sizes ** 2).sum()) / total) / (k - 1)
    between = max(0.0, (msb - msw) / n0)
    icc = between / (between + msw) if between + msw > 0 else None
    values, pooled = np.unique(every, return_counts=True)
    mode = values[pooled.argmax()]  # ties: the fewest steps
    median = float(np.median(every))

    def agreement(v: np.ndarray) -> float:
        c = np.unique(v, return_counts=True)[1]
        return float((c * (c - 1)).sum() / (len(v) * (len(v) - 1)))

    return {
        "n_prompts": k, "n_seeds": int(sizes.max()), "n_labels": int(total), "n0": n0,
        "single_seed_prompts": len(groups) - k, "rule": rule, "tau": tau if rule == "converged" else None,
        "icc": icc, "between_var": between, "within_var": msw,
        "accuracy_ceiling": float(np.mean([np.unique(v, return_counts=True)[1].max() / len(v)
                                           for v in multi.values()])),
        "majority_accuracy": float(np.mean([(v == mode).mean() for v in multi.values()])),
        "mae_floor": float(np.mean([np.abs(v - np.median(v)).mean() for v in multi.values()])),
        "mae_constant": float(np.mean([np.abs(v - median).mean() for v in multi.values()])),
        "seed_agreement": float(np.mean([agreement(v) for v in multi.values()])),
    }


def predictability_summary(p: dict[str, Any]) -> str:
    """One line for people: what :func:`predictability` found and what it means for a recommender."""
    share = ("every label is equal: nothing to explain" if p["icc"] is None
             else f"the prompt explains {p['icc']:.0%} of the label's variance (ICC(1) {p['icc']:.2f})")
    return (f"predictability ({p['n_prompts']} prompts, up to {p['n_seeds']} seeds each): {share}, variance "
            f"{p['between_var']:.1f} between prompts vs {p['within_var']:.1f} within one; any text-only recommender: "
            f"accuracy <= {p['accuracy_ceiling']:.3f} (one label for all: {p['majority_accuracy']:.3f}), mean abs. "
            f"error >= {p['mae_floor']:.1f} steps (one label for all: {p['mae_constant']:.1f}); two seeds of a prompt "
            f"agree {p['seed_agreement']:.0%} of the time")


def write_dataset(dataset: dict[str, Any], out: str | Path) -> Path:
    """``train/val/test/test_balanced.jsonl`` + ``dataset.json`` (config, counts, classes)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    for name, rows in dataset["splits"].items():
        (out / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    meta = {k: v for k, v in dataset.items() if k != "splits"}
    (out / "dataset.json").write_text(json.dumps(meta, indent=1))
    return out


def load_split(folder: str | Path, name: str) -> list[dict[str, Any]]:
    path = Path(folder) / f"{name}.jsonl"
    if not path.exists():
        raise StepsaverError(f"{path} does not exist; make the dataset with `stepsaver dataset`")
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def label_report(rows: Sequence[dict[str, Any]], name: str = "labels", out_dir: str | Path = "docs/results",
                 taus: Sequence[float] = (0.95, 0.98, 0.99, 0.995, 0.998)) -> dict[str, Any]:
    """How the labels fall: both rules' histograms, converged at several tau, mean SSIM curves."""
    import numpy as np

    from stepsaver.measure.report import pyplot, save_plot, write_report

    plt = pyplot()

    from stepsaver.predict.rules import converged, first_decline

    if not rows:
        raise StepsaverError("no label rows to report on")
    grid = list(rows[0]["steps"])
    table = [{"rule": "first-decline (paper)",
              **{str(s): c for s, c in counts(first_decline(grid, r["ssim_next"]) for r in rows).items()}}]
    for tau in taus:
        table.append({"rule": f"converged, tau {tau}",
                      **{str(s): c for s, c in counts(converged(grid, r["ssim_ref"], tau) for r in rows).items()}})
    for t in table:
        t["mean_steps"] = sum(int(k) * v for k, v in t.items() if k != "rule") / len(rows)
    nxt = np.array([r["ssim_next"] for r in rows])
    ref = np.array([r["ssim_ref"] for r in rows])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    fig, ax = plt.subplots(1, 2, figsize=(10, 3.4))
    pairs = [f"{a}-{b}" for a, b in zip(grid, grid[1:], strict=False)]
    ax[0].plot(pairs, 1 - nxt.mean(0), "o-", label="1 - SSIM(N_k, N_k+1), mean")
    ax[0].plot(pairs, 1 - np.median(nxt, 0), "s--", label="median")
    ax[0].set_yscale("log")
    ax[0].set_xlabel("consecutive step counts")
    ax[0].tick_params(axis="x", labelsize=7, rotation=45)
    ax[0].legend(fontsize=7)
    ax[0].set_title("how much one more block of steps changes the image", fontsize=9)
    ax[1].plot(grid, 1 - ref.mean(0), "o-", label="1 - SSIM(N, final), mean")
    ax[1].set_yscale("log")
    ax[1].set_xlabel("steps")
    ax[1].legend(fontsize=7)
    ax[1].set_title("distance to the 100-step render", fontsize=9)
    plot = save_plot(fig, out / f"{name}.png")
    cols = ["rule", *[str(s) for s in grid], "mean_steps"]
    first = table[0]
    top = max((k for k in first if k not in ("rule", "mean_steps")), key=lambda k: first[k])
    summary = (f"{len(rows)} prompts labelled with {rows[0].get('model')} / {rows[0].get('scheduler')}, seed "
               f"{rows[0].get('seed')}, grid {grid}. Under the paper's first-decline rule {first[top]} of "
               f"{len(rows)} prompts ({first[top] / len(rows):.0%}) get {top} steps.")
    paths = write_report(name, table, title="Step labels on the embedded model", summary=summary, plots=[plot],
                         out_dir=out, columns=cols,
                         extra={"mean_ssim_next": nxt.mean(0).tolist(), "mean_ssim_ref": ref.mean(0).tolist()})
    return {"rows": table, **{k: str(v) for k, v in paths.items()}}


@dataclass
class Split:
    """One split of a step-label dataset: prompts and their class indices (into the class list)."""

    prompts: list[str]
    y: np.ndarray


def splits_of(folder: Path, classes: list[int]) -> dict[str, Split]:
    """The train/val/test(/balanced) splits of ``folder`` restricted to ``classes`` (the recommender's
    and its student's training data, read the same way by both)."""
    index = {c: i for i, c in enumerate(classes)}
    out = {}
    for name in ("train", "val", "test", "test_balanced"):
        rows = [r for r in load_split(folder, name) if r["label"] in index]
        out[name] = Split([r["prompt"] for r in rows], np.array([index[r["label"]] for r in rows], dtype=np.int64))
    if len(out["train"].prompts) == 0 or len(out["val"].prompts) == 0:
        raise StepsaverError(f"{folder}: empty train or val split; label more prompts")
    return out


def scores(probs: np.ndarray, y: np.ndarray, k: int) -> dict[str, Any]:
    """Accuracy, macro F1 and log loss of class probabilities (the metrics every recommender reports)."""
    from sklearn.metrics import accuracy_score, f1_score, log_loss

    if len(y) == 0:
        return {"n": 0}
    probs = np.clip(probs, 1e-7, 1)
    probs = probs / probs.sum(1, keepdims=True)
    pred = probs.argmax(1)
    return {"n": int(len(y)), "accuracy": float(accuracy_score(y, pred)),
            "f1_macro": float(f1_score(y, pred, average="macro", labels=list(range(k)), zero_division=0)),
            "log_loss": float(log_loss(y, probs, labels=list(range(k))))}
