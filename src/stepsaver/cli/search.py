"""``stepsaver shrink search``: time, train (proxy schedule), score and report UNet layouts under a latency budget."""

from __future__ import annotations

from pathlib import Path

import typer

from stepsaver.cli.render import Col, JsonOpt, command, emit_rows
from stepsaver.errors import StepsaverError

LAYOUT_COLUMNS = [Col("candidate", "candidate"), Col("res", "resnets"), Col("att dn", "attn_down"),
                  Col("att up", "attn_up"), Col("mid", "attn_mid"), Col("ch", "channels"),
                  Col("params", lambda r: r["params"] / 1e6, "{:.2f}M")]
LATENCY_COLUMNS = [*LAYOUT_COLUMNS, Col("ms", "latency_ms", "{:.1f}"), Col("ratio", "latency_ratio", "{:.3f}"),
                   Col("speedup", "speedup", "{:.2f}x")]
SEARCH_COLUMNS = [LAYOUT_COLUMNS[0], LAYOUT_COLUMNS[-1], *LATENCY_COLUMNS[-2:], Col("FID", "fid", "{:.2f}"),
                  Col("adherence", "adherence", "{:.3f}"), Col("Pareto", lambda r: "yes" if r["pareto"] else ""),
                  Col("in budget", lambda r: "yes" if r["in_budget"] else "")]


@command
def search_cmd(
    out: Path = typer.Option(Path("runs/search"), "--out", help="One run folder per candidate (resumable)."),
    proxy_steps: int = typer.Option(1000, "--proxy-steps", help="Training steps every candidate gets (same schedule)."),
    budget: float = typer.Option(0.714, "--budget",
                                 help="Largest latency ratio (candidate / baseline per iteration) a winner may have; "
                                      "0.714 = 1.4x faster."),
    n: int = typer.Option(200, "--n", help="Held-out prompts scored per candidate."),
    steps: int = typer.Option(30, "--steps", help="DDIM steps of the scored images."),
    candidates: str | None = typer.Option(None, "--candidates", "-c",
                                          help="Comma list of candidate names (default: all; the baseline is always "
                                               "included)."),
    latency_only: bool = typer.Option(False, "--latency-only",
                                      help="Only measure and print parameters and latencies; no training."),
    repeats: int = typer.Option(20, "--repeats", help="Timed calls per side (median)."),
    batch_size: int = typer.Option(64, "--batch-size", help="Training batch size."),
    scenes: int = typer.Option(40000, "--scenes", help="Training scenes (precomputed once, shared)."),
    vae: Path | None = typer.Option(None, "--vae", help="Autoencoder folder (default: the shipped model's)."),
    cache: Path = typer.Option(Path("runs/cache"), "--cache", help="Where scenes, embeddings and moments go."),
    results: Path = typer.Option(Path("docs/results"), "--results", help="Where architecture.{md,json,png} go."),
    seed: int = typer.Option(0, "--seed"),
    max_minutes: float | None = typer.Option(None, "--max-minutes",
                                             help="Stop training (checkpointed, resumable) after this long."),
    ledger: Path = typer.Option(Path("docs/results/architecture-ledger"), "--ledger",
                                help="Finished candidates' scores (small; commit them): a search continues from "
                                     "them in another session, without its run folders."),
    as_json: bool = JsonOpt,
) -> None:
    """A small UNet architecture search (DeciDiffusion's AutoNAC, small): per-stage resnets, attention placement
    and widths, trained with one proxy schedule, scored by FID/adherence vs latency; writes the Pareto report."""
    import torch

    from stepsaver.shrink.search import budget_check, default_base, measure_latencies, parse_candidates, search

    layouts = parse_candidates(candidates)  # every input is checked before anything is built
    if repeats < 1:
        raise StepsaverError(f"--repeats must be >= 1, got {repeats}")
    if not budget > 0:
        raise StepsaverError(f"--budget is a latency ratio (candidate / baseline) and must be > 0, got {budget}")
    if latency_only:
        rows = measure_latencies(layouts, repeats=repeats, seed=seed, progress=not as_json)
        check = budget_check(rows, budget)
        emit_rows(rows, LATENCY_COLUMNS, as_json,
                  f"UNet layouts: per-iteration latency (CFG batch 2, {torch.get_num_threads()} threads)",
                  payload={"rows": rows, "budget": check}, notes=[check["note"]])
        return
    if proxy_steps <= 0 or batch_size <= 0 or scenes <= 0:
        raise StepsaverError("--proxy-steps, --batch-size and --scenes must be positive")
    base = default_base(batch_size=batch_size, scenes=scenes, cache=str(cache), seed=seed,
                        **({} if vae is None else {"vae": str(vae)}))
    result = search(base, out_dir=out, layouts=layouts, proxy_steps=proxy_steps, budget=budget, n=n, steps=steps,
                    seed=seed, latency_repeats=repeats, results_dir=results, progress=not as_json,
                    max_minutes=max_minutes, ledger_dir=ledger)
    from stepsaver.shrink.search import verdict_text

    emit_rows(result["rows"], SEARCH_COLUMNS, as_json, f"UNet layouts after {proxy_steps} proxy steps",
              payload={k: v for k, v in result.items() if k != "training"},
              notes=[result["budget"]["note"], f"Pareto set: {', '.join(result['pareto'])}; winner: {result['winner']}",
                     verdict_text(result).replace("**", ""), f"wrote {result.get('md')}"])
