"""One training step on vlt5-tiny against what the CPU can do, and MixPHM's step against Pfeiffer's.

    python tests/bench/bench_step.py      # (make bench: OMP_NUM_THREADS=2)

Printed in one run:

(a) the machine's dense matmul rate: the best of 8 square ``n x n`` matmuls (``--matmul-n``, 2048;
    smaller where one would take over a second) in fp32 -- the reference of (b) -- and in bf16;
(b) full fine-tuning of vlt5-tiny at batch 16, on shapes-vqa batches built as the trainer builds
    them (``prepare_split`` / ``Split.batch`` with sampled answers) and stepped as the trainer steps
    (forward, ``handle.training_losses``, backward, gradient clipping, ``loop.build_optimizer``'s
    AdamW and schedule): the median step time, the step's FLOPs (``FlopCounterMode`` over forward +
    backward: matmul, bmm and attention FLOPs; element-wise work and the optimiser are not counted)
    and the achieved FLOP/s as a fraction of the fp32 rate of (a) -- target >= 40 %. Also with bf16
    autocast on the CPU (``torch.autocast("cpu", dtype=torch.bfloat16)``; the trainer autocasts on
    CUDA only), and under candidate changes to files the step depends on, applied here as local
    monkeypatches (nothing on disk changes): fused AdamW (``workbench/train/optim.py``), dropout
    masks drawn with ``torch.rand`` instead of ``bernoulli_`` (the model), the same masks drawn as
    ``torch.rand(float64) < 1 - p`` (bit-identical to ``bernoulli_`` on torch 2.13's CPU: the same floats),
    one intra-op thread;
(c) MixPHM's training step (official defaults; ``handle.bottleneck`` is d // 12 rounded up to a
    multiple of n = 4: 12 on vlt5-tiny) against a Pfeiffer adapter of the same bottleneck, as a
    ratio -- target <= 1.1; MixPHM without its two auxiliary losses (``w_red = w_mi = 0``: the PHM
    layers alone) for comparison, and the aten operator calls of one step of each (what sets the
    time of a step this small). Then two T5-base-shaped figures (d 768, m 64, 16 x 60 tokens,
    forward + backward): the PHM layer pair of a MixPHM module against two ``nn.Linear``, with the
    Kronecker product materialised (``path="dense"``) and as chosen by FLOP count (``path="auto"``,
    ``workbench/methods/_phm.py``); and the redundancy loss of a stack of 12 modules computed directly
    (d x d over the tokens) against through the Up projection's factors (what the handle does).

The workbench pins the CPU code paths to AVX2 when imported (``workbench.utils.pin_cpu_numerics``;
without a native bf16 kernel, bf16 then runs at under 1 GFLOP/s and its step gets 3 timed steps);
when pinned, (a) and (b) are repeated in a subprocess with ``WORKBENCH_CPU_NUMERICS=native``
(``--no-native`` skips that). Setups that are compared are stepped round-robin, so a change of
machine load hits them alike; every figure is a median over ``--steps`` steps after ``--warmup``.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import statistics
import subprocess
import sys
import time
import warnings

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from workbench import methods
from workbench.data import get_task_spec
from workbench.models import load_backbone
from workbench.train import RunConfig
from workbench.train.loop import _ANSWER_SEED_SALT, build_optimizer, features_for, load_splits, prepare_split
from workbench.utils import seed_everything

BACKBONE = "vlt5-tiny"
BATCH = 16
# The variables workbench.utils.pin_cpu_numerics sets (AVX2 code paths) unless WORKBENCH_CPU_NUMERICS=native.
PINNED_CPU_ENV = ("ATEN_CPU_CAPABILITY", "MKL_CBWR", "ONEDNN_MAX_CPU_ISA")


# ------------------------------------------------------------------------------------ (a) matmul
def sync(device: str = "cpu") -> None:
    """Wait for the device's queued work (a no-op on the CPU), so that a timer reads what it ran."""
    if device == "cuda":
        torch.cuda.synchronize()


def matmul_gflops(n: int, dtype: torch.dtype, reps: int, device: str = "cpu") -> float:
    """Best-of-``reps`` GFLOP/s of an ``n x n`` by ``n x n`` matmul (2 n^3 FLOPs) on ``device``."""
    g = torch.Generator().manual_seed(0)
    a = torch.randn(n, n, generator=g).to(device, dtype)
    b = torch.randn(n, n, generator=g).to(device, dtype)
    out = torch.empty(n, n, dtype=dtype, device=device)
    torch.mm(a, b, out=out)  # warm-up
    sync(device)
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        torch.mm(a, b, out=out)
        sync(device)
        best = min(best, time.perf_counter() - t0)
    return 2 * n ** 3 / best / 1e9


