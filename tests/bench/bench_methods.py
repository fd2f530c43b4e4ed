"""Training-step time of every registered method on vlt5-tiny, and the inference cost of MixPHM.

    python tests/bench/bench_methods.py      # (make bench)

1. For every method of ``workbench.methods.list_methods()`` (official defaults) on ``vlt5-tiny``:
   the time of one training step -- forward, the method's extra losses, backward, AdamW step --
   on shapes-vqa batches of 16 (N = 64, seed 13), median over ``--steps`` steps after
   ``--warmup`` warm-up steps, as a ratio to LoRA's. The methods are stepped round-robin, so a
   change of machine load hits them all alike. A method that cannot be applied to vlt5-tiny
   (dimensions not divisible, ...) is listed with the reason instead.
2. Inference (eval mode, no grad, batch 16): a teacher-forced forward and greedy generation for
   MixPHM with its experts merged into one ("expert soup") against a single Pfeiffer adapter of
   the same bottleneck. Target: about 1 -- merging removes the expert overhead. MixPHM in train
   mode (random routing, one expert drawn per module and call) and the bare backbone are printed
   for reference. Both use ``--bottleneck`` (default 12: MixPHM's default on vlt5-tiny, d // 12 = 10
   rounded up to a multiple of its n = 4).
"""

from __future__ import annotations

import argparse
import statistics
import time
import warnings

import torch

from workbench import methods
from workbench.models import load_backbone
from workbench.train import RunConfig
from workbench.train.loop import features_for, load_splits, prepare_split
from workbench.utils import seed_everything

BACKBONE = "vlt5-tiny"
BATCH = 16


