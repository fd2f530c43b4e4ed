"""Small helpers every layer uses: seeding, thread count, device choice, atomic writes, file fingerprints."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
import random
import re
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


# Reproducible CPU numerics. PyTorch picks its CPU kernels by the CPU's widest vector unit (AVX2,
# AVX-512, AMX) and MKL / oneDNN pick their own code paths the same way, so one seeded run gives
# different floats on different x86 machines (the notebooks' numbers moved in the second decimal
# between an AMD EPYC and an AVX-512/AMX Xeon). Pinning all three to AVX2, which every x86 machine
# of the last decade has, gives one code path everywhere; the thread count must match too (torch's
# parallel reductions split work by thread). docs/reproducibility.md has the measurements.
PINNED_CPU_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2,STRICT", "ONEDNN_MAX_CPU_ISA": "AVX2"}
# Intel documents MKL_CBWR=AVX2 as reproducible across *Intel* CPUs only: on other vendors' CPUs MKL
# may run its AUTO branch instead, and the pinned runs did differ between an AMD EPYC and a Xeon.
# COMPATIBLE is the one branch documented to give the same results on Intel and compatible CPUs;
# with the visual encoder's convolutions kept off oneDNN (and NNPACK), i.e. im2col + MKL, it is the
# opt-in "portable" mode (about 1.6x the pinned step time; docs/reproducibility.md).
PORTABLE_CPU_ENV = {**PINNED_CPU_ENV, "MKL_CBWR": "COMPATIBLE"}
NUMERICS_MODES = ("pinned", "portable", "native")


_mode_at_import: str | None = None  # what pin_cpu_numerics found: MKL, too, reads its variable once


def numerics_mode() -> str:
    """The numerics mode in effect: ``WORKBENCH_CPU_NUMERICS`` as :func:`pin_cpu_numerics` read it
    when ``workbench`` was imported (``pinned`` by default, ``portable`` or ``native``)."""
    if _mode_at_import is not None:
        return _mode_at_import
    mode = os.environ.get("WORKBENCH_CPU_NUMERICS", "pinned") or "pinned"
    if mode not in NUMERICS_MODES:
        raise ValueError(f"WORKBENCH_CPU_NUMERICS={mode!r} is not a numerics mode; expected one of "
                         f"{', '.join(NUMERICS_MODES)} (docs/reproducibility.md)")
    return mode


def pin_cpu_numerics() -> bool:
    """Pin torch's, MKL's and oneDNN's CPU code paths to AVX2 (``PINNED_CPU_ENV``), unless told not to.

    Called when ``workbench`` is imported. Each variable is only set when the environment does not
    set it already. ``WORKBENCH_CPU_NUMERICS=native`` turns the pinning off (the machine's fastest
    kernels, machine-dependent floats); ``=portable`` sets ``PORTABLE_CPU_ENV`` instead (MKL's
    vendor-neutral branch; :func:`onednn_convolutions` then says no). It takes effect when it runs
    before torch's first CPU operation (torch reads the capability lazily; MKL reads ``MKL_CBWR``
    when it starts): import ``workbench`` before running torch code. Returns whether the variables
    were set; :func:`numerics_fingerprint` says what is in effect.
    """
    global _mode_at_import
    _mode_at_import = None  # read the variable afresh
    mode = _mode_at_import = numerics_mode()
    if mode == "native":
        return False
    for key, value in (PORTABLE_CPU_ENV if mode == "portable" else PINNED_CPU_ENV).items():
        os.environ.setdefault(key, value)
    return True


def onednn_convolutions() -> bool:
    """Whether the visual encoder's convolutions may run on oneDNN (its kernels are chosen per CPU):
    not in the ``portable`` mode, where they run as im2col + an MKL product on MKL's vendor-neutral
    branch (NNPACK kept off too; ``models.visual``)."""
    return numerics_mode() != "portable"


def numerics_fingerprint() -> dict:
    """What decides a CPU run's floats on this machine: torch version, the kernel capability in
    effect, the pinning variables, the intra-op thread count and the CPU model.

    Two machines with the same fingerprint (``cpu_model`` aside) give bit-identical seeded runs;
    run stores and study bundles record it as provenance.
    """
    import torch

    return {
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "threads": torch.get_num_threads(),
        **{key: os.environ.get(key) for key in PINNED_CPU_ENV},
        **mkl_code_path(),
        **({} if onednn_convolutions() else {"onednn_convolutions": False}),
        "cpu_model": cpu_model(),
    }


# MKL's named constants for conditional numerical reproducibility (mkl_cbwr.h)
_MKL_BRANCHES = {0: "OFF", 1: "OFF", 2: "AUTO", 3: "COMPATIBLE", 4: "SSE2", 6: "SSSE3", 7: "SSE4_1", 8: "SSE4_2",
                 9: "AVX", 10: "AVX2", 11: "AVX512_MIC", 12: "AVX512", 13: "AVX512_MIC_E1", 14: "AVX512_E1"}
_MKL_STRICT = 0x10000
MKL_PATH_KEYS = ("mkl_branch", "mkl_auto_branch")  # what mkl_code_path records


def mkl_code_path() -> dict:
    """The MKL code path in effect, read from MKL itself rather than from ``MKL_CBWR``.

    ``mkl_branch`` is the reproducibility branch MKL runs (``"AVX2,STRICT"`` when the pinning took
    effect, ``"OFF"`` when MKL dispatches freely); ``mkl_auto_branch`` is the branch MKL would pick
    on its own for this CPU (``"AVX512_E1"`` on an AVX-512 Xeon), which tells CPU classes apart
    where Intel documents that a requested branch falls back to AUTO (non-Intel CPUs). Empty when
    torch was built without MKL (ARM, macOS), whose floats MKL then does not touch.
    """
    import ctypes

    import torch

    if not torch.backends.mkl.is_available():
        return {}
    try:
        lib = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libtorch_cpu.so"))
        get, get_auto = lib.mkl_serv_cbwr_get, lib.mkl_serv_cbwr_get_auto_branch
    except (OSError, AttributeError):  # MKL linked under other names: nothing to read
        return {}
    setting = get(-1)  # MKL_CBWR_ALL: the branch and the STRICT flag
    if setting < 0:  # MKL_CBWR_ERR_*: nothing trustworthy to record
        return {}
    branch = _MKL_BRANCHES.get(setting & 0xFFFF, str(setting & 0xFFFF))
    return {"mkl_branch": branch + (",STRICT" if setting & _MKL_STRICT else ""),
            "mkl_auto_branch": _MKL_BRANCHES.get(get_auto(), str(get_auto()))}


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``, else :func:`platform.processor`)."""
    import platform

    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine() or "unknown"