def peak_gflops(dtype: torch.dtype, n_max: int, reps: int = 8) -> tuple[float, int]:
    """(GFLOP/s, n): the best of ``reps`` square matmuls of size ``n_max``, or smaller where one would
    take over a second (bf16 without a native kernel runs at well under 1 GFLOP/s)."""
    n = 256
    rate = matmul_gflops(n, dtype, 2)
    while n < n_max and 2 * (2 * n) ** 3 / (rate * 1e9) < 1.0:
        n *= 2
    return matmul_gflops(n, dtype, reps), n


def numerics() -> str:
    """The CPU code path in effect (``workbench.utils.pin_cpu_numerics``: AVX2 unless
    ``WORKBENCH_CPU_NUMERICS=native``)."""
    pinned = {k: os.environ.get(k) for k in PINNED_CPU_ENV if os.environ.get(k)}
    how = ", ".join(f"{k}={v}" for k, v in pinned.items()) if pinned else "native (WORKBENCH_CPU_NUMERICS=native)"
    return f"CPU kernels {torch.backends.cpu.get_cpu_capability()}; {how}"


def load_note() -> str:
    """The machine's load against its cores: other work on the cores slows every figure here, and
    with more threads than free cores an intra-op parallel region waits for a descheduled thread
    (steps then take seconds instead of tens of milliseconds)."""
    cores = os.cpu_count() or 1
    load = os.getloadavg()[0]
    warn = (f"  -- busy machine: {load:.1f} runnable on {cores} cores, the figures are not reliable"
            if load > 0.75 * cores else "")
    return f"load average {load:.2f} on {cores} cores{warn}"


# ------------------------------------------------------------------------------------ data
def train_config(method: str, **method_config) -> RunConfig:
    return RunConfig(task="shapes-vqa", method=method, n_shots=64, seed=13, test_size=16, quiet=True,
                     method_config=method_config)


def make_batches(count: int, seed: int = 0) -> list:
    """``count`` training batches of 16 as the trainer draws them (shuffled rows, sampled VQA answers)."""
    cfg = train_config("full")
    model = load_backbone(BACKBONE)
    train_ex, _, _ = load_splits(cfg)
    sample = get_task_spec(cfg.task).kind == "vqa"
    split = prepare_split(model, train_ex, features_for(model, train_ex, cfg), torch.device("cpu"),
                          sample_answers=sample)
    gen = torch.Generator().manual_seed(seed)
    answer_rng = np.random.default_rng([seed, _ANSWER_SEED_SALT]) if sample else None
    return [split.batch(torch.randperm(len(split), generator=gen)[:BATCH], answer_rng=answer_rng)
            for _ in range(count)]


# ------------------------------------------------------------------------------------ a training step
class Stepper:
    """One method on a fresh vlt5-tiny with the trainer's optimiser; :meth:`step` is one training step.

    ``bf16``: the forward under CPU bf16 autocast. ``patch``: a context manager entered around the
    construction (the optimiser, the model) and around every step -- a local experiment.
    """

    def __init__(self, method: str, bf16: bool = False, patch=None, **method_config):
        self.patch = patch or contextlib.nullcontext
        seed_everything(0)
        with self.patch():
            self.cfg = train_config(method, **method_config)
            self.model = load_backbone(BACKBONE)
            self.handle = methods.apply(self.model, method, **method_config)
            lr = self.handle.config.lr or 1e-3
            self.opt, self.sched = build_optimizer(self.handle, self.cfg, lr, total_steps=100_000)
        self.trainable = [p for _, p in self.handle.trainable_parameters()]
        self.bf16 = bf16
        self.model.train()
        self.times: list[float] = []

    def autocast(self):
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16)

    def loss(self, b) -> torch.Tensor:
        with self.autocast():
            def forward(b=b):
                return self.model(b.feats, b.prompt_ids, b.prompt_mask, labels=b.labels, visual_mask=b.visual_mask)

            return self.handle.loss(forward)

    def step(self, b) -> float:
        with self.patch():
            t0 = time.perf_counter()
            loss = self.loss(b)
            if not torch.isfinite(loss):
                raise RuntimeError(f"non-finite loss {float(loss)}")
            loss.backward()
            float(loss.detach())
            torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
            self.opt.step()
            self.sched.step()
            self.opt.zero_grad(set_to_none=True)
            return time.perf_counter() - t0

    def flops(self, b) -> int:
        """FLOPs of forward + backward on ``b`` (weights unchanged: the gradients are dropped)."""
        with self.patch(), FlopCounterMode(display=False) as counter:
            self.loss(b).backward()
        self.opt.zero_grad(set_to_none=True)
        return counter.get_total_flops()


