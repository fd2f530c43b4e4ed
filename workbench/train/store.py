"""The run store: one directory per run, named by the hash of its config, written atomically.

Layout of ``runs/<hash>/``::

    config.json      the RunConfig, as a dict
    metrics.json     final metrics (dev-best and last test accuracy, per type, ...)
    history.json     per-evaluation records (epoch, step, loss, dev accuracy)
    params.json      trainable-parameter report
    timings.json     wall time, samples/s, peak memory, device
    predictions.json the dev-best checkpoint's test predictions, {example id: generated text}
    method.safetensors   the trained method's weights (what the method made trainable)
    DONE             written last: a run without it is not finished

A run is built in a temporary sibling directory and renamed into place only when complete, so
a crash or an interrupt can never leave a directory that looks finished. A failed run (e.g. a
non-finite loss) is recorded under ``runs/<hash>.failed/`` with the reason, and is not reused.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from ..utils import repo_root

DONE = "DONE"


def default_root() -> Path:
    """``$WORKBENCH_RUNS`` if set, else ``<repo>/runs``."""
    return Path(os.environ.get("WORKBENCH_RUNS", repo_root() / "runs"))


class RunStore:
    """Finished runs on disk, keyed by config hash."""

    def __init__(self, root: str | os.PathLike | None = None):
        self.root = Path(root) if root is not None else default_root()

    def path(self, run_hash: str) -> Path:
        return self.root / run_hash

    def is_finished(self, run_hash: str) -> bool:
        return (self.path(run_hash) / DONE).exists()

    def read(self, run_hash: str) -> dict:
        """All JSON files of a finished run as ``{name: content}``."""
        path = self.path(run_hash)
        if not self.is_finished(run_hash):
            raise FileNotFoundError(f"run {run_hash} is not finished in {self.root}")
        return {p.stem: json.loads(p.read_text()) for p in sorted(path.glob("*.json"))}

    def write(self, run_hash: str, records: dict, tensors: dict | None = None) -> Path:
        """Write a finished run atomically: JSON records, optional safetensors, then DONE."""
        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{run_hash}.", dir=self.root))
        try:
            for name, content in records.items():
                (tmp / f"{name}.json").write_text(json.dumps(content, indent=2, sort_keys=True, default=str))
            if tensors:
                from safetensors.torch import save_file

                save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, tmp / "method.safetensors")
            (tmp / DONE).write_text("")
            final = self.path(run_hash)
            if final.exists():  # a forced re-run replaces the old one
                shutil.rmtree(final)
            os.replace(tmp, final)
            return final
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)

    def write_failure(self, run_hash: str, records: dict) -> Path:
        """Record a failed run beside the finished ones; it never counts as finished."""
        path = self.root / f"{run_hash}.failed"
        path.mkdir(parents=True, exist_ok=True)
        (path / "failure.json").write_text(json.dumps(records, indent=2, sort_keys=True, default=str))
        return path

    def finished(self) -> list[str]:
        """Hashes of every finished run."""
        if not self.root.exists():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and (p / DONE).exists())
