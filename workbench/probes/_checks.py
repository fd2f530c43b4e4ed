"""Input checks and conversions shared by every probe (private).

Every public probe takes torch tensors or numpy arrays of shape ``[n_samples, n_features]``.
The helpers here turn them into float64 torch tensors on the input's device, and raise a
``ValueError`` that names the offending argument for: wrong ndim, different ``n`` in X and Y,
too few samples for the estimator, NaN or inf. A degenerate (constant) input is not an error:
the probe returns NaN and :func:`degenerate` emits a :class:`DegenerateInputWarning`.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np
import torch

DEFAULT_DTYPE = torch.float64


class DegenerateInputWarning(RuntimeWarning):
    """A probe got an input it cannot measure (e.g. a constant representation); it returned NaN."""


def is_torch(*xs: Any) -> bool:
    """True when any of ``xs`` is a torch tensor (then the probe answers with tensors)."""
    return any(isinstance(x, torch.Tensor) for x in xs)


def to_tensor(x: Any, name: str, dtype: torch.dtype | None = DEFAULT_DTYPE) -> torch.Tensor:
    """``x`` as a torch tensor (same device for tensors, CPU for arrays), cast to ``dtype``."""
    if isinstance(x, torch.Tensor):
        t = x
    elif isinstance(x, (np.ndarray, list, tuple, float, int, np.number)):
        arr = np.asarray(x)
        if arr.dtype == object or not (
            np.issubdtype(arr.dtype, np.number) or arr.dtype == np.bool_
        ):
            raise ValueError(f"{name} must hold numbers, got dtype {arr.dtype}")
        t = torch.from_numpy(np.ascontiguousarray(arr))
    else:
        raise ValueError(f"{name} must be a torch tensor or a numpy array, got {type(x).__name__}")
    if dtype is not None and t.dtype != dtype:
        t = t.to(dtype)
    return t


def check_finite(t: torch.Tensor, name: str) -> None:
    """Raise if ``t`` holds NaN or inf."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    # a finite sum proves every entry finite (NaN and inf propagate); the elementwise test,
    # several times slower, runs only when the sum is not finite (it may just have overflowed)
    if bool(torch.isfinite(t.sum())):
        return
    if not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")


def as_matrix(
    x: Any,
    name: str,
    *,
    min_n: int = 1,
    allow_1d: bool = False,
    dtype: torch.dtype | None = DEFAULT_DTYPE,
    min_reason: str = "",
    finite: bool = True,
) -> torch.Tensor:
    """Check and convert one ``[n_samples, n_features]`` input.

    ``allow_1d`` reads a vector of length n as ``[n, 1]`` (used by the MI estimators).
    ``min_n`` is the smallest number of samples the estimator accepts; ``min_reason`` is
    appended to the error (e.g. "debiased HSIC needs n >= 4"). ``finite=False`` leaves the
    NaN/inf check to the caller (who can do it more cheaply on a derived quantity).
    """
    t = to_tensor(x, name, dtype)
    if t.ndim == 1 and allow_1d:
        t = t.reshape(-1, 1)
    if t.ndim != 2:
        want = "1-D [n] or 2-D [n_samples, n_features]" if allow_1d else "2-D [n_samples, n_features]"
        raise ValueError(f"{name} must be {want}, got shape {tuple(t.shape)}")
    if t.shape[1] < 1:
        raise ValueError(f"{name} has no features (shape {tuple(t.shape)})")
    if t.shape[0] < min_n:
        extra = f" ({min_reason})" if min_reason else ""
        raise ValueError(f"{name} has n={t.shape[0]} samples; at least {min_n} are needed{extra}")
    if finite:
        check_finite(t, name)
    return t


def check_same_n(a: torch.Tensor, b: torch.Tensor, name_a: str = "X", name_b: str = "Y") -> None:
    """Raise if the two inputs do not have the same number of samples (rows)."""
    if a.shape[0] != b.shape[0]:
        raise ValueError(
            f"{name_a} and {name_b} must have the same number of samples, "
            f"got {a.shape[0]} and {b.shape[0]}"
        )


def check_int(value: Any, name: str, low: int | None = None, high: int | None = None) -> int:
    """``value`` as an int in ``[low, high]`` (either bound optional), else ValueError."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {value!r}")
    value = int(value)
    if low is not None and value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def check_choice(value: str, name: str, choices: tuple[str, ...]) -> str:
    """Raise unless ``value`` is one of ``choices``."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def check_positive(value: Any, name: str) -> float:
    """``value`` as a finite float > 0, else ValueError."""
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be a positive number, got {value!r}") from None
    if not math.isfinite(v) or v <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value!r}")
    return v


def is_constant(t: torch.Tensor) -> bool:
    """True when every row of ``t`` equals the first one (a constant representation)."""
    return bool((t == t[:1]).all())


def degenerate(message: str, stacklevel: int = 3) -> float:
    """Warn that the input is degenerate and return NaN (the probe's answer)."""
    warnings.warn(message + "; returning NaN", DegenerateInputWarning, stacklevel=stacklevel)
    return float("nan")


def nan_like(ref: torch.Tensor) -> torch.Tensor:
    """A NaN scalar with ``ref``'s dtype and device."""
    return torch.full((), float("nan"), dtype=ref.dtype, device=ref.device)


def scalar_out(value: torch.Tensor, as_tensor: bool):
    """A 0-d tensor when the caller passed tensors, else a Python float."""
    return value if as_tensor else float(value.detach().cpu())


def array_out(value: torch.Tensor, as_tensor: bool):
    """The tensor itself when the caller passed tensors, else a numpy array."""
    return value if as_tensor else value.detach().cpu().numpy()