def operator_calls(stepper: "Stepper", b) -> int:
    """The aten operator calls of one training step on ``b`` (forward, backward, optimiser; views
    included), counted by a ``TorchDispatchMode``; the step is taken, so call it after the timing."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        calls = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.calls += 1
            return func(*args, **(kwargs or {}))

    with Count():
        stepper.step(b)
    return Count.calls


def round_robin(steppers: dict, batches: list, warmup: int) -> dict[str, float]:
    """Median step seconds per setup, the setups stepped in turn on the same batches."""
    for i, b in enumerate(batches):
        for s in steppers.values():
            dt = s.step(b)
            if i >= warmup:
                s.times.append(dt)
    return {k: statistics.median(s.times) for k, s in steppers.items()}


# ------------------------------------------------------------------------------------ local patches
@contextlib.contextmanager
def adamw_with(**forced):
    """``torch.optim.AdamW`` built inside with ``forced`` options over optim.py's own."""
    original = torch.optim.AdamW

    def make(*args, **kwargs):
        return original(*args, **{**kwargs, **forced})

    torch.optim.AdamW = make
    try:
        yield
    finally:
        torch.optim.AdamW = original


def fused_adamw():
    """``torch.optim.AdamW(..., fused=True)`` (another kernel, other floats)."""
    return adamw_with(fused=True, foreach=False)


def single_tensor_adamw():
    """torch's CPU default, the per-parameter loop (optim.py asks for the multi-tensor one: the same floats)."""
    return adamw_with(foreach=False)


def _rand_dropout(input, p=0.5, training=True, inplace=False):
    """``F.dropout`` with the keep mask drawn by ``torch.rand`` (a vectorised generator) instead of
    ``bernoulli_``; the same distribution, another random stream."""
    if not training or p == 0:
        return input
    if p == 1:
        return input.mul_(0) if inplace else input * 0
    mask = torch.rand_like(input).ge_(p).mul_(1.0 / (1.0 - p))
    return input.mul_(mask) if inplace else input * mask


_F_DROPOUT = torch.nn.functional.dropout  # torch's own, whatever is patched in later


def _rand64_dropout(input, p=0.5, training=True, inplace=False):
    """``F.dropout`` with its own floats: torch's CPU ``bernoulli_(1 - p)`` draws one uniform double per
    element from the default generator and keeps the element when it is below 1 - p, which is what
    ``torch.rand(..., dtype=float64) < 1 - p`` draws (the same mask, and the generator left in the same
    state; :func:`rand64_dropout` checks that once). It skips ``bernoulli_``'s per-element branch, not the
    generator's serial loop."""
    if not training or p == 0 or inplace or input.device.type != "cpu":
        return _F_DROPOUT(input, p, training, inplace)
    noise = (torch.rand(input.shape, dtype=torch.float64) < 1.0 - p).to(input.dtype)
    noise.div_(1.0 - p)
    return input * noise



@functools.lru_cache(maxsize=None)
def _same_masks() -> bool:  # checked once: the patch is entered around every timed step
    """Whether :func:`_rand64_dropout` gives ``F.dropout``'s floats and generator state on this torch and CPU."""
    saved = torch.get_rng_state()
    try:
        x = torch.randn(16, 22, 128)
        start = torch.get_rng_state()
        a, after_a = _F_DROPOUT(x, 0.1, True), torch.get_rng_state()
        torch.set_rng_state(start)
        b, after_b = _rand64_dropout(x, 0.1, True), torch.get_rng_state()
        return torch.equal(a, b) and torch.equal(after_a, after_b)
    finally:
        torch.set_rng_state(saved)


@contextlib.contextmanager
def _dropout_as(fn):
    """``torch.nn.functional.dropout`` replaced by ``fn`` inside (every nn.Dropout calls it)."""
    original = torch.nn.functional.dropout
    torch.nn.functional.dropout = fn
    try:
        yield
    finally:
        torch.nn.functional.dropout = original


