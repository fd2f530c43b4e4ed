"""The run store: one directory per run, named by the hash of its config, published atomically.

Layout of a store (``runs/`` or ``$WORKBENCH_RUNS``)::

    <hash>/              a run (12 hex digits, :attr:`RunConfig.hash`)
        config.json      the RunConfig, as a dict
        identity.json    what the hash digests: config fields, resolved method config, fingerprints
        metrics.json     final metrics (dev-best and last test accuracy, per type, ...)
        history.json     per-evaluation records (epoch, step, loss, dev accuracy)
        params.json      trainable-parameter report
        timings.json     wall time, samples/s, peak memory, device
        predictions.json the dev-best checkpoint's test predictions, {example id: generated text}
        method.safetensors   the trained method's weights (what the method made trainable)
        DONE             the finished marker: a manifest (size and SHA-256 of every file above)
    <hash>.failed/       a failed run (e.g. a non-finite loss): failure.json; never reused
    .locks/<hash>.lock   the run's lock file (``flock``); kept, never deleted
    .<hash>.tmp-*/       a run being written (no DONE: never counted, removed when found stale)
    .<hash>.old-*/       a finished run being replaced by ``force=True`` (see below)

**The marker.** A run is built in a hidden temporary sibling without ``DONE``, renamed to
``<hash>/``, and only then is ``DONE`` written inside it (atomically). So ``DONE`` never exists in
a temporary directory, a process killed at any point leaves no phantom run, and
:meth:`RunStore.finished` only counts directories named like runs (no dot in the name) that hold
``DONE``. ``DONE`` lists each file's size and SHA-256: a truncated or edited file makes the run
*damaged* (:class:`DamagedRunError` names the file); ``load_results`` skips damaged runs with a
:class:`DamagedRunWarning`. Runs written before the manifest existed have an empty ``DONE`` and
are checked by parsing and by their config's hash.

**Replacing a run** (``force=True``, or a damaged run): the old ``<hash>/`` is renamed aside to
``.<hash>.old-*``, the new one renamed in, its ``DONE`` written, and only then is the old one
deleted. A crash in between leaves the old run readable: readers fall back to the aside copy, and
the next writer of that hash restores it (:meth:`RunStore.recover`).

**The lock.** Training and publishing a hash happen under an exclusive ``fcntl.flock`` on
``.locks/<hash>.lock``: a second process with the same config waits, then finds the run finished
and returns it instead of training it again. Readers take no lock. (``flock`` is advisory and
local; on network file systems it depends on the server.)
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
import time
import uuid
from pathlib import Path

from ..utils import atomic_write, fsync_path, repo_root

DONE = "DONE"
MANIFEST_FORMAT = 1
LOCKS = ".locks"
_TMP, _OLD = ".tmp-", ".old-"
# Files of a run whose content is read on every load: checked against their SHA-256 in DONE;
# the others (the method's weights) only against their size.
_HASHED_SUFFIXES = (".json",)


class DamagedRunError(ValueError):
    """A run directory that looks finished but cannot be read: ``path`` and ``file`` name the damage."""

    def __init__(self, path, file: str | None, reason: str):
        self.path, self.file, self.reason = Path(path), file, reason
        where = self.path / file if file else self.path
        super().__init__(f"damaged run {where}: {reason}")


class DamagedRunWarning(UserWarning):
    """``load_results`` skipped a damaged run or a stray directory holding ``DONE``."""


class StoreNotWritableError(PermissionError):
    """The run store's directory cannot be written (checked before anything is trained)."""


def default_root() -> Path:
    """``$WORKBENCH_RUNS`` if set, else ``<repo>/runs``."""
    return Path(os.environ.get("WORKBENCH_RUNS", repo_root() / "runs"))


def is_run_name(name: str) -> bool:
    """Whether ``name`` can be a run directory (no dot: temporaries, asides, failures and locks have one)."""
    return bool(name) and "." not in name and "/" not in name


def _rename(src: Path, dst: Path) -> None:
    """One step of a publish (a separate function so tests can kill the writer between steps)."""
    os.rename(src, dst)


def _write_marker(final: Path, manifest: dict) -> None:
    atomic_write(final / DONE, json.dumps(manifest, indent=2, sort_keys=True))


