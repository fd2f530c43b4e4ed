# %% [markdown]
# # 03 · Validating the representation probes
#
# Before we use CKA, RSA and mutual-information estimates to say anything about PEFT methods, we
# check that the probes measure what they claim. Every check here has an **independent answer**: a
# published golden value, an analytic ground truth (correlated Gaussians), or a peer library run on
# the same numbers. What to look at:
#
# 1. **CKA** reproduces Kornblith et al.'s reference values and has the right invariances;
# 2. **biased vs debiased CKA** on *independent* data: the biased one is inflated at small n;
# 3. the **MI staircase**: variational bounds with the true critic, InfoNCE's `log N` ceiling and
#    NWJ's exploding variance;
# 4. **KSG**: its bias as the dimension grows and its invariance to `y → y³`;
# 5. a table of **agreement with the peer libraries** (rsatoolbox, scipy, scikit-learn, ckatorch).
#
# All MI values are in **nats**. The whole notebook runs in well under two minutes on 2 CPU cores.

# %%
from workbench.utils import seed_everything; seed_everything(0, threads=2)

# %%
import math

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import torch

from workbench.probes import (
    MinibatchCKA, cka, compare_rdms, correlated_gaussians, dv, estimate_mi, gaussian_critic,
    gaussian_mi, infonce, mi_binned, mi_ksg, nwj, rdm, smile, upper_triangle,
)

FIGURES = "../figures"


def small(x, floor=1e-10):
    # print a difference so that float noise (1e-16 vs 2e-16) does not change the text
    return f"< {floor:.0e}" if abs(x) < floor else f"{abs(x):.1e}"

# %% [markdown]
# ## 1 · CKA: golden values and invariances
#
# Kornblith et al.'s reference notebook uses `np.random.seed(1337); X = randn(100, 10);
# Y = randn(100, 10) + X`. Our linear, RBF (threshold 0.5) and debiased linear CKA must give their
# three published numbers to 5 decimals. The feature-space form (O(n d²), our default when d < n)
# and the Gram form (O(n² d)) must agree to round-off.

# %%
np.random.seed(1337)
X = np.random.randn(100, 10)
Y = np.random.randn(100, 10) + X
golden = pd.DataFrame(
    [
        ("linear", 0.55761, cka(X, Y)),
        ("rbf, threshold 0.5", 0.65483, cka(X, Y, kernel="rbf", threshold=0.5)),
        ("linear, debiased", 0.51346, cka(X, Y, debiased=True)),
    ],
    columns=["CKA", "Kornblith et al.", "ours"],
)
golden["ours"] = golden["ours"].round(5)
print(golden.to_string(index=False))
print()
for deb in (False, True):
    gap = cka(X, Y, debiased=deb, form="gram") - cka(X, Y, debiased=deb, form="feature")
    print(f"Gram vs feature form (debiased={deb}): |diff| {small(gap)}")

# %% [markdown]
# CKA must not change under an **orthogonal** map or an **isotropic scaling** of one
# representation (it compares geometry, not coordinates), but it *should* change under an arbitrary
# invertible linear map that stretches some directions — that is what distinguishes CKA from
# CCA-style measures. The bars for "orthogonal" and "scaling ×3.7" must sit exactly on the
# baseline; "invertible (anisotropic)" must not.

# %%
rng = np.random.default_rng(0)
Q, _ = np.linalg.qr(rng.standard_normal((10, 10)))
A = rng.standard_normal((10, 10)) * np.linspace(0.1, 5, 10)
transforms = {"baseline": X, "orthogonal": X @ Q, "scaling ×3.7": 3.7 * X, "invertible (anisotropic)": X @ A}
variants = {"linear": {}, "rbf (0.5)": {"kernel": "rbf", "threshold": 0.5}, "debiased": {"debiased": True}}
inv = pd.DataFrame({v: {t: cka(Xt, Y, **kw) for t, Xt in transforms.items()} for v, kw in variants.items()})

fig, ax = plt.subplots(figsize=(8, 3.2))
inv.T.plot.bar(ax=ax, rot=0, width=0.8, color=["0.3", "tab:blue", "tab:green", "tab:red"])
ax.set_ylabel("CKA(f(X), Y)")
ax.set_title("CKA is invariant to orthogonal maps and isotropic scaling, not to arbitrary linear maps")
ax.legend(fontsize=8, loc="lower right")
fig.savefig(f"{FIGURES}/03_cka_invariances.png", dpi=100, bbox_inches="tight")
plt.show()

# %%
print(inv.round(4).to_string())

