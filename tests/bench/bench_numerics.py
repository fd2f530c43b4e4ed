"""What CPU numerics cost and buy: native kernels against the AVX2 pinning of ``workbench.utils``.

    python tests/bench/bench_numerics.py     # (make bench) about 3 minutes on 2 cores

Each configuration trains the same seeded run (LoRA and full fine-tuning, shapes-vqa N = 16,
60 steps) in a fresh process and prints the step time and a digest of the trained weights:

- pinned (the default: ``ATEN_CPU_CAPABILITY=avx2``, ``MKL_CBWR=AVX2,STRICT``,
  ``ONEDNN_MAX_CPU_ISA=AVX2``) at 2 threads, twice: the digests must be equal (determinism);
- pinned at 1 thread: shows whether the thread count changes the floats;
- native (``WORKBENCH_CPU_NUMERICS=native``: the machine's widest kernels) at 2 threads: what the
  pinning costs (the step-time ratio) and whether it changes the floats on this machine;
- portable (``WORKBENCH_CPU_NUMERICS=portable``, below) at 1 thread, the study runs' thread
  count: what it costs over pinned at 1 thread.

Two machines give bit-identical runs when the pinned digests printed here agree (run it on both).
Every digest is also looked up in ``numerics_reference.json`` (beside this script): the digests
measured on the project's other machines, so that the printout says at once which of them this
machine reproduces (``same as``); ``--record LABEL`` adds this machine's digests to that file
under LABEL (a maintainer's step, after a run on a machine worth keeping as a reference).

    python tests/bench/bench_numerics.py --components     # about 1 minute

says where two machines part: a digest per stage of one training step (an MKL matrix product, the
visual encoder's convolutions (oneDNN), the text model's forward pass and its gradients, each
from fixed inputs so that a digest depends on its own stage alone), pinned
and in the opt-in ``portable`` mode (``WORKBENCH_CPU_NUMERICS=portable``: ``MKL_CBWR=COMPATIBLE``,
the one MKL branch Intel documents as giving the same results on Intel and non-Intel CPUs, with
the convolutions kept off oneDNN and NNPACK: im2col + MKL), with the MKL code path MKL reports. Compare the printout with the table of
digests in docs/reproducibility.md: the first stage whose digest differs is where the floats part.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

REFERENCE = Path(__file__).with_name("numerics_reference.json")

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

COMPONENTS = r"""
import hashlib, json, sys
import workbench  # pins before torch runs anything
import torch
from workbench.data import load_images, load_task
from workbench.models.factory import load_backbone
from workbench.utils import mkl_code_path
torch.set_num_threads(int(sys.argv[1]))
def digest(*ts):
    return hashlib.sha256(b"".join(t.detach().float().contiguous().numpy().tobytes() for t in ts)).hexdigest()[:12]
out = {}
g = torch.Generator().manual_seed(0)
a, b = torch.randn(896, 128, generator=g), torch.randn(128, 512, generator=g)
out["gemm (MKL)"] = digest(a @ b, a.T @ a[:, :64])
model = load_backbone("vlt5-tiny")
examples = load_task("shapes-vqa", "test")[:16]
with torch.no_grad():
    feats = model.encode_images(load_images(examples))
out["visual encoder (convolutions)"] = digest(feats)
# the text model gets seeded features, not the encoder's: each stage's digest depends on that stage alone
ids, mask = model.encode_prompts([e.prompt for e in examples])
labels = model.encode_targets([e.target for e in examples])
result = model(torch.randn(feats.shape, generator=g), ids, mask, labels=labels)
loss = result.loss
out["text model forward (logits)"] = digest(result.logits)
loss.backward()
grads = [p.grad for _, p in sorted(model.named_parameters()) if p.grad is not None]
out["text model backward (gradients)"] = digest(*grads)
print(json.dumps({"digests": out, **mkl_code_path()}))
"""

MODES = (("pinned", 2), ("pinned", 2), ("pinned", 1), ("native", 2), ("portable", 1))


def _env(mode: str, threads: int) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")}
    env["WORKBENCH_CPU_NUMERICS"] = mode
    env["OMP_NUM_THREADS"] = str(threads)
    return env


def child(method: str, mode: str, threads: int) -> dict:
    out = subprocess.run([sys.executable, "-c", CHILD, method, str(threads)], env=_env(mode, threads),
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def load_reference(path: Path = REFERENCE) -> dict:
    """``{label: {"components": {mode: {stage: digest}}, "runs": {method: {"mode/threads": digest}}, ...}}``."""
    return json.loads(path.read_text()) if path.exists() else {}


def same_as(reference: dict, section: str, group: str, key: str, digest: str) -> str:
    """The reference machines whose ``reference[label][section][group][key]`` is ``digest`` ("-": none;
    machines that did not measure it are not counted either way)."""
    labels = [label for label, machine in reference.items()
              if machine.get(section, {}).get(group, {}).get(key) == digest]
    return ", ".join(labels) or "-"


def record(label: str, section: str, digests: dict, machine: dict, path: Path = REFERENCE) -> None:
    """Store this machine's ``digests`` under ``label`` (merged into what the file holds for it)."""
    reference = load_reference(path)
    entry = reference.setdefault(label, {})
    entry.update({k: v for k, v in machine.items() if v is not None})
    for group, values in digests.items():
        entry.setdefault(section, {}).setdefault(group, {}).update(values)
    path.write_text(json.dumps(reference, indent=1, sort_keys=True) + "\n")
    print(f"recorded under {label!r} in {path.name}")


