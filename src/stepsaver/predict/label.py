"""The StepSaver sweep: render each prompt at every step count of a grid, score, label.

:class:`Labeler` holds one pipeline and labels a batch of prompts: every prompt starts from the
same initial noise at every step count (``seed``), prompts are batched through the pipeline
together, and the result rows keep every similarity so any rule or threshold can be re-applied
later without re-rendering. :func:`label_prompts` drives a labeller (or N Ray actors, each with
its own pipeline) over a prompt list and appends finished rows to ``labels.jsonl`` one batch at
a time, so a killed run resumes where it stopped and never relabels a finished prompt.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from stepsaver.errors import StepsaverError
from stepsaver.files import exclusive_folder, write_atomically
from stepsaver.predict.rules import DEFAULT_TAU, check_grid, converged, first_decline

PAPER_GRID = tuple(range(10, 101, 10))
LABELS_FILE = "labels.jsonl"
META_FILE = "meta.json"


def parse_grid(spec: str, at_least: int = 2) -> tuple[int, ...]:
    """``"10:100:10"`` (start:stop:step, inclusive) or ``"10,20,50"`` -> a validated grid.

    The one parser of step grids on the command line (labels, benchmarks); ``at_least`` is the
    fewest step counts the caller can use.
    """
    try:
        if ":" in spec:
            start, stop, step = (int(x) for x in spec.split(":"))
            if step <= 0:
                raise StepsaverError(f"step grid {spec!r}: the increment must be positive")
            grid = tuple(range(start, stop + 1, step))
        else:
            grid = tuple(int(x) for x in spec.split(","))
    except ValueError:
        raise StepsaverError(f"cannot read step grid {spec!r}; write start:stop:step (10:100:10) "
                             "or a list (10,20,50)") from None
    return check_grid(grid, at_least)


@dataclass(frozen=True)
class LabelConfig:
    """What a labels file was made with; a resumed run must use the same."""

    model: str = "tiny"
    scheduler: str = "ddim"
    steps: tuple[int, ...] = PAPER_GRID
    seed: int = 0
    guidance: float = 5.0
    tau: float = DEFAULT_TAU
    call_kwargs: tuple[tuple[str, Any], ...] = ()  # extra pipeline arguments (e.g. PixArt's binning switch)

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", check_grid(self.steps))
        object.__setattr__(self, "call_kwargs", tuple(sorted(dict(self.call_kwargs).items())))

    def identity(self) -> dict[str, Any]:
        """The settings that change the renders (tau only changes a derived column).

        ``weights`` fingerprints the model's files: the name ``tiny`` survives a retrain of the
        embedded model, and a resumed run must not append labels of other weights.
        """
        from stepsaver.pipelines import weights_fingerprint

        d = asdict(self)
        d.pop("tau")
        d["steps"] = list(self.steps)
        if self.call_kwargs:  # absent when empty: label folders written before the field still resume
            d["call_kwargs"] = dict(self.call_kwargs)
        else:
            d.pop("call_kwargs")
        d["weights"] = weights_fingerprint(self.model)
        return d


class Labeler:
    """One pipeline that renders batches of prompts over the step grid and labels them."""

    def __init__(self, config: LabelConfig, device: str = "auto", pipe=None) -> None:
        from stepsaver.pipelines import load_pipeline

        self.config = config
        self.pipe = pipe if pipe is not None else load_pipeline(config.model, scheduler=config.scheduler, device=device)
        self.pipe.set_progress_bar_config(disable=True)

    def render(self, prompts: Sequence[str]) -> tuple[dict[int, np.ndarray], dict[int, float]]:
        """``{steps: images[N,H,W,3] float}`` and seconds per prompt for each step count.

        Every prompt starts from the noise of ``config.seed`` (what ``generate(..., seed)`` draws),
        so batching changes nothing; UNet and transformer pipelines alike.
        """
        from stepsaver.generation import generate_images, validate_request

        for p in prompts:
            validate_request(p, self.config.steps[-1], self.config.guidance)
        renders, seconds = {}, {}
        for n in self.config.steps:
            results = generate_images(self.pipe, list(prompts), steps=n, seeds=self.config.seed,
                                      guidance=self.config.guidance, output_type="np", **dict(self.config.call_kwargs))
            seconds[n] = results[0].seconds / len(prompts)
            renders[n] = np.stack([np.asarray(r.image, dtype=np.float32) for r in results])
        return renders, seconds

    def label(self, prompts: Sequence[str], keep_images: bool = False) -> list[dict[str, Any]]:
        """Render, score and label a batch; one row per prompt.

        ``keep_images`` adds each prompt's renders as ``row["images"]`` (``[K,H,W,3]`` uint8), which
        the store saves beside the labels: the sweep already made every fixed-step image a
        benchmark needs, so keeping them saves a second sweep.
        """
        from stepsaver.measure.quality import ssim

        cfg = self.config
        renders, seconds = self.render(prompts)
        stack = torch.stack([torch.from_numpy(renders[n]).permute(0, 3, 1, 2) for n in cfg.steps], 1)  # N,K,C,H,W
        n_prompts, k = stack.shape[:2]
        flat = lambda t: t.reshape(-1, *t.shape[2:])  # noqa: E731
        nxt = ssim(flat(stack[:, :-1]), flat(stack[:, 1:])).reshape(n_prompts, k - 1)
        ref = ssim(flat(stack), flat(stack[:, -1:].expand_as(stack))).reshape(n_prompts, k)
        ref[:, -1] = 1.0
        rows = []
        for i, prompt in enumerate(prompts):
            s_next = [round(float(v), 5) for v in nxt[i]]
            s_ref = [round(float(v), 5) for v in ref[i]]
            rows.append({
                "prompt": prompt,
                "steps": list(cfg.steps),
                "ssim_next": s_next,
                "ssim_ref": s_ref,
                "label_first_decline": first_decline(cfg.steps, s_next),
                "label_converged": converged(cfg.steps, s_ref, cfg.tau),
                "tau": cfg.tau,
                "seconds": [round(seconds[n], 5) for n in cfg.steps],
                "model": cfg.model,
                "scheduler": cfg.scheduler,
                "seed": cfg.seed,
                "guidance": cfg.guidance,
            })
            if keep_images:
                rows[-1]["images"] = (stack[i].permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        return rows


@dataclass
class LabelStore:
    """``labels.jsonl`` + ``meta.json`` in a folder: append-only, one flushed line per prompt."""

    root: Path
    config: LabelConfig
    done: set[str] = field(default_factory=set)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.root.mkdir(parents=True, exist_ok=True)
        meta_path = self.root / META_FILE
        if meta_path.exists():
            try:
                saved = json.loads(meta_path.read_text(encoding="utf-8"))
                if not isinstance(saved, dict):
                    raise ValueError("not an object")
            except (ValueError, UnicodeDecodeError):
                raise StepsaverError(
                    f"{meta_path} is empty or corrupt, so the settings of the labels beside it are unknown; "
                    f"{self.path.name} is untouched. If they were made with the settings you are asking for, "
                    "delete meta.json and rerun (it is rewritten); otherwise label into a new --out folder") from None
            asked = self.config.identity()
            if "weights" not in saved and asked["weights"] is not None:
                raise StepsaverError(
                    f"{meta_path} does not record which weights of {saved.get('model')!r} made these labels "
                    f"(written before weights were fingerprinted); if they are the current ones, add "
                    f'"weights": "{asked["weights"]}" to it, otherwise label into a new --out folder')
            if saved != asked:
                diff = {k: (saved.get(k), v) for k, v in asked.items() if saved.get(k) != v}
                hint = (" (the model's weights changed since: the labels describe the old ones)"
                        if "weights" in diff else "")
                raise StepsaverError(f"{self.root} holds labels made with other settings {diff} (saved, asked){hint}; "
                                     "use a new --out folder or the same settings")
        else:
            write_atomically(meta_path, lambda tmp: tmp.write_text(json.dumps(self.config.identity(), indent=1)))
        self.done = {row["prompt"] for row in self.rows()}

    @property
    def path(self) -> Path:
        return self.root / LABELS_FILE

    def rows(self) -> Iterator[dict[str, Any]]:
        """Finished rows; a torn last line (a kill mid-write) is ignored, and rewritten on resume."""
        if not self.path.exists():
            return
        with self.path.open(encoding="utf-8") as f:
            for line in f:
                try:
                    yield json.loads(line)
                except json.JSONDecodeError:
                    continue

    def render_path(self, prompt: str) -> Path:
        """Where the sweep's renders of ``prompt`` are kept (``[K,H,W,3]`` uint8, K = grid size)."""
        return self.root / "renders" / f"{hashlib.sha1(prompt.encode()).hexdigest()[:20]}.npy"

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append finished rows (their renders first, so a labelled row always has its images)."""
        fresh = [r for r in rows if r["prompt"] not in self.done]
        if not fresh:
            return
        for r in fresh:
            images = r.pop("images", None)
            if images is not None:
                path = self.render_path(r["prompt"])
                path.parent.mkdir(exist_ok=True)
                np.save(path.with_suffix(".tmp.npy"), images)
                os.replace(path.with_suffix(".tmp.npy"), path)
                r["renders"] = str(path.relative_to(self.root))
        self._repair_tail()
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in fresh))
            f.flush()
            os.fsync(f.fileno())
        self.done.update(r["prompt"] for r in fresh)

    def _repair_tail(self) -> None:
        """Cut a partial last line left by a killed writer, so the next append starts clean."""
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with self.path.open("rb+") as f:
            data = f.read()
            if data.endswith(b"\n"):
                return
            f.truncate(data.rfind(b"\n") + 1)

    def to_parquet(self) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        out = self.root / "labels.parquet"
        pq.write_table(pa.Table.from_pylist(list(self.rows())), out)
        return out


def _batches(prompts: list[str], size: int) -> list[list[str]]:
    return [prompts[i:i + size] for i in range(0, len(prompts), size)]


def label_prompts(prompts: Sequence[str], out: str | Path, config: LabelConfig = LabelConfig(), *,
                  batch: int = 16, workers: int = 1, device: str = "auto", ray_address: str | None = None,
                  on_batch: Callable[[int], None] | None = None, pipe=None,
                  save_images: bool = False) -> LabelStore:
    """Label every prompt not yet in ``out`` and return the store.

    ``workers == 1`` labels in this process; ``workers > 1`` starts that many Ray actors (a local
    Ray, or the cluster at ``ray_address`` / ``RAY_ADDRESS``), each with its own pipeline, and
    this process alone writes, so the output has no duplicates whatever order batches finish in.
    ``on_batch(n)`` is called with the number of prompts each finished batch added;
    ``save_images`` keeps every render under ``out/renders/``.
    """
    if batch < 1 or workers < 1:
        raise StepsaverError(f"batch and workers must be >= 1, got batch={batch}, workers={workers}")
    with exclusive_folder(out, "labelling run"):
        return _label_into(prompts, out, config, batch=batch, workers=workers, device=device,
                           ray_address=ray_address, on_batch=on_batch, pipe=pipe, save_images=save_images)


def _label_into(prompts: Sequence[str], out: str | Path, config: LabelConfig, *, batch: int, workers: int,
                device: str, ray_address: str | None, on_batch: Callable[[int], None] | None, pipe,
                save_images: bool) -> LabelStore:
    store = LabelStore(Path(out), config)
    unique = list(dict.fromkeys(p.strip() for p in prompts if p and p.strip()))
    todo = [p for p in unique if p not in store.done]
    if on_batch:
        on_batch(0)
    if not todo:
        return store
    batches = _batches(todo, batch)
    if workers == 1:
        labeler = Labeler(config, device=device, pipe=pipe)
        for chunk in batches:
            store.append(labeler.label(chunk, keep_images=save_images))
            if on_batch:
                on_batch(len(chunk))
        return store
    import ray.exceptions

    try:
        for rows in _ray_label(batches, config, workers, device, ray_address, save_images):
            store.append(rows)
            if on_batch:
                on_batch(len(rows))
    except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as exc:
        raise StepsaverError(f"a Ray label worker died ({type(exc).__name__}); {len(store.done)} labelled prompts "
                             "are saved: run the same command again to resume") from None
    return store


def _ray_label(batches: list[list[str]], config: LabelConfig, workers: int, device: str,
               ray_address: str | None, save_images: bool) -> Iterator[list[dict[str, Any]]]:
    import ray
    from ray.util import ActorPool

    address = ray_address or os.environ.get("RAY_ADDRESS")
    if not ray.is_initialized():
        ray.init(address=address, include_dashboard=False, log_to_driver=False, configure_logging=False)
    cpus = max(1, int(ray.available_resources().get("CPU", workers)) // workers)

    @ray.remote(num_cpus=cpus)
    class LabelWorker:
        def __init__(self, cfg: LabelConfig, dev: str, threads: int) -> None:
            torch.set_num_threads(threads)
            self.labeler = Labeler(cfg, device=dev)

        def label(self, chunk: list[str]) -> list[dict[str, Any]]:
            return self.labeler.label(chunk, keep_images=save_images)

    actors = [LabelWorker.remote(config, device, cpus) for _ in range(workers)]
    try:
        pool = ActorPool(actors)
        yield from pool.map_unordered(lambda a, chunk: a.label.remote(chunk), batches)
    finally:
        for a in actors:
            ray.kill(a)


def label_file(prompts: Sequence[str], out: str | Path, config: LabelConfig, *, batch: int = 16, workers: int = 1,
               device: str = "auto", ray_address: str | None = None, save_images: bool = False,
               rule: str = "first-decline", progress: bool = True, console: Any = None) -> dict[str, Any]:
    """:func:`label_prompts` with a progress bar that starts at what an earlier run already labelled.

    Returns the summary ``stepsaver label`` prints: rows labelled (old and new), prompts/hour of
    this run, the label counts under ``rule`` and the parquet file written beside the jsonl.
    """
    import collections

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from stepsaver.predict.rules import RULES

    if rule not in RULES:
        raise StepsaverError(f"unknown --rule {rule!r}; choose one of {', '.join(RULES)}")
    texts = list(prompts)
    if not texts:
        raise StepsaverError("no prompts to label")
    total = len(dict.fromkeys(texts))
    t0 = time.perf_counter()
    fresh = [0]
    with Progress(TextColumn("labelling"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeRemainingColumn(), console=console, disable=not progress) as bar:
        task = bar.add_task("label", total=total, rate="")

        def advance(n: int) -> None:
            if n == 0:  # first call: prompts already labelled by an earlier run
                bar.update(task, completed=len(LabelStore(Path(out), config).done & set(texts)))
                return
            fresh[0] += n
            rate = fresh[0] / (time.perf_counter() - t0) * 3600
            bar.update(task, advance=n, rate=f"{rate:,.0f} prompts/h")

        store = label_prompts(texts, out, config, batch=batch, workers=workers, device=device,
                              ray_address=ray_address, on_batch=advance, save_images=save_images)
    elapsed = time.perf_counter() - t0
    parquet = store.to_parquet()
    key = "label_first_decline" if rule == "first-decline" else "label_converged"
    rows = [r for r in store.rows() if r["prompt"] in set(texts)]
    counts = collections.Counter(r[key] for r in rows)
    return {"labelled": len(rows), "new": fresh[0], "seconds": round(elapsed, 1),
            "prompts_per_hour": round(fresh[0] / elapsed * 3600, 1) if fresh[0] else None,
            "rule": rule, "labels": dict(sorted(counts.items())), "out": str(parquet)}

