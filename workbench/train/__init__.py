"""Training: run configs, the trainer, the run store, metrics."""

from .metrics import accuracy_by_type, caption_scores, exact_match, normalize_answer, vqa_accuracy

__all__ = ["accuracy_by_type", "caption_scores", "exact_match", "normalize_answer", "vqa_accuracy"]