def same_numerics(a: dict, b: dict) -> bool:
    """Whether two :func:`numerics_fingerprint` records promise bit-identical runs (the CPU model
    aside, not the CPU class MKL sees: ``mkl_auto_branch``)."""
    keys = ("torch", "cpu_capability", "threads", *PINNED_CPU_ENV)
    # records written before the MKL code path was read have no "mkl_branch": compare it when both
    # do. mkl_auto_branch too: it tells CPU classes apart (an AVX-512 Xeon, another vendor's CPU)
    # whose floats the AVX2 pinning has not made equal (docs/reproducibility.md)
    later = [k for k in MKL_PATH_KEYS if k in a and k in b]
    return (all(a.get(k) == b.get(k) for k in (*keys, *later))
            and a.get("onednn_convolutions", True) == b.get("onednn_convolutions", True))


def set_threads(threads: int) -> None:
    """Fix torch's intra-op thread count (results on CPU depend on it)."""
    import torch

    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


def check_threads(threads, what: str = "threads"):
    """``threads`` if it is a positive int or None (a torch thread count, or "as they are");
    ValueError naming ``what`` otherwise."""
    if threads is not None and (isinstance(threads, bool) or not isinstance(threads, int) or threads < 1):
        raise ValueError(f"{what} must be a positive int (torch threads per run) or None, got {threads!r}")
    return threads


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run the block at ``n`` torch threads (``None``: as they are), restored after; yields the count
    in force. A CPU run's floats depend on it (docs/reproducibility.md)."""
    import torch

    before = torch.get_num_threads()
    if n and n != before:
        set_threads(int(n))
    try:
        yield torch.get_num_threads()
    finally:
        if torch.get_num_threads() != before:
            torch.set_num_threads(before)


