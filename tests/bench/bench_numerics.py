"""What CPU numerics cost and buy: native kernels against the AVX2 pinning of ``workbench.utils``.

    python tests/bench/bench_numerics.py     # (make bench) about 3 minutes on 2 cores

Each configuration trains the same seeded run (LoRA and full fine-tuning, shapes-vqa N = 16,
60 steps) in a fresh process and prints the step time and a digest of the trained weights:

- pinned (the default: ``ATEN_CPU_CAPABILITY=avx2``, ``MKL_CBWR=AVX2,STRICT``,
  ``ONEDNN_MAX_CPU_ISA=AVX2``) at 2 threads, twice: the digests must be equal (determinism);
- pinned at 1 thread: shows whether the thread count changes the floats;
- native (``WORKBENCH_CPU_NUMERICS=native``: the machine's widest kernels) at 2 threads: what the
  pinning costs (the step-time ratio) and whether it changes the floats on this machine.

Two machines give bit-identical runs when the pinned digests printed here agree (run it on both).
"""

import json
import os
import subprocess
import sys

CHILD = r"""
import hashlib, json, sys, tempfile
import workbench  # pins (or not) before torch runs anything
import torch
from safetensors.torch import load_file
from workbench.train import RunConfig, run
from workbench.utils import numerics_fingerprint
torch.set_num_threads(int(sys.argv[2]))
r = run(RunConfig(method=sys.argv[1], n_shots=16, seed=13, max_steps=60, eval_every=60, test_size=100, quiet=True),
        store=tempfile.mkdtemp())
w = load_file(str(r.path / "method.safetensors"))
digest = hashlib.sha256(b"".join(w[k].float().numpy().tobytes() for k in sorted(w))).hexdigest()[:16]
print(json.dumps({"digest": digest, "step_ms": 1000 * r.timings["train_s"] / r.metrics["steps"],
                  "loss": r.history[-1]["loss"], "numerics": numerics_fingerprint()}))
"""

MODES = (("pinned", 2), ("pinned", 2), ("pinned", 1), ("native", 2))


def child(method: str, mode: str, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    env["WORKBENCH_CPU_NUMERICS"] = mode
    env["OMP_NUM_THREADS"] = str(threads)
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(threads)], env=env, capture_output=True,
                         text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    print(f"{'method':>6} | {'numerics':>8} | {'threads':>7} | {'capability':>10} | {'step ms':>7} | digest")
    for method in ("lora", "full"):
        rows = []
        for mode, threads in MODES:
            r = child(method, mode, threads)
            rows.append((mode, threads, r))
            print(f"{method:>6} | {mode:>8} | {threads:>7} | {r['numerics']['cpu_capability']:>10} | "
                  f"{r['step_ms']:7.1f} | {r['digest']}")
        (_, _, a), (_, _, b), (_, _, one), (_, _, native) = rows
        print(f"  {method}: pinned runs identical: {a['digest'] == b['digest']}; 1 thread = 2 threads: "
              f"{one['digest'] == a['digest']}; native = pinned: {native['digest'] == a['digest']}; "
              f"pinned / native step time: {min(a['step_ms'], b['step_ms']) / native['step_ms']:.2f}")
    print(f"CPU: {rows[0][2]['numerics']['cpu_model']}")


if __name__ == "__main__":
    main()
