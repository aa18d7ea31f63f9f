"""The StepSaver sweep: render each prompt at every step count of a grid, score, label.

:class:`Labeler` holds one pipeline and labels a batch of prompts: every prompt starts from the
same initial noise at every step count (``seed``), prompts are batched through the pipeline
together, and the result rows keep every similarity so any rule or threshold can be re-applied
later without re-rendering. :func:`label_prompts` drives a labeller (or N Ray actors, each with
its own pipeline) over a prompt list and appends finished rows to ``labels.jsonl`` one batch at
a time, so a killed run resumes where it stopped and never relabels a finished prompt.

``LabelConfig(n_seeds=N)`` labels every prompt from N initial noises, seeds ``seed .. seed+N-1``,
one row per (prompt, seed): the label varies with the noise as much as with the prompt, and only
several seeds per prompt measure how much (:func:`stepsaver.predict.dataset.predictability`).
Seed ``seed`` is the single-seed run of before, row for row, so ``n_seeds=1`` changes nothing.
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
    n_seeds: int = 1  # initial noises per prompt: seeds seed, seed+1, ..., seed+n_seeds-1

    def __post_init__(self) -> None:
        object.__setattr__(self, "steps", check_grid(self.steps))
        object.__setattr__(self, "call_kwargs", tuple(sorted(dict(self.call_kwargs).items())))
        if isinstance(self.n_seeds, bool) or not isinstance(self.n_seeds, int) or self.n_seeds < 1:
            raise StepsaverError(f"--seeds must be an integer >= 1, got {self.n_seeds!r}")
        if self.n_seeds > 1:
            from stepsaver.generation import validate_seed

            validate_seed(self.seed)
            validate_seed(self.seed + self.n_seeds - 1)

    @property
    def seeds(self) -> tuple[int, ...]:
        """The initial noises every prompt is labelled from; the first is ``seed``, today's single one."""
        return tuple(range(self.seed, self.seed + self.n_seeds))

    def identity(self) -> dict[str, Any]:
        """The settings that change the renders (tau only changes a derived column).

        ``weights`` fingerprints the model's files: the name ``tiny`` survives a retrain of the
        embedded model, and a resumed run must not append labels of other weights. ``n_seeds``
        is not part of it: each row records its seed and its render does not depend on how many
        other seeds there are, so a folder labelled with one seed can grow to three in place
        (the measurement that tells whether the text predicts the label at all).
        """
        from stepsaver.pipelines import weights_fingerprint

        d = asdict(self)
        d.pop("tau")
        d.pop("n_seeds")
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

    def render(self, prompts: Sequence[str], seeds: Sequence[int] | None = None
               ) -> tuple[dict[int, np.ndarray], dict[int, float]]:
        """``{steps: images[N,H,W,3] float}`` and seconds per prompt for each step count.

        Prompt ``i`` starts from the noise of ``seeds[i]`` (default: ``config.seed`` for all),
        what ``generate(..., seed)`` draws, so batching changes nothing and a batch may mix
        seeds; UNet and transformer pipelines alike.
        """
        from stepsaver.generation import generate_images, validate_request

        for p in prompts:
            validate_request(p, self.config.steps[-1], self.config.guidance)
        noise = self.config.seed if seeds is None else list(seeds)
        renders, seconds = {}, {}
        for n in self.config.steps:
            results = generate_images(self.pipe, list(prompts), steps=n, seeds=noise,
                                      guidance=self.config.guidance, output_type="np", **dict(self.config.call_kwargs))
            seconds[n] = results[0].seconds / len(prompts)
            renders[n] = np.stack([np.asarray(r.image, dtype=np.float32) for r in results])
        return renders, seconds

    def label(self, prompts: Sequence[str], keep_images: bool = False,
              seeds: Sequence[int] | None = None) -> list[dict[str, Any]]:
        """Render, score and label a batch; one row per prompt (per ``(prompts[i], seeds[i])``).

        ``keep_images`` adds each prompt's renders as ``row["images"]`` (``[K,H,W,3]`` uint8), which
        the store saves beside the labels: the sweep already made every fixed-step image a
        benchmark needs, so keeping them saves a second sweep. ``seeds`` (one per prompt,
        default ``config.seed``) is recorded in each row's ``seed``.
        """
        from stepsaver.measure.quality import ssim

        cfg = self.config
        if seeds is not None and len(seeds) != len(prompts):
            raise StepsaverError(f"got {len(seeds)} seeds for {len(prompts)} prompts; pass one seed per prompt")
        row_seeds = [cfg.seed] * len(prompts) if seeds is None else [int(s) for s in seeds]
        renders, seconds = self.render(prompts, seeds)
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
                "seed": row_seeds[i],
                "guidance": cfg.guidance,
            })
            if keep_images:
                rows[-1]["images"] = (stack[i].permute(0, 2, 3, 1).numpy() * 255).round().clip(0, 255).astype(np.uint8)
        return rows


