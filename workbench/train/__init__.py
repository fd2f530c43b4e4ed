"""Training: run configs, the trainer, the run store, sweeps (metrics re-exported from :mod:`workbench.eval`)."""

from ..eval import (
    accuracy_by_type,
    caption_scores,
    exact_match,
    normalize_answer,
    vqa_accuracy,
)
from .config import RunConfig
from .loop import NonFiniteLossError, RestoredRun, RunResult, load_results, load_run, restore_run, run
from .store import DamagedRunError, DamagedRunWarning, RunStore, StoreNotWritableError
from .sweeps import compare, grid, summarize, sweep

__all__ = [
    "DamagedRunError",
    "DamagedRunWarning",
    "NonFiniteLossError",
    "RunConfig",
    "RestoredRun",
    "RunResult",
    "RunStore",
    "StoreNotWritableError",
    "accuracy_by_type",
    "caption_scores",
    "compare",
    "exact_match",
    "grid",
    "load_results",
    "load_run",
    "normalize_answer",
    "restore_run",
    "run",
    "summarize",
    "sweep",
    "vqa_accuracy",
]