# %% [markdown]
# ## 2 · Biased vs debiased CKA on independent data
#
# X and Y below are **independent** Gaussian representations (d = 64), so the true CKA is 0. The
# biased estimator is far from 0 at small n (close to 1 when d ≫ n: any two wide random
# representations look alike); the debiased estimator (unbiased HSIC in numerator *and*
# denominator) is centred on 0 at every n. Shaded: ±1 sd over 20 repetitions.

# %%
ns = [8, 16, 32, 64, 128, 256, 512, 1024]
reps, d = 20, 64
rows = []
for n in ns:
    for r in range(reps):
        g = np.random.default_rng(1000 * n + r)
        Xi, Yi = g.standard_normal((n, d)), g.standard_normal((n, d))
        rows.append((n, cka(Xi, Yi), cka(Xi, Yi, debiased=True)))
indep = pd.DataFrame(rows, columns=["n", "biased", "debiased"]).groupby("n").agg(["mean", "std"])

fig, ax = plt.subplots(figsize=(6.5, 3.5))
for col, color in (("biased", "tab:red"), ("debiased", "tab:blue")):
    m, s = indep[col]["mean"], indep[col]["std"]
    ax.plot(ns, m, "o-", color=color, label=col)
    ax.fill_between(ns, m - s, m + s, color=color, alpha=0.2)
ax.axhline(0, color="k", lw=0.8)
ax.set_xscale("log", base=2)
ax.set_xlabel("n samples (d = 64 features each)")
ax.set_ylabel("linear CKA of independent X, Y")
ax.legend()
fig.savefig(f"{FIGURES}/03_cka_debiased.png", dpi=100, bbox_inches="tight")
plt.show()

# %%
print(indep.round(3).to_string())

# %% [markdown]
# ## 3 · The MI staircase: variational bounds with the true critic
#
# Correlated Gaussians in d = 20 dimensions, `y = ρx + √(1-ρ²)ε`, with ρ chosen so that the true
# MI steps through 2, 4, 6, 8, 10 nats (200 batches of N = 64 per step). Instead of training a
# critic we plug in the **true** one, the pointwise MI `log p(y|x)/p(y)`, so what we see is the
# bound itself, not an optimisation failure:
#
# - **InfoNCE** can never exceed `log N = log 64 ≈ 4.16` nats: it falls behind from I ≈ 4 and
#   flattens against that ceiling (its variance *shrinks* as it saturates);
# - **NWJ** (with its optimal critic `1 + pmi`) is unbiased but its variance grows like e^I;
# - **DV** has less variance than NWJ but overestimates at large I (the log of a mean over only
#   N(N-1) negatives); **SMILE** (τ = 5) has the lowest variance of the three, paid for with a
#   larger upward bias once I exceeds about τ (clipping shrinks the partition term).

# %%
levels = [2, 4, 6, 8, 10]
per_level, N = 200, 64
est = {"InfoNCE": [], "NWJ": [], "DV": [], "SMILE (τ=5)": []}
for mi in levels:
    x, y, rho = correlated_gaussians(N, 20, mi=mi, seed=mi, batch=(per_level,))
    S = gaussian_critic(x, y, rho)
    est["InfoNCE"].append(infonce(S))
    est["NWJ"].append(nwj(S + 1))
    est["DV"].append(dv(S))
    est["SMILE (τ=5)"].append(smile(S, 5.0))
est = {k: torch.cat(v).numpy() for k, v in est.items()}
truth = np.repeat(levels, per_level)

fig, (ax, ax2) = plt.subplots(1, 2, figsize=(12, 4), gridspec_kw={"width_ratios": [2.2, 1]})
colors = {"InfoNCE": "tab:blue", "NWJ": "tab:orange", "DV": "tab:green", "SMILE (τ=5)": "tab:purple"}
for name, v in est.items():
    ax.plot(v, lw=0.7, alpha=0.7, color=colors[name], label=name)
ax.plot(truth, "k", lw=2, label="true MI")
ax.axhline(math.log(N), color="tab:blue", ls="--", lw=1, label="log N")
ax.set_ylim(-1, 16)
ax.set_xlabel("batch (the true MI steps every 200 batches)")
ax.set_ylabel("estimate [nats]")
ax.legend(ncol=3, fontsize=8, loc="upper left")
for name, v in est.items():
    ax2.plot(levels, v.reshape(len(levels), -1).var(1), "o-", color=colors[name], label=name)
ax2.set_yscale("log")
ax2.set_xlabel("true MI [nats]")
ax2.set_ylabel("variance over batches")
ax2.legend(fontsize=8)
fig.savefig(f"{FIGURES}/03_mi_staircase.png", dpi=100, bbox_inches="tight")
plt.show()