@dataclass
class LabelStore:
    """``labels.jsonl`` + ``meta.json`` in a folder: append-only, one flushed line per (prompt, seed).

    ``pairs`` holds every labelled ``(prompt, seed)``; ``done`` the prompts labelled at every
    seed of the config (with one seed: the labelled prompts, as before seeds existed). A row
    without a ``seed`` field was made with the folder's ``seed``.
    """

    root: Path
    config: LabelConfig
    done: set[str] = field(default_factory=set)
    pairs: set[tuple[str, int]] = field(default_factory=set)

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
        self.pairs = {self.pair(row) for row in self.rows()}
        self.done = self._complete({p for p, _ in self.pairs})

    @property
    def path(self) -> Path:
        return self.root / LABELS_FILE

    def pair(self, row: dict[str, Any]) -> tuple[str, int]:
        """A row's ``(prompt, seed)``; files written before seeds carry the folder's seed or none."""
        seed = row.get("seed")
        return row["prompt"], self.config.seed if seed is None else int(seed)

    def _complete(self, prompts: set[str]) -> set[str]:
        return {p for p in prompts if all((p, s) in self.pairs for s in self.config.seeds)}

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

    def render_path(self, prompt: str, seed: int | None = None) -> Path:
        """Where the sweep's renders of ``prompt`` from ``seed`` are kept (``[K,H,W,3]`` uint8, K = grid size).

        The folder's own seed (the default) keeps the name of before seeds existed, so readers
        of single-seed folders (bench flexi) find them; other seeds add ``-seed<N>``.
        """
        stem = hashlib.sha1(prompt.encode()).hexdigest()[:20]
        if seed is not None and seed != self.config.seed:
            stem += f"-seed{seed}"
        return self.root / "renders" / f"{stem}.npy"

    def append(self, rows: list[dict[str, Any]]) -> None:
        """Append finished rows (their renders first, so a labelled row always has its images)."""
        fresh, seen = [], set()
        for r in rows:
            key = self.pair(r)
            if key not in self.pairs and key not in seen:
                seen.add(key)
                fresh.append(r)
        if not fresh:
            return
        for r in fresh:
            images = r.pop("images", None)
            if images is not None:
                path = self.render_path(*self.pair(r))
                path.parent.mkdir(exist_ok=True)
                np.save(path.with_suffix(".tmp.npy"), images)
                os.replace(path.with_suffix(".tmp.npy"), path)
                r["renders"] = str(path.relative_to(self.root))
        self._repair_tail()
        with self.path.open("a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in fresh))
            f.flush()
            os.fsync(f.fileno())
        self.pairs.update(seen)
        self.done |= self._complete({p for p, _ in seen})

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


Batch = tuple[list[str], list[int]]  # prompts and the seed of each


def _batches(pairs: list[tuple[str, int]], size: int) -> list[Batch]:
    chunks = [pairs[i:i + size] for i in range(0, len(pairs), size)]
    return [([p for p, _ in c], [s for _, s in c]) for c in chunks]


def label_prompts(prompts: Sequence[str], out: str | Path, config: LabelConfig = LabelConfig(), *,
                  batch: int = 16, workers: int = 1, device: str = "auto", ray_address: str | None = None,
                  on_batch: Callable[[int], None] | None = None, pipe=None,
                  save_images: bool = False) -> LabelStore:
    """Label every (prompt, seed) not yet in ``out`` and return the store.

    ``workers == 1`` labels in this process; ``workers > 1`` starts that many Ray actors (a local
    Ray, or the cluster at ``ray_address`` / ``RAY_ADDRESS``), each with its own pipeline, and
    this process alone writes, so the output has no duplicates whatever order batches finish in.
    ``on_batch(n)`` is called with the number of rows each finished batch added (prompts, with
    one seed); ``save_images`` keeps every render under ``out/renders/``.

    With ``config.n_seeds > 1`` the work is every (prompt, seed) pair not yet in ``out``, seed by
    seed: the first seed's batches are exactly those of a single-seed run, so its rows are that
    run's to the last digit (batch composition can move float results), and a stopped run has
    labelled every prompt once before any twice. A resumed run skips finished pairs.
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
    todo = [(p, s) for s in config.seeds for p in unique if (p, s) not in store.pairs]
    if on_batch:
        on_batch(0)
    if not todo:
        return store
    batches = _batches(todo, batch)
    if workers == 1:
        labeler = Labeler(config, device=device, pipe=pipe)
        for chunk, seeds in batches:
            store.append(labeler.label(chunk, keep_images=save_images, seeds=seeds))
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
        raise StepsaverError(f"a Ray label worker died ({type(exc).__name__}); {len(store.pairs)} labelled rows "
                             "are saved: run the same command again to resume") from None
    return store


def _ray_label(batches: list[Batch], config: LabelConfig, workers: int, device: str,
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

        def label(self, chunk: Batch) -> list[dict[str, Any]]:
            return self.labeler.label(chunk[0], keep_images=save_images, seeds=chunk[1])

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

    Returns the summary ``stepsaver label`` prints: rows labelled (old and new; one per prompt and
    seed), prompts/hour of this run (a prompt is all its seeds), the label counts under ``rule``
    and the parquet file written beside the jsonl; ``seeds`` and ``prompts`` when ``n_seeds > 1``.
    """
    import collections

    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from stepsaver.predict.rules import RULES

    if rule not in RULES:
        raise StepsaverError(f"unknown --rule {rule!r}; choose one of {', '.join(RULES)}")
    texts = list(prompts)
    if not texts:
        raise StepsaverError("no prompts to label")
    total = len(dict.fromkeys(texts)) * config.n_seeds  # the bar counts (prompt, seed) rows
    wanted = {(p, s) for p in texts for s in config.seeds}
    t0 = time.perf_counter()
    fresh = [0]
    with Progress(TextColumn("labelling"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[rate]}"),
                  TimeRemainingColumn(), console=console, disable=not progress) as bar:
        task = bar.add_task("label", total=total, rate="")

        def advance(n: int) -> None:
            if n == 0:  # first call: rows already labelled by an earlier run
                bar.update(task, completed=len(LabelStore(Path(out), config).pairs & wanted))
                return
            fresh[0] += n
            rate = fresh[0] / config.n_seeds / (time.perf_counter() - t0) * 3600
            bar.update(task, advance=n, rate=f"{rate:,.0f} prompts/h")

        store = label_prompts(texts, out, config, batch=batch, workers=workers, device=device,
                              ray_address=ray_address, on_batch=advance, save_images=save_images)
    elapsed = time.perf_counter() - t0
    parquet = store.to_parquet()
    key = "label_first_decline" if rule == "first-decline" else "label_converged"
    rows = [r for r in store.rows() if store.pair(r) in wanted]
    counts = collections.Counter(r[key] for r in rows)
    summary = {"labelled": len(rows), "new": fresh[0], "seconds": round(elapsed, 1),
               "prompts_per_hour": round(fresh[0] / config.n_seeds / elapsed * 3600, 1) if fresh[0] else None,
               "rule": rule, "labels": dict(sorted(counts.items())), "out": str(parquet)}
    if config.n_seeds > 1:
        summary["seeds"] = list(config.seeds)
        summary["prompts"] = len({r["prompt"] for r in rows})
    return summary

