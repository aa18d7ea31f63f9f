"""``stepsaver serve`` (the HTTP service) and ``stepsaver study ...`` (preference studies)."""

from __future__ import annotations

from pathlib import Path

import typer

from stepsaver.cli.render import Col, JsonOpt, command, emit, emit_rows, err_console
from stepsaver.errors import StepsaverError

app = typer.Typer(no_args_is_help=True)


@app.command()
@command
def serve(
    host: str = typer.Option("127.0.0.1", "--host"),
    port: int = typer.Option(8000, "--port"),
    model: str | None = typer.Option(None, "--model", "-m", help="Pipeline to serve (default 'tiny')."),
    recommender: str | None = typer.Option(None, "--recommender", "-r"),
    config: Path | None = typer.Option(None, "--config", help="JSON settings file (token, limits, batching)."),
    insecure: bool = typer.Option(False, "--insecure", help="Serve /v1/generate without a bearer token."),
    workers: int | None = typer.Option(None, "--workers", help="Generation threads (one pipeline each)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Most prompts batched into one call."),
    queue_size: int | None = typer.Option(None, "--queue-size", help="Waiting generate jobs before 503."),
    replicas: int | None = typer.Option(None, "--replicas", help="Deploy N replicas on Ray Serve instead."),
    ray_address: str | None = typer.Option(None, "--ray-address", help="ray:// cluster (default: local Ray)."),
    study_db: str | None = typer.Option(None, "--study-db", help="SQLite file of preference studies."),
) -> None:
    """Run the HTTP service: /v1/recommend, /v1/generate, /healthz, /metrics, /docs."""
    from stepsaver.serve.settings import MIN_TOKEN_CHARS, ServeSettings

    settings = ServeSettings.load(config, model=model, recommender=recommender, insecure=insecure or None,
                                  workers=workers, batch_size=batch_size, queue_size=queue_size, study_db=study_db)
    if settings.token is None and not settings.insecure:
        raise StepsaverError("no token configured (STEPSAVER_TOKEN is unset or blank): set STEPSAVER_TOKEN (or "
                             f"`token` in --config) to at least {MIN_TOKEN_CHARS} characters to protect "
                             "/v1/generate, or pass --insecure")
    where = f"Ray Serve, {replicas} replicas" if replicas else "uvicorn"
    err_console.print(f"stepsaver serving model [bold]{settings.model}[/bold] at http://{host}:{port} ({where}); "
                      f"token {'set' if settings.token else 'NOT set (--insecure)'}; docs at /docs. Ctrl-C drains.",
                      highlight=False)
    if replicas:
        from stepsaver.serve.ray_app import serve_on_ray

        serve_on_ray(settings, replicas, host, port, ray_address)
        return
    import uvicorn

    from stepsaver.serve.app import create_app

    uvicorn.run(create_app(settings), host=host, port=port, log_level="warning", timeout_graceful_shutdown=60)

study_app = typer.Typer(no_args_is_help=True, help="Side-by-side preference studies (DeciDiffusion's survey).")


@study_app.command("create")
@command
def study_create(
    a: str = typer.Option(..., "--a", help="Config A, e.g. 'steps=50'."),
    b: str = typer.Option(..., "--b", help="Config B, e.g. 'steps=auto,skip'."),
    prompts: Path = typer.Option(..., "--prompts", "-p", help="Prompt file (txt/csv/tsv/jsonl/parquet)."),
    n: int = typer.Option(10, "--n", help="Prompts to use."),
    per_prompt: int = typer.Option(1, "--per-prompt", help="Seeds (pairs) per prompt."),
    db: Path = typer.Option(Path("runs/study.sqlite"), "--db"),
    root: Path = typer.Option(Path("runs/studies"), "--dir", help="Where the pair images go."),
    as_json: bool = JsonOpt,
) -> None:
    """Render the pairs of a study; serve it with `stepsaver serve` at /study/<id>."""
    from stepsaver.predict.prompts import read_prompts
    from stepsaver.serve.study import create_study, parse_config

    parse_config(a), parse_config(b)  # fail fast
    texts = read_prompts(prompts)[:n]
    study = create_study(db, root, a, b, texts, per_prompt=per_prompt, progress=not as_json)
    emit({"study": study, "pairs": len(texts) * per_prompt, "url": f"/study/{study}", "db": str(db)}, as_json,
          "study")


@study_app.command("results")
@command
def study_results(
    study: str = typer.Argument(..., help="Study id."),
    db: Path = typer.Option(Path("runs/study.sqlite"), "--db"),
    as_json: bool = JsonOpt,
) -> None:
    """Win/tie/loss rates per question with 95% intervals."""
    from stepsaver.serve.study import QUESTIONS, connect, results

    if not db.exists():
        raise StepsaverError(f"study database {db} does not exist")
    res = results(connect(db), study)
    rows = [{"question": res[q]["question"], **{k: res[q][k] for k in ("b_wins", "tie", "a_wins")}} for q in QUESTIONS]
    rate = lambda k: lambda r: f"{r[k]['rate']:.0%} [{r[k]['ci95'][0]:.0%}, {r[k]['ci95'][1]:.0%}]"  # noqa: E731
    emit_rows(rows, [Col("question", "question"), Col("B wins", rate("b_wins")), Col("same", rate("tie")),
                     Col("A wins", rate("a_wins"))], as_json,
              f"study {study}: A={res['a']} B={res['b']}, {res['votes']} votes", payload=res)