# %%
table = pd.DataFrame(
    {name: [f"{v[i * per_level:(i + 1) * per_level].mean():6.2f} ± {v[i * per_level:(i + 1) * per_level].std():5.2f}"
            for i in range(len(levels))] for name, v in est.items()},
    index=pd.Index(levels, name="true MI"),
)
print(f"mean ± sd over {per_level} batches of N = {N}; log N = {math.log(N):.2f} nats")
print(table.to_string())

# %% [markdown]
# **A quickly trained critic.** `estimate_mi` fits a separable critic (two small MLPs) on 8000
# samples with early stopping on 2000 held-out ones and reports the held-out bound (batch 128, so
# InfoNCE's ceiling is now log 128 ≈ 4.85). A learned critic is worse than the true one: at I = 2
# both bounds land below the truth, and the held-out value rises, peaks and then falls as the
# critic overfits (early stopping keeps the peak); at I = 6 InfoNCE is pinned near its ceiling
# while SMILE climbs to about the true value. Training results depend on the BLAS and the thread
# count, so this cell's numbers are not compared by nbval.

# %%
# NBVAL_IGNORE_OUTPUT
torch.set_num_threads(1)  # tiny MLPs: one thread is fastest
for mi in (2, 6):
    x, y, _ = correlated_gaussians(10_000, 20, mi=mi, seed=100 + mi)
    got = {e: estimate_mi(x, y, e, batch_size=128, max_steps=1500, eval_every=100, patience=4, lr=1e-3)
           for e in ("infonce", "smile")}
    print(f"true {mi} nats: " + ", ".join(f"{k} {v:.2f}" for k, v in got.items()))
torch.set_num_threads(2)

# %% [markdown]
# ## 4 · KSG: bias as the dimension grows, and invariance to y → y³
#
# Here the total MI is fixed at 1 nat and spread over d dimensions of x and of y (n = 2000, k = 3,
# mean of 3 seeds). KSG is nearly unbiased in 1-D but underestimates more and more as the joint
# space grows (the k-th neighbour is far away in 2d dimensions) — read KSG numbers on wide
# representations as *lower bounds in practice*, and compare them only at equal dimension.

# %%
dims = [1, 2, 4, 8, 16]
ksg_rows = []
for d in dims:
    vals = [mi_ksg(*correlated_gaussians(2000, d, mi=1.0, seed=s)[:2], k=3) for s in range(3)]
    ksg_rows.append((d, np.mean(vals), np.std(vals)))
ksg_dim = pd.DataFrame(ksg_rows, columns=["dim", "KSG mean", "KSG sd"]).set_index("dim")

fig, ax = plt.subplots(figsize=(6, 3.5))
ax.errorbar(dims, ksg_dim["KSG mean"], yerr=ksg_dim["KSG sd"], fmt="o-", label="KSG (k=3, n=2000)")
ax.axhline(1.0, color="k", lw=1, label="true MI")
ax.set_xscale("log", base=2)
ax.set_ylim(0, 1.2)
ax.set_xlabel("dimension of x and of y")
ax.set_ylabel("MI [nats]")
ax.legend()
fig.savefig(f"{FIGURES}/03_ksg_dimension.png", dpi=100, bbox_inches="tight")
plt.show()

# %%
print(ksg_dim.round(3).to_string())

# %% [markdown]
# A strictly monotone map of y leaves the true MI unchanged. KSG works with neighbour *counts*,
# which a monotone map preserves in 1-D marginals, so its estimate barely moves under `y → y³`;
# the plug-in estimator on equal-width bins (20 bins) does not share this property: the cube
# squeezes most samples into a few central bins.

# %%
cube_rows = []
for rho in (0.3, 0.5, 0.7, 0.9):
    x, y, _ = correlated_gaussians(2000, 1, rho=rho, seed=7)
    cube_rows.append((rho, gaussian_mi(rho), mi_ksg(x, y), mi_ksg(x, y**3),
                      mi_binned(x, y, bins=20), mi_binned(x, y**3, bins=20)))
cube = pd.DataFrame(cube_rows, columns=["rho", "true", "KSG(x, y)", "KSG(x, y³)", "binned(x, y)", "binned(x, y³)"])
print(cube.round(3).to_string(index=False))

# %% [markdown]
# ## 5 · Agreement with the peer libraries
#
# Same inputs, our function vs the peer's. Differences below 1e-10 are printed as such (they are
# float round-off). Two rows are expected to differ, and show *why* we wrote our own:
#
# - ckatorch's RBF kernel takes `torch.median`, which returns the **lower** of the two middle
#   values for an even count, while Kornblith's reference (and we) use numpy's median (their mean);
# - scikit-learn's `mutual_info_regression` clips negative KSG values to 0 (we do not), so we
#   compare on positively dependent data where no clipping happens.

