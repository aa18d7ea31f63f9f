"""The ``stepsaver`` command line: one sub-app per verb, each command parse -> one library call -> rows.

``stepsaver generate | schedulers | scenes | samples`` work on the core, ``calibrate`` searches a
config for them; ``predict``, ``shrink``,
``measure``, ``bench`` and ``study`` are sub-apps (:mod:`stepsaver.cli.predict`, ...); ``serve``
runs the service. The flat names of earlier releases (``stepsaver label``, ``train-model``, ...)
stay as hidden aliases so existing scripts keep working. Every command prints through
:mod:`stepsaver.cli.render` (a Rich table, or one JSON object with ``--json``); a
:class:`~stepsaver.errors.StepsaverError` is one line on stderr and exit code 2.

Nothing heavy is imported here: library imports happen inside the commands, so ``stepsaver
--help`` does not load torch.
"""

from __future__ import annotations

import sys
from types import ModuleType

import typer

from stepsaver.cli import bench, calibrate, core, measure, optimize, predict, serve, shrink

app = typer.Typer(add_completion=False, no_args_is_help=True,
                  help="stepsaver: spend only the denoising steps each prompt needs.")

for info in (core.app.registered_commands + calibrate.app.registered_commands + optimize.app.registered_commands
             + serve.app.registered_commands):
    app.registered_commands.append(info)
app.add_typer(predict.app, name="predict")
app.add_typer(shrink.app, name="shrink")
app.add_typer(measure.app, name="measure")
app.add_typer(bench.app, name="bench")
app.add_typer(serve.study_app, name="study")


def _aliases(module: ModuleType) -> None:
    """Register ``module.FLAT`` (flat name -> sub-app command name) on the root app, hidden."""
    by_name = {info.name: info for info in module.app.registered_commands}
    for flat, name in module.FLAT.items():
        app.command(flat, hidden=True, help=by_name[name].callback.__doc__)(by_name[name].callback)


for _module in (predict, shrink, measure):
    _aliases(_module)


def main() -> None:  # pragma: no cover - console entry point
    app()


if __name__ == "__main__":  # pragma: no cover
    sys.exit(app())
