"""The gallery study: every registered method on shapes-vqa at N = 16, 64 and 1000 over three seeds.

The protocol's defaults throughout (:class:`~workbench.train.RunConfig`'s: the embedded backbone
``vlt5-tiny``, the protocol's step budget and early stopping for each N, the method's default
learning rate and config, as each method resolves it on the backbone): 3 N x 3 seeds per method,
``len(list_methods()) * 9`` runs.

The bundle keeps method weights for the N = 64, seed 13 runs only (one trained model per method,
for the analyses that look inside one; not full fine-tuning's or prefix tuning's, 5.8 MB and
5.6 MB) and the test predictions of the seed-13 runs at N = 64 and of full fine-tuning and LoRA at seed 13
(the gallery's answers table and 01_quickstart show them).

    python -m workbench.studies status gallery
    python -m workbench.studies run gallery --executor processes    # resumes from runs/
    python -m workbench.studies export gallery                      # results/gallery/
"""

from __future__ import annotations

from ..data import SEEDS
from ..train import RunConfig, grid
from .study import Study, register_study

NAME = "gallery"
TASK = "shapes-vqa"
N_SHOTS = (16, 64, 1000)
GALLERY_SEEDS = tuple(SEEDS[:3])  # 13, 21, 42


def gallery_configs() -> list[RunConfig]:
    """Every registered method x N x seeds, at the protocol's and the methods' defaults."""
    from ..methods import list_methods

    return grid(RunConfig(task=TASK, quiet=True), method=list_methods(), n_shots=list(N_SHOTS),
                seed=list(GALLERY_SEEDS))


# Method weights too large to commit for what the analyses gain (5.8 MB and 5.6 MB a run).
_NO_WEIGHTS = ("full", "prefix")


def keep_weights(cfg: RunConfig) -> bool:
    """Method weights for N = 64, seed 13 only (not full fine-tuning's or prefix tuning's)."""
    return cfg.n_shots == 64 and cfg.seed == 13 and cfg.method not in _NO_WEIGHTS


def keep_predictions(cfg: RunConfig) -> bool:
    """Test predictions of the seed-13 runs at N = 64 (the gallery's answers table) and of full
    fine-tuning and LoRA at every N (what 01_quickstart shows)."""
    return cfg.seed == 13 and (cfg.n_shots == 64 or cfg.method in ("full", "lora"))


def summary(store):
    """Test accuracy per method and N over the seeds (mean, std, n, 95 % interval), with trainable %."""
    from ..train import load_results, summarize

    df = load_results(store)
    if df.empty:
        return df
    table = summarize(df, by=("method", "n_shots"))
    pct = df.groupby("method")["trainable_pct"].first()
    table["trainable_pct"] = table["method"].map(pct)
    return table


# The papers' claims the gallery can speak to, as paired comparisons (method a - method b).
PAIRS = (("mixphm", "full"), ("mixphm", "pfeiffer"), ("mixphm", "adamix"), ("vlpet", "full"), ("lora", "full"),
         ("prefix", "prompt"))


def paired(store, n_shots: int | None = None, pairs=PAIRS):
    """Each pair's difference paired over seeds (:func:`~workbench.train.compare`: mean, 95 %
    interval, p-value), one row per pair and N; ``n_shots`` keeps one N."""
    import pandas as pd

    from ..train import compare, load_results

    df = load_results(store)
    if n_shots is not None:
        df = df[df["n_shots"] == n_shots]
    return pd.concat({f"{a} - {b}": compare(df, a, b, by="n_shots") for a, b in pairs}).droplevel(1)


STUDY = register_study(Study(
    NAME,
    "Every registered method on shapes-vqa (vlt5-tiny) at N = 16, 64, 1000 over seeds 13, 21, 42, "
    "at the protocol's defaults.",
    grids=gallery_configs,
    keep_weights=keep_weights,
    keep_predictions=keep_predictions,
    analyses={"summary": summary, "paired": paired},
))