def make_batches(count: int, seed: int = 0) -> list:
    """``count`` batches of 16 from the N = 64 shapes-vqa training split (features cached on disk)."""
    cfg = RunConfig(task="shapes-vqa", n_shots=64, seed=13, test_size=16, quiet=True)
    model = load_backbone(BACKBONE)
    train_ex, _, _ = load_splits(cfg)
    split = prepare_split(model, train_ex, features_for(model, train_ex, cfg), torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    return [split.batch(torch.randperm(len(split), generator=gen)[:BATCH]) for _ in range(count)]


def short(e: Exception, width: int = 230) -> str:
    text = f"{type(e).__name__}: {e}".replace("\n", " ")
    return text if len(text) <= width else text[: width - 3] + "..."


class Trainee:
    """One method on a fresh backbone, with its optimiser; ``step`` times one training step."""

    def __init__(self, name: str, **options):
        seed_everything(0)
        self.name = name
        self.model = load_backbone(BACKBONE)
        self.handle = methods.apply(self.model, name, **options)
        self.pct = methods.count_parameters(self.model)["trainable_pct"]
        params = [p for _, p in self.handle.trainable_parameters()]
        self.opt = torch.optim.AdamW(params, lr=self.handle.config.lr or 1e-3, eps=1e-6)
        self.model.train()
        self.times: list[float] = []

    def step(self, batch) -> float:
        feats, ids, mask, labels = batch
        t0 = time.perf_counter()
        def forward():
            return self.model(feats, ids, mask, labels=labels)

        self.handle.loss(forward).backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        return time.perf_counter() - t0


def bench_training(names: list[str], batches: list, warmup: int, extra: dict | None = None) -> None:
    """``extra``: ``{label: (method, options)}`` rows added after the registry's (e.g. MixPHM at a
    bottleneck that fits vlt5-tiny)."""
    runs = {name: (name, {}) for name in names} | dict(extra or {})
    trainees, failed = {}, {}
    for label, (name, options) in runs.items():
        try:
            trainees[label] = Trainee(name, **options)
        except Exception as e:  # a method that does not fit vlt5-tiny is reported, not fatal
            failed[label] = f"cannot apply: {short(e)}"
    for i, batch in enumerate(batches):
        for name, t in list(trainees.items()):
            try:
                dt = t.step(batch)
            except Exception as e:
                failed[name] = f"training step failed: {short(e)}"
                del trainees[name]
                continue
            if i >= warmup:
                t.times.append(dt)
    med = {name: statistics.median(t.times) for name, t in trainees.items()}
    ref = med.get("lora")
    print(f"training step (forward + extra losses + backward + AdamW), batch {BATCH}, "
          f"median of {len(batches) - warmup} steps after {warmup} warm-up, {torch.get_num_threads()} threads")
    width = max(15, *(len(label) for label in runs))
    print(f"{'method':>{width}} | {'trainable %':>11} | {'step ms':>8} | {'/ lora':>7}")
    print(f"{'-' * width}-+-{'-' * 11}-+-{'-' * 8}-+-{'-' * 7}")
    for label in runs:
        if label in med:
            ratio = f"{med[label] / ref:7.2f}" if ref else f"{'n/a':>7}"
            print(f"{label:>{width}} | {trainees[label].pct:11.2f} | {1e3 * med[label]:8.1f} | {ratio}")
        else:
            print(f"{label:>{width}} | {'-':>11} | {'-':>8} | {'-':>7}   {failed[label]}")


def bench_inference(batches: list, bottleneck: int, reps: int, warmup: int) -> None:
    setups = [
        ("backbone, no method", None, {}, False),
        (f"pfeiffer (bottleneck={bottleneck})", "pfeiffer", {"bottleneck": bottleneck}, False),
        (f"mixphm eval, merged soup (bottleneck={bottleneck})", "mixphm", {"bottleneck": bottleneck}, False),
        (f"mixphm train mode, random routing", "mixphm", {"bottleneck": bottleneck}, True),
    ]
    models = {}
    for label, name, options, training in setups:
        seed_everything(0)
        model = load_backbone(BACKBONE)
        try:
            if name is not None:
                methods.apply(model, name, **options)
        except Exception as e:
            print(f"{label}: cannot apply: {short(e)}")
            continue
        model.train(training)
        models[label] = model
    fwd = {k: [] for k in models}
    gen = {k: [] for k in models}
    with torch.no_grad():
        for i in range(warmup + reps):
            feats, ids, mask, labels = batches[i % len(batches)]
            for label, model in models.items():  # round-robin: load drift hits every setup alike
                t0 = time.perf_counter()
                model(feats, ids, mask, labels=labels)
                t1 = time.perf_counter()
                model.generate_text(feats, ids, mask, num_beams=1, max_new_tokens=8)
                t2 = time.perf_counter()
                if i >= warmup:
                    fwd[label].append(t1 - t0)
                    gen[label].append(t2 - t1)
    ref = f"pfeiffer (bottleneck={bottleneck})"
    if ref not in models:
        return
    f_ref, g_ref = statistics.median(fwd[ref]), statistics.median(gen[ref])
    print(f"\ninference, no grad, batch {BATCH}, median of {reps} after {warmup} warm-up "
          f"(forward: teacher-forced with the answer; generate: greedy, up to 8 new tokens)")
    print(f"{'setup':>48} | {'forward ms':>10} | {'/ pfeiffer':>10} | {'generate ms':>11} | {'/ pfeiffer':>10}")
    print(f"{'-' * 48}-+-{'-' * 10}-+-{'-' * 10}-+-{'-' * 11}-+-{'-' * 10}")
    for label in models:
        f, g = statistics.median(fwd[label]), statistics.median(gen[label])
        print(f"{label:>48} | {1e3 * f:10.2f} | {f / f_ref:10.2f} | {1e3 * g:11.2f} | {g / g_ref:10.2f}")
    soup = f"mixphm eval, merged soup (bottleneck={bottleneck})"
    if soup in models:
        print(f"\nmerged MixPHM / Pfeiffer, same bottleneck: forward {statistics.median(fwd[soup]) / f_ref:.2f}, "
              f"generate {statistics.median(gen[soup]) / g_ref:.2f}   (target: about 1)")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20, help="timed training steps per method")
    ap.add_argument("--warmup", type=int, default=3, help="warm-up steps (training and inference)")
    ap.add_argument("--reps", type=int, default=50, help="timed inference repetitions per setup")
    ap.add_argument("--bottleneck", type=int, default=12, help="MixPHM and Pfeiffer bottleneck for part 2")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--methods", nargs="*", default=None, help="a subset of the registry (default: all)")
    args = ap.parse_args(argv)
    warnings.filterwarnings("ignore")  # peft's CUDA-extension and BitFit notices are not results
    torch.set_num_threads(args.threads)
    names = args.methods or methods.list_methods()
    if "lora" not in names:
        names = ["lora", *names]
    t0 = time.perf_counter()
    batches = make_batches(args.warmup + args.steps)
    print(f"{BACKBONE}: {len(names)} methods, torch {torch.__version__}\n")
    bench_training(names, batches, args.warmup)
    bench_inference(batches, args.bottleneck, args.reps, args.warmup)
    print(f"\n(bench_methods: {time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