def rand64_dropout():
    """``F.dropout`` drawing its mask with ``torch.rand`` in float64 (the same floats, see :func:`_rand64_dropout`)."""
    if not _same_masks():
        raise RuntimeError("torch.rand(float64) < 1 - p does not reproduce bernoulli_'s masks on this torch/CPU")
    return _dropout_as(_rand64_dropout)


def rand_dropout():
    """``F.dropout`` drawing its mask with ``torch.rand`` (vectorised) instead of ``bernoulli_``."""
    return _dropout_as(_rand_dropout)


@contextlib.contextmanager
def threads(n: int):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def combine(*managers):
    @contextlib.contextmanager
    def both():
        with contextlib.ExitStack() as stack:
            for m in managers:
                stack.enter_context(m())
            yield
    return both


# ------------------------------------------------------------------------------------ (b)
FP32 = "fp32: the trainer's step"
CANDIDATES = {  # label -> Stepper options: local monkeypatches of files the step depends on
    "fp32, single-tensor AdamW (before)": dict(patch=single_tensor_adamw),
    "fp32 + fused AdamW (optim.py)": dict(patch=fused_adamw),
    "fp32 + float64 rand masks (same floats)": dict(patch=rand64_dropout),
    "fp32 + torch.rand dropout (model)": dict(patch=rand_dropout),
    "fp32 + both": dict(patch=combine(fused_adamw, rand_dropout)),
    "fp32, 1 thread": dict(patch=functools.partial(threads, 1)),
}
# Not a candidate: the step with every dropout probability at 0 (no masks at all, attention's
# included), the most any change to how masks are drawn could gain.
NO_DROPOUT = "fp32, no dropout (a bound)"


def without_dropout(stepper: "Stepper") -> "Stepper":
    for m in stepper.model.modules():
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
        elif isinstance(getattr(m, "dropout", None), float):  # attention modules keep theirs as a float
            m.dropout = 0.0
    return stepper


def bench_full(batches: list, warmup: int, peak32: float, peak16: float) -> None:
    setups = {FP32: dict(), **CANDIDATES}
    steppers = {label: Stepper("full", **kw) for label, kw in setups.items()}
    steppers[NO_DROPOUT] = without_dropout(Stepper("full"))
    flops = steppers[FP32].flops(batches[0])
    med = round_robin(steppers, batches, warmup)
    # bf16 autocast on its own: without a native bf16 kernel (the AVX2-pinned numerics) a step takes
    # seconds, so it gets fewer steps there.
    slow = peak16 < 0.25 * peak32
    bf16 = Stepper("full", bf16=True)
    n16 = min(3, len(batches) - warmup) if slow else len(batches) - warmup
    med["bf16 autocast"] = round_robin({"bf16": bf16}, batches[: (1 if slow else warmup) + n16],
                                       1 if slow else warmup)["bf16"]
    print(f"\n(b) full fine-tuning, {BACKBONE}, batch {BATCH}: forward + extra losses + backward + clip + AdamW + "
          f"schedule; median of {len(batches) - warmup} steps after {warmup} warm-up (bf16: {n16})")
    print(f"    FLOPs per step (forward + backward, FlopCounterMode): {flops / 1e9:.3f} GFLOP")
    w = max(len(k) for k in med)
    print(f"    {'setup':<{w}} | {'step ms':>8} | {'GFLOP/s':>8} | {'of fp32 peak':>12} | {'of bf16 peak':>12} "
          f"| {'/ fp32':>6}")
    for label in [FP32, "bf16 autocast", *CANDIDATES, NO_DROPOUT]:
        rate = flops / med[label] / 1e9
        of16 = f"{100 * rate / peak16:11.1f}%" if label == "bf16 autocast" else f"{'':>12}"
        print(f"    {label:<{w}} | {1e3 * med[label]:8.1f} | {rate:8.2f} | {100 * rate / peak32:11.1f}% | {of16} "
              f"| {med[label] / med[FP32]:6.2f}")
    print("    target: the trainer's fp32 step at >= 40 % of the fp32 matmul rate")
    split = time_split(steppers[FP32], batches[:warmup + 8], warmup)
    mm_rate = flops / split["matmul"] / 1e9
    print(f"    where the fp32 step's time goes (torch.profiler, self CPU time, {split['steps']} steps): matrix "
          f"products ({', '.join(MATMUL_OPS)}) {1e3 * split['matmul']:.1f} ms a step, everything else "
          f"{1e3 * split['other']:.1f} ms ({split['ops']:.0f} aten operator calls, nested ones included)")
    print(f"    the matrix products alone run at {mm_rate:.1f} GFLOP/s, {100 * mm_rate / peak32:.1f}% of the fp32 rate: "
          f"the ceiling of this step's FLOP/s on these shapes; {1e3 * flops / (0.4 * peak32 * 1e9):.1f} ms "
          f"a step would be 40 %, i.e. at most {1e3 * (flops / (0.4 * peak32 * 1e9) - split['matmul']):.1f} ms "
          "for everything else")
    print(f"    the largest other costs (self ms a step, share of the step, calls): " + "; ".join(
        f"{key} {1e3 * sec:.1f} ms {sec / (split['matmul'] + split['other']):.0%} ({calls:.0f})"
        for key, sec, calls in split["top"]))