def pick_device(device: str | None = None):
    """Return ``torch.device(device)`` or, when None, CUDA if available else CPU."""
    import torch

    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, fsync: bool = True):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only on success.

    Nothing partial is ever left at ``path``: a crash inside the block removes the temporary file
    (or directory) instead, and a process killed inside it leaves only a hidden
    ``.<name>.*.tmp`` beside ``path``. With ``fsync`` (default) a file written at the temporary
    path is flushed to disk before the rename, so that the rename never publishes a file whose
    data is still in flight (a power loss then leaves the old file or the whole new one).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.unlink(tmp)
    tmp = Path(tmp)
    try:
        yield tmp
        if fsync and tmp.is_file():
            fsync_path(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            if tmp.is_dir():
                import shutil

                shutil.rmtree(tmp, ignore_errors=True)
            else:
                tmp.unlink()


def atomic_write(path: str | os.PathLike, data: str | bytes, fsync: bool = True) -> Path:
    """Write ``data`` (text as UTF-8) to ``path`` atomically (see :func:`atomic_path`)."""
    path = Path(path)
    with atomic_path(path, fsync=fsync) as tmp:
        tmp.write_bytes(data.encode() if isinstance(data, str) else data)
    return path


def fsync_path(path: str | os.PathLike) -> None:
    """Flush a file (or a directory entry list) to disk; a no-op where the OS refuses it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# File fingerprints (content digests, cached per (path, size, mtime))
# ---------------------------------------------------------------------------------------------
_DIGESTS: dict = {}
_CHUNK = 1 << 20


def fingerprint_cache_dir() -> Path:
    """``$WORKBENCH_FINGERPRINTS`` if set, else ``<repo>/.cache/fingerprints`` (gitignored)."""
    return Path(os.environ.get("WORKBENCH_FINGERPRINTS", repo_root() / ".cache" / "fingerprints"))


def file_digest(path: str | os.PathLike) -> str:
    """The SHA-256 of a file's content (hex), streamed in 1 MiB chunks and cached.

    The cache is keyed by (resolved path, size, mtime, inode): in memory for this process and on
    disk (:func:`fingerprint_cache_dir`, one small file per key), so a multi-GB feature store is
    read once, not once per process. A file changed in place gets a new mtime, hence a new key.
    Raises FileNotFoundError / IsADirectoryError like ``open``.
    """
    p = Path(path).expanduser().resolve()
    st = p.stat()
    if not p.is_file():
        raise IsADirectoryError(f"{p} is not a regular file")
    key = f"{p}\0{st.st_size}\0{st.st_mtime_ns}\0{st.st_ino}"
    if key in _DIGESTS:
        return _DIGESTS[key]
    cache = fingerprint_cache_dir() / (hashlib.sha256(key.encode()).hexdigest()[:32] + ".json")
    try:
        record = json.loads(cache.read_text())
        if record.get("key") == key and re.fullmatch(r"[0-9a-f]{64}", record.get("sha256", "")):
            _DIGESTS[key] = record["sha256"]
            return record["sha256"]
    except (OSError, ValueError, AttributeError):
        pass  # no cache entry, or an unreadable one: recomputed below
    h = hashlib.sha256()
    with open(p, "rb") as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    digest = h.hexdigest()
    after = p.stat()
    if (after.st_size, after.st_mtime_ns) != (st.st_size, st.st_mtime_ns):
        return digest  # the file changed while it was read: do not cache a digest of a moving target
    _DIGESTS[key] = digest
    try:
        atomic_write(cache, json.dumps({"key": key, "sha256": digest}), fsync=False)
    except OSError:
        pass  # a read-only cache folder only costs a re-read
    return digest


def file_fingerprint(path: str | os.PathLike, pattern: str | None = None) -> str:
    """A 16-hex-digit digest of a file's content, or of a folder's files, or ``"missing"``.

    For a folder, the files directly in it that match ``pattern`` (a glob, default every file) are
    covered by name and content; subfolders are not. Cached like :func:`file_digest`.
    """
    p = Path(path).expanduser()
    if p.is_file():
        return file_digest(p)[:16]
    if p.is_dir():
        files = sorted(f for f in p.glob(pattern or "*") if f.is_file())
        h = hashlib.sha256()
        for f in files:
            h.update(f"{f.name}:{file_digest(f)}\n".encode())
        return h.hexdigest()[:16]
    return "missing"


def repo_root() -> Path:
    """The repository root (the folder holding ``workbench/``, ``data/``, ``notebooks/``)."""
    return Path(__file__).resolve().parent.parent
