"""Studies: each paper's experiments as code, and the model-aware analyses they show.

This layer sits above ``methods`` and ``train``: an analysis here may apply a method, train a run
and read a model's activations (:func:`workbench.models.capture`) before handing the tensors to the
pure maths of :mod:`workbench.probes`.

- :func:`redundancy_analysis`: MixPHM's redundancy / task-correlation analysis (RSA, CKA, MI
  between a method module's contribution and the frozen or the final representation), for every
  sub-layer method.
"""

from .redundancy import COLUMNS, MEASURES, TARGETS, redundancy_analysis

__all__ = ["COLUMNS", "MEASURES", "TARGETS", "redundancy_analysis"]
