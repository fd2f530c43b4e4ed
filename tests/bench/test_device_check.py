"""tools/device_check.sh, the prepared command for a lent GPU machine, runs end to end (on a machine
without CUDA each step says so and exits), and leaves its logs where the device tool collects them."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the script measures for minutes")
def test_device_check_runs_and_writes_its_logs(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(ROOT / "tools" / "device_check.sh")], cwd=ROOT, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["machine.txt", "mfu.log", "sharing.log"]
    assert "== mfu: exit 0" in out.stdout and "== sharing: exit 0" in out.stdout
    assert "no CUDA device" in (tmp_path / "mfu.log").read_text()
    assert "no CUDA device" in (tmp_path / "sharing.log").read_text()
    assert "cuda False" in (tmp_path / "machine.txt").read_text()