def _label_arg(argv: list) -> str | None:
    if "--record" not in argv:
        return None
    i = argv.index("--record")
    if i + 1 >= len(argv) or argv[i + 1].startswith("--"):
        raise SystemExit("--record needs a label for this machine, e.g. --record 'Intel Xeon (AVX-512, AMX)'")
    return argv[i + 1]


def components(label: str | None = None) -> None:
    """One digest per stage of a training step, pinned and portable (see the module docstring)."""
    rows = {}
    for mode in ("pinned", "portable"):
        out = subprocess.run([sys.executable, "-c", COMPONENTS, "1", mode], env=_env(mode, 1), capture_output=True,
                             text=True, check=True)
        rows[mode] = json.loads(out.stdout.strip().splitlines()[-1])
    reference = load_reference()
    print(f"{'stage (1 thread)':<34} | {'pinned':<12} | {'portable':<12} | same as (pinned; portable)")
    for stage in rows["pinned"]["digests"]:
        pinned, portable = rows["pinned"]["digests"][stage], rows["portable"]["digests"][stage]
        print(f"{stage:<34} | {pinned:<12} | {portable:<12} | "
              f"{same_as(reference, 'components', 'pinned', stage, pinned)}; "
              f"{same_as(reference, 'components', 'portable', stage, portable)}")
    print(f"{'MKL branch in effect':<34} | {rows['pinned'].get('mkl_branch', '-'):<12} | "
          f"{rows['portable'].get('mkl_branch', '-'):<12}")
    from workbench.utils import cpu_model

    print(f"CPU: {cpu_model()}; MKL's own choice for it: {rows['pinned'].get('mkl_auto_branch', '-')}")
    if label:
        import torch

        record(label, "components", {mode: rows[mode]["digests"] for mode in rows},
               {"cpu_model": cpu_model(), "torch": torch.__version__,
                "mkl_auto_branch": rows["pinned"].get("mkl_auto_branch")})


def main(label: str | None = None):
    reference = load_reference()
    print(f"{'method':>6} | {'numerics':>8} | {'threads':>7} | {'capability':>10} | {'step ms':>7} | {'digest':<16} | same as")
    recorded = {}
    for method in ("lora", "full"):
        rows = []
        for mode, threads in MODES:
            r = child(method, mode, threads)
            rows.append((mode, threads, r))
            key = f"{mode}/{threads}"
            recorded.setdefault(method, {})[key] = r["digest"]
            print(f"{method:>6} | {mode:>8} | {threads:>7} | {r['numerics']['cpu_capability']:>10} | "
                  f"{r['step_ms']:7.1f} | {r['digest']:<16} | {same_as(reference, 'runs', method, key, r['digest'])}")
        (_, _, a), (_, _, b), (_, _, one), (_, _, native), (_, _, portable) = rows
        print(f"  {method}: pinned runs identical: {a['digest'] == b['digest']}; 1 thread = 2 threads: "
              f"{one['digest'] == a['digest']}; native = pinned: {native['digest'] == a['digest']}; "
              f"pinned / native step time: {min(a['step_ms'], b['step_ms']) / native['step_ms']:.2f}; "
              f"portable / pinned step time (1 thread): {portable['step_ms'] / one['step_ms']:.2f}")
    numerics = rows[0][2]["numerics"]
    print(f"CPU: {numerics['cpu_model']}")
    if label:
        record(label, "runs", recorded, {"cpu_model": numerics["cpu_model"], "torch": numerics.get("torch"),
                                         "mkl_auto_branch": numerics.get("mkl_auto_branch")})


if __name__ == "__main__":
    _argv = sys.argv[1:]
    (components if "--components" in _argv else main)(_label_arg(_argv))