MATMUL_OPS = ("aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm")
TOP_OPS = 5


def time_split(stepper: Stepper, batches: list, warmup: int) -> dict:
    """Per training step: self CPU seconds of the matrix products (``MATMUL_OPS``) and of every
    other operator, and the operator calls, over ``batches[warmup:]`` under ``torch.profiler``
    (which slows the small operators a little, so ``other`` is an upper bound)."""
    from torch.profiler import ProfilerActivity, profile

    for b in batches[:warmup]:
        stepper.step(b)
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for b in batches[warmup:]:
            stepper.step(b)
    n = len(batches) - warmup
    events = prof.key_averages()
    # Self times of aten operators only, so that nested profiler ranges are not counted twice.
    aten = [e for e in events if e.key.startswith("aten::")]
    mm = sum(e.self_cpu_time_total for e in aten if e.key in MATMUL_OPS) / 1e6
    other = sum(e.self_cpu_time_total for e in events if e.key not in MATMUL_OPS) / 1e6
    # The largest non-product costs (the optimiser's step is a profiler range; its aten calls are counted apart).
    top = sorted(((e.key, e.self_cpu_time_total / 1e6 / n, e.count / n) for e in events if e.key not in MATMUL_OPS),
                 key=lambda t: -t[1])[:TOP_OPS]
    return {"matmul": mm / n, "other": other / n, "ops": sum(e.count for e in aten) / n, "steps": n, "top": top}


# ------------------------------------------------------------------------------------ (c)
def bench_mixphm(batches: list, warmup: int) -> None:
    mix = Stepper("mixphm")
    m = mix.handle.bottleneck
    steppers = {
        f"mixphm (defaults, bottleneck {m})": mix,
        "mixphm without the auxiliary losses": Stepper("mixphm", w_red=0.0, w_mi=0.0),
        f"pfeiffer (bottleneck {m})": Stepper("pfeiffer", bottleneck=m),
    }
    med = round_robin(steppers, batches, warmup)
    ops = {k: operator_calls(s, batches[-1]) for k, s in steppers.items()}
    ref = med[f"pfeiffer (bottleneck {m})"]
    print(f"\n(c) MixPHM against a Pfeiffer adapter of the same bottleneck ({BACKBONE}, batch {BATCH}, "
          "the step of (b))")
    w = max(len(k) for k in steppers)
    best = {k: min(s.times) for k, s in steppers.items()}
    print(f"    {'setup':<{w}} | {'step ms':>8} | {'/ pfeiffer':>10} | {'fastest step: ms':>16} | {'/ pfeiffer':>10} | "
          f"{'aten ops':>8}")
    for label in steppers:
        print(f"    {label:<{w}} | {1e3 * med[label]:8.1f} | {med[label] / ref:10.3f} | {1e3 * best[label]:16.1f} | "
              f"{best[label] / best[f'pfeiffer (bottleneck {m})']:10.3f} | {ops[label]:8d}")
    print("    target: mixphm / pfeiffer <= 1.1 (the median steps; the fastest steps are less sensitive to machine load)")
    print("    aten ops: the operator calls of one whole step, views included (a step this small is bound by them)")


def _timed(runs: dict, reps: int, warmup: int) -> dict[str, float]:
    """Median seconds of each callable, called round-robin."""
    times = {k: [] for k in runs}
    for i in range(warmup + reps):
        for k, f in runs.items():
            t0 = time.perf_counter()
            f()
            if i >= warmup:
                times[k].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}


