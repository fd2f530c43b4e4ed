"""Representation probes: pure functions over ``[n_samples, n_features]`` tensors or arrays.

RSA (:mod:`.rsa`), CKA/HSIC (:mod:`.cka`), mutual information in nats (:mod:`.mi`) and
mixture-of-experts routing statistics (:mod:`.routing`); activation capture on the VL backbone
(:mod:`.capture`) and the redundancy / task-correlation analysis of method modules
(:mod:`.redundancy`). Everything computes in float64 on the
input's device and validates its inputs (see :mod:`._checks`). Formulas, ground truths and
peer libraries: ``shared/spec/probes.md``.
"""

from ._checks import DegenerateInputWarning
from .capture import Activations, available_points, capture
from .cka import MinibatchCKA, center_gram, cka, cka_matrix, gram_linear, gram_rbf, hsic
from .mi import (
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
from .redundancy import redundancy_analysis
from .routing import expert_similarity, routing_stats
from .rsa import compare_rdms, compare_rdms_batched, rankdata, rdm, upper_triangle

__all__ = [
    "DegenerateInputWarning",
    # activation capture and the redundancy analysis (need a workbench VLModel)
    "capture",
    "available_points",
    "Activations",
    "redundancy_analysis",
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
    # routing
    "routing_stats",
    "expert_similarity",
]
