"""Small helpers every layer uses: seeding, thread count, device choice, atomic writes."""

from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path

import numpy as np


def seed_everything(seed: int = 0, threads: int | None = None) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) and optionally fix torch's thread count.

    Notebooks call this first so that a re-execution reproduces their numbers.
    """
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    random.seed(seed)
    np.random.seed(seed % 2**32)
    os.environ["PYTHONHASHSEED"] = str(seed)
    try:
        import torch
    except ImportError:  # the data layer works without torch
        return
    torch.manual_seed(seed)
    if torch.cuda.is_available():
        torch.cuda.manual_seed_all(seed)
    if threads is not None:
        set_threads(threads)


def set_threads(threads: int) -> None:
    """Fix torch's intra-op thread count (results on CPU depend on it)."""
    import torch

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def pick_device(device: str | None = None):
    """Return ``torch.device(device)`` or, when None, CUDA if available else CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Nothing partial is ever left at ``path``: a crash inside the block removes the
    temporary file (or directory) instead.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def repo_root() -> Path:
    """The repository root (the folder holding ``workbench/``, ``data/``, ``notebooks/``)."""
    return Path(__file__).resolve().parent.parent
