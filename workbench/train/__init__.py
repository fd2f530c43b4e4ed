"""Training: run configs, the trainer, the run store (metrics re-exported from :mod:`workbench.eval`)."""

from ..eval import accuracy_by_type, caption_scores, exact_match, normalize_answer, vqa_accuracy
from .config import RunConfig
from .loop import NonFiniteLossError, RunResult, load_results, load_run, run
from .store import RunStore

__all__ = [
    "NonFiniteLossError",
    "RunConfig",
    "RunResult",
    "RunStore",
    "accuracy_by_type",
    "caption_scores",
    "exact_match",
    "load_results",
    "load_run",
    "normalize_answer",
    "run",
    "vqa_accuracy",
]
