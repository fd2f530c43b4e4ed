"""Trainer throughput on vlt5-tiny, and its overhead against a bare PyTorch loop.

    python tests/bench/bench_trainer.py      # (make bench)

For full fine-tuning and LoRA: training steps/s of ``workbench.train.run`` (N = 64 shapes-vqa,
batch 16), and the ratio of its step time to a bare loop (forward, backward, clip, AdamW step)
on the same model and the same batches. Target: overhead under 10 % (ratio < 1.10).
"""

import tempfile
import time

import torch

from workbench import methods
from workbench.models import load_backbone
from workbench.train import RunConfig, run
from workbench.train.loop import features_for, load_splits, prepare_split
from workbench.utils import seed_everything

EPOCHS = 30


def bare_loop(cfg: RunConfig, steps: int) -> float:
    """Seconds per step of the plainest loop on the same data (every step timed, as the trainer's)."""
    seed_everything(cfg.seed)
    model = load_backbone(cfg.backbone)
    train_ex, dev_ex, test_ex = load_splits(cfg)
    train = prepare_split(model, train_ex, features_for(model, train_ex, cfg), torch.device("cpu"))
    handle = methods.apply(model, cfg.method)
    params = [p for _, p in handle.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=handle.config.lr)
    model.train()
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for _ in range(steps):  # batching is part of any loop's step, as it is of the trainer's
        f, ids, mask, labels = train.batch(torch.randperm(len(train), generator=gen)[: cfg.batch_size])
        loss = model(f, ids, mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    return (time.perf_counter() - t0) / steps


def main():
    torch.set_num_threads(2)
    print(f"{'method':>8} | {'trainer steps/s':>15} | {'bare steps/s':>12} | {'trainer / bare step time':>24}")
    for method in ("full", "lora"):
        cfg = RunConfig(method=method, n_shots=64, max_steps=4 * EPOCHS, eval_every=4 * EPOCHS, patience=1, quiet=True,
                        test_size=16)
        with tempfile.TemporaryDirectory() as store:
            res = run(cfg, store=store, force=True)
        trainer_step = res.timings["train_s"] / res.metrics["steps"]
        bare_step = bare_loop(cfg, res.metrics["steps"])
        print(f"{method:>8} | {1 / trainer_step:15.2f} | {1 / bare_step:12.2f} | {trainer_step / bare_step:24.3f}")


if __name__ == "__main__":
    main()