# %%
import warnings

from ckatorch.core import cka_base, cka_batch
from rsatoolbox.data import Dataset
from rsatoolbox.rdm import calc_rdm, compare
from scipy.spatial.distance import pdist
from scipy.stats import spearmanr
from sklearn.feature_selection import mutual_info_regression
from sklearn.metrics import mutual_info_score

# rsatoolbox 0.3.2 casts NaN into an integer descriptor internally: a harmless warning of its own
warnings.filterwarnings("ignore", message="invalid value encountered in cast", category=RuntimeWarning)
peer = []
Xt, Yt = torch.tensor(X), torch.tensor(Y)
peer.append(("CKA linear", "ckatorch cka_base", cka(X, Y) - float(cka_base(Xt, Yt))))
peer.append(("CKA debiased", "ckatorch cka_base(unbiased)", cka(X, Y, debiased=True) - float(cka_base(Xt, Yt, unbiased=True))))
peer.append(("CKA rbf 0.5", "ckatorch cka_base(rbf)", cka(X, Y, kernel="rbf", threshold=0.5)
             - float(cka_base(Xt, Yt, kernel="rbf", threshold=0.5))))
mb = MinibatchCKA()
for s in range(0, 100, 25):
    mb.update([X[s:s + 25]], [Y[s:s + 25]])
peer.append(("MinibatchCKA", "ckatorch cka_batch", mb.compute()[0, 0] - float(cka_batch(Xt.reshape(4, 25, 10), Yt.reshape(4, 25, 10)))))

g = np.random.default_rng(1)
cond, runs = np.repeat(np.arange(10), 4), np.tile(np.arange(4), 10)
P = g.standard_normal((10, 30))[cond] + g.standard_normal((40, 30))
ds = Dataset(P, obs_descriptors={"cond": cond, "run": runs})
for m in ("euclidean", "correlation"):
    ref = calc_rdm(ds, method=m, descriptor="cond").get_vectors()[0]
    peer.append((f"RDM {m}", "rsatoolbox calc_rdm", np.abs(upper_triangle(rdm(P, m, conditions=cond)) - ref).max()))
ref = calc_rdm(ds, method="crossnobis", descriptor="cond", cv_descriptor="run").get_vectors()[0]
peer.append(("RDM crossnobis", "rsatoolbox calc_rdm", np.abs(upper_triangle(rdm(P, "crossnobis", conditions=cond, runs=runs)) - ref).max()))
for m, sp in (("euclidean", "sqeuclidean"), ("correlation", "correlation"), ("cosine", "cosine")):
    ref = pdist(P, sp) / (P.shape[1] if m == "euclidean" else 1)
    peer.append((f"RDM {m}", "scipy pdist", np.abs(upper_triangle(rdm(P, m)) - ref).max()))
ra = calc_rdm(Dataset(P[:20]), method="euclidean").get_vectors()[0]
rb = np.round(calc_rdm(Dataset(P[20:]), method="euclidean").get_vectors()[0], 1)  # with ties
for ours, theirs in (("spearman", "spearman"), ("pearson", "corr"), ("kendall", "tau-a"), ("rho-a", "rho-a"), ("cosine", "cosine")):
    peer.append((f"compare {ours}", f"rsatoolbox compare({theirs})", compare_rdms(ra, rb, ours) - compare(ra, rb, method=theirs)[0, 0]))
peer.append(("compare spearman", "scipy spearmanr", compare_rdms(ra, rb, "spearman") - spearmanr(ra, rb).statistic))

x1, y1, _ = correlated_gaussians(2000, 1, rho=0.6, seed=3)
peer.append(("mi_ksg 1-D", "sklearn mutual_info_regression", mi_ksg(x1, y1) - mutual_info_regression(x1.numpy(), y1.numpy().ravel(), random_state=0)[0]))
a = g.integers(0, 5, 3000)
b = (a + g.integers(0, 3, 3000)) % 6
peer.append(("mi_binned", "sklearn mutual_info_score", mi_binned(a, b) - mutual_info_score(a, b)))

agreement = pd.DataFrame(peer, columns=["ours", "peer", "max |diff|"])
agreement["max |diff|"] = agreement["max |diff|"].map(small)
print(agreement.to_string(index=False))

# %% [markdown]
# Everything agrees to round-off except the ckatorch RBF row, whose gap is the median convention
# described above (at n = 100 the two middle squared distances differ slightly). The probes are
# ready to be used on real activations in the redundancy analysis.