def bench_t5_base_shapes(reps: int, warmup: int) -> None:
    """The PHM layer pair and the redundancy loss at T5-base sizes (forward + backward)."""
    from workbench.methods._phm import PHMLinear
    from workbench.methods.mixphm import redundancy_loss, redundancy_loss_factored

    torch.manual_seed(0)
    d, m, rows = 768, 64, BATCH * 60
    print(f"\n    T5-base shapes (d {d}, m {m}, n 4, r 8, {rows} tokens), forward + backward")
    down, up = PHMLinear(d, m, n=4, rank=8), PHMLinear(m, d, n=4, rank=8, experts=4)
    lin_down, lin_up = torch.nn.Linear(d, m), torch.nn.Linear(m, d)
    x = torch.randn(rows, d, requires_grad=True)
    g = torch.randn(rows, d)

    def phm(path):
        def f():
            down.path = up.path = path
            (up(torch.nn.functional.gelu(down(x)), 1) * g).sum().backward()
        return f

    def linear():
        (lin_up(torch.nn.functional.gelu(lin_down(x))) * g).sum().backward()

    runs = {"2 x nn.Linear": linear, "PHM pair, path='dense' (W materialised)": phm("dense"),
            "PHM pair, path='auto'": phm("auto")}
    med = _timed(runs, reps, warmup)
    w = max(len(k) for k in runs) + 2
    paths = f"Down {down.path_for(rows)!r}, Up {up.path_for(rows)!r}"
    for k in runs:
        note = f"   ({paths})" if k.endswith("'auto'") else ""
        print(f"    {k:<{w}} | {1e3 * med[k]:8.2f} ms | {med[k] / med['2 x nn.Linear']:5.2f} x the linears{note}")

    modules = 12  # a stack of T5-base: the losses of its 12 modules are computed together
    z = torch.randn(modules, rows, m, requires_grad=True)
    wu = (0.05 * torch.randn(modules, m, d)).requires_grad_()
    bu = torch.randn(modules, d, requires_grad=True)
    f = torch.randn(modules, rows, d, requires_grad=True)

    def loss(factored):
        def run():
            u = z @ wu + bu.unsqueeze(1)
            red = redundancy_loss_factored(u, z, wu, bu, f, BATCH) if factored else redundancy_loss(u, f, BATCH)
            red.sum().backward()
        return run

    runs = {"redundancy loss, direct (d x d over the tokens)": loss(False),
            "redundancy loss, through the Up factors": loss(True)}
    med = _timed(runs, max(3, reps // 5), 1)
    ref = med["redundancy loss, direct (d x d over the tokens)"]
    print(f"    ({modules} modules of a stack, u = z W + b computed in both)")
    for k in runs:
        print(f"    {k:<{w}} | {1e3 * med[k]:8.2f} ms | {med[k] / ref:5.2f} x direct")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per setup")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--matmul-n", type=int, default=2048, help="size of the square matmuls of (a)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: OMP_NUM_THREADS / torch's)")
    ap.add_argument("--parts", default="abc", help="which parts to run (default: abc)")
    ap.add_argument("--no-native", action="store_true",
                    help="do not repeat (a) and (b) with the machine's native kernels when the numerics are pinned")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {numerics()}")
    print(load_note())
    peak32, n32 = peak_gflops(torch.float32, args.matmul_n)
    peak16, n16 = peak_gflops(torch.bfloat16, args.matmul_n)
    if "a" in args.parts:
        print(f"\n(a) dense matmul, best of 8: fp32 {peak32:.1f} GFLOP/s (n = {n32}), bf16 {peak16:.1f} GFLOP/s "
              f"(n = {n16})")
    batches = make_batches(args.warmup + args.steps) if set(args.parts) & set("bc") else []
    if "b" in args.parts:
        bench_full(batches, args.warmup, peak32, peak16)
    if "c" in args.parts:
        bench_mixphm(batches, args.warmup)
        bench_t5_base_shapes(args.steps, args.warmup)
    pinned = any(os.environ.get(k) for k in PINNED_CPU_ENV)
    if pinned and not args.no_native and set(args.parts) & set("ab"):
        # The same (a) and (b) with the machine's own kernels (AVX-512, native bf16, ...), for comparison.
        env = {k: v for k, v in os.environ.items() if k not in PINNED_CPU_ENV}
        env["WORKBENCH_CPU_NUMERICS"] = "native"
        cmd = [sys.executable, __file__, "--parts", "ab", "--no-native", "--steps", str(args.steps),
               "--warmup", str(args.warmup), "--matmul-n", str(args.matmul_n)]
        if args.threads:
            cmd += ["--threads", str(args.threads)]
        print("\n== the same with native CPU kernels (WORKBENCH_CPU_NUMERICS=native)", flush=True)
        subprocess.run(cmd, env=env, check=True)
    print(f"\n{load_note()}\n(bench_step: {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
