"""The one way a command prints: a Rich table for people, or exactly one JSON object for programs.

Commands hand over plain rows (dicts) from the library and say which columns to show and how;
this module draws them (``--json`` prints the library's rows themselves). A
:class:`~stepsaver.errors.StepsaverError` becomes one line on stderr and exit code 2.
"""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from stepsaver.errors import StepsaverError
from stepsaver.jsonsafe import dumps

err_console = Console(stderr=True)
out_console = Console()

JsonOpt = typer.Option(False, "--json", help="Print one JSON object on stdout instead of a table.")


def quiet_libraries() -> None:
    """Keep diffusers/transformers chatter (deprecations, type hints) off the user's terminal."""
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    warnings.filterwarnings("ignore", category=UserWarning)
    for name in ("diffusers", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)
    import diffusers.utils.logging as dl
    import transformers.utils.logging as tl

    dl.disable_progress_bar()
    tl.disable_progress_bar()


def command(fn: Callable) -> Callable:
    """Turn StepsaverError into a one-line message and exit code 2."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        quiet_libraries()
        try:
            return fn(*args, **kwargs)
        except StepsaverError as exc:
            if kwargs.get("as_json"):
                print(dumps({"error": str(exc)}))
            err_console.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(code=2) from None

    return wrapper


def batch_sizes(text: str) -> tuple[int, ...]:
    """``--batch 1,8`` as integers (``optimize`` and ``bench optimize`` take the same form)."""
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise StepsaverError(f"--batch must be comma-separated integers, got {text!r}; e.g. --batch 1,8") from None


def log_to_stderr(as_json: bool) -> Callable[[str], None]:
    """A ``log`` callback for library functions: stderr for people, silent under ``--json``."""
    return (lambda _m: None) if as_json else (lambda m: err_console.print(m, highlight=False))


def emit(payload: dict, as_json: bool, title: str) -> None:
    """A key/value result: one JSON object, or a two-column table."""
    if as_json:
        print(dumps(payload, default=str))
        return
    table = Table(title=title, show_header=False, title_justify="left")
    for k, v in payload.items():
        table.add_row(str(k), f"{v:.3f}" if isinstance(v, float) else str(v))
    out_console.print(table)


@dataclass(frozen=True)
class Col:
    """One table column: its header, the row key (or a function of the row) and a format."""

    header: str
    key: str | Callable[[dict], Any]
    fmt: str = "{}"

    def cell(self, row: dict) -> str:
        value = self.key(row) if callable(self.key) else row.get(self.key)
        if value is None:
            return "-"
        return self.fmt.format(value)


def emit_rows(rows: Sequence[dict], columns: Sequence[Col], as_json: bool, title: str,
              payload: Any = None, notes: Sequence[str] = ()) -> None:
    """A table of ``rows`` (and ``notes`` below it), or ``payload`` (default: the rows) as JSON."""
    if as_json:
        print(dumps({"rows": list(rows)} if payload is None else payload, default=str))
        return
    table = Table(*[c.header for c in columns], title=title, title_justify="left")
    for row in rows:
        table.add_row(*[c.cell(row) for c in columns])
    out_console.print(table)
    for note in notes:
        if note:
            out_console.print(escape(note))