class RunStore:
    """Finished runs on disk, keyed by config hash (the layout is in the module docstring)."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_root()

    def path(self, run_hash: str) -> Path:
        return self.root / run_hash

    # ------------------------------------------------------------------------------ reading
    def _asides(self, run_hash: str) -> list[Path]:
        """Replaced copies of ``run_hash`` (``.<hash>.old-*``), newest first."""
        if not self.root.is_dir():
            return []
        found = []
        for p in self.root.glob(f".{glob_escape(run_hash)}{_OLD}*"):
            with contextlib.suppress(OSError):
                found.append((p.stat().st_mtime_ns, p))
        return [p for _, p in sorted(found, reverse=True)]

    def locate(self, run_hash: str) -> Path | None:
        """The directory holding the finished run ``run_hash``: ``<hash>/``, or the copy set aside
        by a replacement that did not complete; None when the run is not finished."""
        final = self.path(run_hash)
        if (final / DONE).is_file():
            return final
        for aside in self._asides(run_hash):
            if (aside / DONE).is_file():
                return aside
        return None

    def is_finished(self, run_hash: str) -> bool:
        """Whether a finished copy of the run exists (its files are checked by :meth:`read`)."""
        return is_run_name(run_hash) and self.locate(run_hash) is not None

    def read(self, run_hash: str) -> dict:
        """All JSON files of a finished run as ``{name: content}``, checked against ``DONE``.

        Raises:
            FileNotFoundError: the run is not finished.
            DamagedRunError: a file is missing, truncated, edited or not valid JSON (named).
        """
        for attempt in range(3):  # a replacement may move the directory while it is read
            path = self.locate(run_hash) if is_run_name(run_hash) else None
            if path is None:
                raise FileNotFoundError(f"run {run_hash} is not finished in {self.root}")
            try:
                return self._read_dir(path)
            except FileNotFoundError:
                if attempt == 2 or path.is_dir():
                    raise DamagedRunError(path, None, "a file listed in DONE disappeared") from None
        raise AssertionError("unreachable")

    def _read_dir(self, path: Path) -> dict:
        manifest = self._manifest(path)
        if manifest is not None:
            for name, entry in manifest["files"].items():
                f = path / name
                if not f.is_file():
                    if not path.is_dir():
                        raise FileNotFoundError(path)
                    raise DamagedRunError(path, name, "the file listed in DONE is missing")
                size = f.stat().st_size
                if size != entry.get("size"):
                    raise DamagedRunError(path, name, f"{size} bytes where DONE records {entry.get('size')} "
                                                      "(truncated or changed after the run was written)")
        records = {}
        for f in sorted(path.glob("*.json")):
            data = f.read_bytes()
            if manifest is not None:
                entry = manifest["files"].get(f.name)
                if entry is None:
                    raise DamagedRunError(path, f.name, "the file is not listed in DONE (added after the run)")
                if hashlib.sha256(data).hexdigest() != entry.get("sha256"):
                    raise DamagedRunError(path, f.name, "its content differs from the SHA-256 recorded in DONE "
                                                        "(edited or corrupted after the run was written)")
            try:
                records[f.stem] = json.loads(data)
            except (ValueError, UnicodeDecodeError) as e:
                raise DamagedRunError(path, f.name, f"not valid JSON ({e})") from None
        return records

    @staticmethod
    def _manifest(path: Path) -> dict | None:
        """The manifest in ``DONE``; None for a run written before manifests (an empty ``DONE``)."""
        try:
            text = (path / DONE).read_text()
        except (OSError, UnicodeDecodeError) as e:
            if isinstance(e, FileNotFoundError) and not path.is_dir():
                raise
            raise DamagedRunError(path, DONE, f"unreadable ({e})") from None
        if not text.strip():
            return None
        try:
            manifest = json.loads(text)
            if not isinstance(manifest.get("files"), dict):
                raise TypeError("no 'files' table")
        except (ValueError, TypeError, AttributeError) as e:
            raise DamagedRunError(path, DONE, f"not a valid manifest ({e})") from None
        return manifest

    def finished(self) -> list[str]:
        """Hashes of every finished run (directories named like runs holding ``DONE``, and runs
        whose replacement did not complete); temporaries and stray directories are ignored."""
        return self.scan()[0]

    def scan(self) -> tuple[list[str], list[Path]]:
        """``(finished hashes, stray directories holding DONE)``.

        A stray directory is one that holds ``DONE`` but can never be a run: a temporary left by an
        older version of this module killed before its rename, or a directory named unlike a run.
        """
        if not self.root.is_dir():
            return [], []
        runs, stray = set(), []
        for p in self.root.iterdir():
            if not p.is_dir() or p.name == LOCKS:
                continue
            has_done = (p / DONE).is_file()
            if is_run_name(p.name):
                if has_done:
                    runs.add(p.name)
                continue
            m = re.fullmatch(r"\.(?P<hash>[^.]+)" + re.escape(_OLD) + r".+", p.name)
            if m and has_done:
                if self.locate(m["hash"]) == p:  # a replacement that did not complete
                    runs.add(m["hash"])
                continue  # else garbage the next writer of that hash removes
            if has_done:
                stray.append(p)
        return sorted(runs), sorted(stray)

    # ------------------------------------------------------------------------------ writing
    def check_writable(self) -> None:
        """Raise :class:`StoreNotWritableError` naming the directory unless files can be created in it."""
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            (self.root / LOCKS).mkdir(exist_ok=True)
            fd, probe = tempfile.mkstemp(prefix=".write-probe-", dir=self.root)
            os.close(fd)
            os.unlink(probe)
        except OSError as e:
            raise StoreNotWritableError(
                f"the run store {self.root} is not writable ({e.strerror or e}); nothing was trained. Point "
                "WORKBENCH_RUNS or run(store=...) at a writable directory"
            ) from None

    @contextlib.contextmanager
    def lock(self, run_hash: str, on_wait=None):
        """Hold the exclusive lock of ``run_hash`` (``.locks/<hash>.lock``) for the block.

        Blocks while another process (or another thread's ``lock``) holds it; ``on_wait()`` is
        called once if it has to wait. The lock dies with its holder (a killed process frees it).
        """
        if not is_run_name(run_hash):
            raise ValueError(f"not a run hash: {run_hash!r}")
        folder = self.root / LOCKS
        folder.mkdir(parents=True, exist_ok=True)
        fd = os.open(folder / f"{run_hash}.lock", os.O_RDWR | os.O_CREAT, 0o666)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                if on_wait is not None:
                    on_wait()
                fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing the descriptor releases the lock

    def recover(self, run_hash: str, stale_after_s: float = 0.0) -> None:
        """Repair what a killed writer of ``run_hash`` left (call under :meth:`lock`).

        A replaced run set aside is restored if ``<hash>/`` is not finished, else deleted;
        a ``<hash>/`` without ``DONE`` and temporaries of the hash are deleted.
        """
        final = self.path(run_hash)
        if not (final / DONE).is_file():
            keep = next((a for a in self._asides(run_hash) if (a / DONE).is_file()), None)
            if keep is not None:
                if final.exists():
                    self._discard(final)
                _rename(keep, final)
            elif final.is_dir():
                self._discard(final)
        for p in [*self._asides(run_hash), *self.root.glob(f".{glob_escape(run_hash)}{_TMP}*")]:
            with contextlib.suppress(OSError):
                if time.time() - p.stat().st_mtime >= stale_after_s:
                    self._discard(p)

    @staticmethod
    def _discard(path: Path) -> None:
        """Delete a directory, its ``DONE`` first so that a half-deleted copy never looks finished."""
        with contextlib.suppress(FileNotFoundError):
            (path / DONE).unlink()
        shutil.rmtree(path, ignore_errors=True)

    def write(self, run_hash: str, records: dict, tensors: dict | None = None) -> Path:
        """Publish a run: JSON records and optional safetensors in a temporary directory, renamed
        to ``<hash>/``, then ``DONE``. An existing ``<hash>/`` is replaced without a window where
        neither run is readable. Call it under :meth:`lock` when other processes may write too.
        """
        if not is_run_name(run_hash):
            raise ValueError(f"not a run hash: {run_hash!r}")
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{run_hash}{_TMP}", dir=self.root))
        final, aside = self.path(run_hash), None
        try:
            for name, content in records.items():
                (tmp / f"{name}.json").write_text(json.dumps(content, indent=2, sort_keys=True, default=str))
            if tensors:
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "method.safetensors")
            manifest = {"format": MANIFEST_FORMAT, "files": {}}
            for f in sorted(tmp.iterdir()):
                fsync_path(f)
                entry = {"size": f.stat().st_size}
                if f.suffix in _HASHED_SUFFIXES:
                    entry["sha256"] = hashlib.sha256(f.read_bytes()).hexdigest()
                manifest["files"][f.name] = entry
            fsync_path(tmp)
            if final.exists():  # a forced re-run (or a damaged run): set the old one aside first
                aside = self.root / f".{run_hash}{_OLD}{uuid.uuid4().hex[:8]}"
                _rename(final, aside)
            _rename(tmp, final)
            fsync_path(self.root)
            _write_marker(final, manifest)
        except BaseException:
            if aside is not None and aside.exists() and not (final / DONE).is_file():
                with contextlib.suppress(OSError):  # put the old run back
                    if final.exists():
                        self._discard(final)
                    _rename(aside, final)
                    aside = None
            raise
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        if aside is not None:
            self._discard(aside)
        return final

    def write_failure(self, run_hash: str, records: dict) -> Path:
        """Record a failed run beside the finished ones; it never counts as finished."""
        path = self.root / f"{run_hash}.failed"
        path.mkdir(parents=True, exist_ok=True)
        atomic_write(path / "failure.json", json.dumps(records, indent=2, sort_keys=True, default=str))
        return path


def glob_escape(name: str) -> str:
    """``name`` with glob metacharacters escaped."""
    import glob

    return glob.escape(name)
