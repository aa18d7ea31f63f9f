"""Atomic training checkpoints, so a killed run loses nothing that was written.

The file is written to a temporary name and renamed into place: a kill during the write leaves
the previous checkpoint intact instead of a truncated one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch


def save_checkpoint(path: Path, model: torch.nn.Module, opt: Any, sched: Any, step: int, **extra: Any) -> None:
    tmp = path.with_suffix(".tmp")
    state = {"model": model.state_dict(), "opt": opt.state_dict(), "sched": sched.state_dict(),
             "step": step, **extra}
    torch.save(state, tmp)
    os.replace(tmp, path)


def load_checkpoint(path: Path, model: torch.nn.Module, opt: Any, sched: Any) -> int:
    """Restore model, optimiser and LR schedule in place; returns the step to continue from."""
    state = torch.load(path, map_location="cpu", weights_only=False)
    model.load_state_dict(state["model"])
    opt.load_state_dict(state["opt"])
    sched.load_state_dict(state["sched"])
    return int(state["step"])
