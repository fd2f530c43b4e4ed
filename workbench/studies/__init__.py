"""Studies: each paper's experiments as code, and the model-aware analyses they show.

This layer sits above ``methods`` and ``train``: an analysis here may apply a method, train a run
and read a model's activations (:func:`workbench.models.capture`) before handing the tensors to the
pure maths of :mod:`workbench.probes`.

- :func:`redundancy_analysis`: MixPHM's redundancy / task-correlation analysis (RSA, CKA, MI
  between a method module's contribution and the frozen or the final representation), for every
  sub-layer method.
- :class:`Study` (a name, its grids, the analyses its notebook shows), registered with
  :func:`register_study`; :func:`run_study` trains it (resuming from the run store),
  :func:`export_study` writes its bundle under ``results/<name>/``, :func:`load_study` reads the
  bundle as a run store, :func:`verify_study` re-trains a sample and compares. The CLI is
  ``python -m workbench.studies {list,run,export,status,verify} NAME`` (docs/studies.md).
- ``gallery``: every registered method on shapes-vqa at N = 16, 64, 1000 over three seeds.
- ``mixphm`` (:mod:`.mixphm`, imported on first use): MixPHM's low-resource table, its ablations,
  the redundancy analysis of its section 3.1, its inference merges and routing, and the verdicts.
- ``vlpet`` (:mod:`.vlpet`): VL-PET's granularities against cost, its lightweight designs, the gates
  after training, the "+G + LW" transfer.
- ``petal`` (:mod:`.petal`): PETAL against LoRA, VL-PET and full fine-tuning, and its ablations
  (modes, threshold, mixture, bottleneck, released variant), mode gates over training, routing.
- ``empirical`` (:mod:`.empirical`): data size x parameter size for five methods on a task
  consistent with pre-training and one that is not (arXiv 2403.08433).
"""

from . import gallery  # noqa: F401 - registers the gallery study
from .bundle import (
    TOLERANCE,
    DamagedBundleError,
    ExportReport,
    RunCheck,
    StudyStatus,
    StudyStore,
    VerificationError,
    VerifyReport,
    bundle_dir,
    bundles,
    current_machine,
    export_study,
    held_elsewhere,
    load_study,
    results_root,
    study_status,
    verify,
    verify_study,
)
from ._common import seeds_to_settle, t_interval
from .redundancy import BAND_COLUMNS, COLUMNS, MEASURES, TARGETS, redundancy_analysis
from .study import (
    Study,
    get_study,
    list_studies,
    register_study,
    retarget,
    run_study,
    unregister_study,
)

__all__ = [
    "COLUMNS",
    "BAND_COLUMNS",
    "MEASURES",
    "TARGETS",
    "TOLERANCE",
    "DamagedBundleError",
    "ExportReport",
    "RunCheck",
    "Study",
    "StudyStatus",
    "StudyStore",
    "VerificationError",
    "VerifyReport",
    "bundle_dir",
    "bundles",
    "current_machine",
    "export_study",
    "held_elsewhere",
    "get_study",
    "list_studies",
    "load_study",
    "redundancy_analysis",
    "register_study",
    "results_root",
    "retarget",
    "run_study",
    "seeds_to_settle",
    "study_status",
    "t_interval",
    "unregister_study",
    "verify",
    "verify_study",
]
