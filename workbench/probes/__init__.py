"""Representation probes: pure functions over ``[n_samples, n_features]`` tensors or arrays.

RSA (:mod:`.rsa`), CKA/HSIC (:mod:`.cka`), mutual information in nats (:mod:`.mi`) and
mixture-of-experts routing statistics (:mod:`.routing`), with permutation nulls and
bootstrap intervals for the similarities (:mod:`.resampling`). Everything computes in float64 on the
input's device and validates its inputs (see :mod:`._checks`). Formulas, ground truths and
peer libraries: ``docs/probes.md``.

This package is pure maths: it imports nothing else of the workbench, so anyone may use it (MixPHM
and PETAL use the MI estimators in their losses). Reading activations out of a model is the
model's job (:func:`workbench.models.capture`); the analyses that combine both, such as
:func:`workbench.studies.redundancy_analysis`, live above the methods.
"""

from ._checks import DegenerateInputWarning
from .cka import MinibatchCKA, center_gram, cka, cka_matrix, gram_linear, gram_rbf, hsic
from .mi import (
    ESTIMATORS,
    ConcatCritic,
    SeparableCritic,
    correlated_gaussians,
    dv,
    estimate_mi,
    gaussian_critic,
    gaussian_mi,
    infonce,
    js,
    mi_binned,
    mi_ksg,
    mine,
    nwj,
    rho_for_mi,
    smile,
)
from .resampling import SIMILARITY_MEASURES, Resampled, bootstrap_ci, permutation_test, similarity_test
from .routing import expert_similarity, routing_stats
from .rsa import compare_rdms, compare_rdms_batched, rankdata, rdm, upper_triangle

__all__ = [
    "DegenerateInputWarning",
    # RSA
    "rdm",
    "upper_triangle",
    "compare_rdms",
    "compare_rdms_batched",
    "rankdata",
    # CKA
    "cka",
    "cka_matrix",
    "hsic",
    "gram_linear",
    "gram_rbf",
    "center_gram",
    "MinibatchCKA",
    # MI (nats)
    "ESTIMATORS",
    "mi_ksg",
    "mi_binned",
    "infonce",
    "nwj",
    "dv",
    "mine",
    "js",
    "smile",
    "SeparableCritic",
    "ConcatCritic",
    "estimate_mi",
    "gaussian_mi",
    "rho_for_mi",
    "correlated_gaussians",
    "gaussian_critic",
    # null bands and intervals
    "similarity_test",
    "permutation_test",
    "bootstrap_ci",
    "Resampled",
    "SIMILARITY_MEASURES",
    # routing
    "routing_stats",
    "expert_similarity",
]
