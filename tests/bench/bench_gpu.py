"""The trainer on a GPU: throughput and peak memory with bf16 autocast (skips without CUDA).

    python tests/bench/bench_gpu.py      # (make bench; prints a note and exits on a CPU machine)

1. ``workbench.train.run`` on vlt5-tiny (shapes-vqa, N = 1000, batch 16, 3 epochs), full and
   LoRA: samples/s and peak memory as the run records them.
2. A T5-base-shaped VL-T5 (random weights; 12 + 12 layers, d_model 768; 36 region features of
   2048-d as in VL-T5; prompt 20 tokens, answer 4; batch 64): training steps/s, samples/s and
   peak memory for full fine-tuning and several PEFT methods, bf16 autocast against fp32.
"""

import argparse
import time

import torch

from workbench import methods
from workbench.models.testing import tiny_vlmodel
from workbench.train import RunConfig, run


def tiny_trainer(epochs: int = 3) -> None:
    print("vlt5-tiny through workbench.train.run (shapes-vqa N=1000, batch 16, bf16 autocast):")
    for method, lr in (("full", 1e-3), ("lora", 5e-3)):
        r = run(RunConfig(method=method, n_shots=1000, lr=lr, max_steps=63 * epochs, eval_every=63 * epochs, quiet=True,
                          test_size=200), force=True, store="/tmp/bench_gpu_runs")
        t = r.timings
        print(f"  {method:<6} {t['samples_per_s']:8.0f} samples/s   "
              f"peak memory {t['peak_memory_mb']:7.1f} MiB")


def base_sized(method: str, bf16: bool, batch: int, steps: int, warmup: int = 5) -> tuple[float, float]:
    """(steps/s, peak MiB) of forward + backward + AdamW on a T5-base-shaped VLModel."""
    torch.manual_seed(0)
    model = tiny_vlmodel("t5", feat_dim=2048, d_model=768, layers=12, heads=12, d_ff=3072, dropout=0.1).cuda()
    handle = methods.apply(model, method)
    params = [p for _, p in handle.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4)
    model.train()
    feats = torch.randn(batch, 36, 2048, device="cuda")
    ids = torch.randint(3, model.tokenizer.vocab_size, (batch, 20), device="cuda")
    mask = torch.ones_like(ids)
    labels = torch.randint(3, model.tokenizer.vocab_size, (batch, 4), device="cuda")
    torch.cuda.reset_peak_memory_stats()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=bf16):
            loss = model(feats, ids, mask, labels=labels).loss + sum(handle.extra_losses().values(), 0.0)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    for _ in range(warmup):
        step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    rate = steps / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20
    del model, opt
    torch.cuda.empty_cache()
    return rate, peak


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--methods", default="full,lora,pfeiffer,compacter,mixphm,vlpet")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing to measure (the CPU figures are in the other benches)")
        return
    print(f"device: {torch.cuda.get_device_name()}  torch {torch.__version__}")
    tiny_trainer()
    print(f"\nT5-base-shaped VL-T5, batch {args.batch}, 36 regions x 2048-d, prompt 20, answer 4:")
    print(f"  {'method':<10} {'fp32 steps/s':>12} {'bf16 steps/s':>12} {'bf16 speed-up':>13} "
          f"{'bf16 samples/s':>14} {'fp32 peak MiB':>13} {'bf16 peak MiB':>13}")
    for method in args.methods.split(","):
        r32, m32 = base_sized(method, False, args.batch, args.steps)
        r16, m16 = base_sized(method, True, args.batch, args.steps)
        print(f"  {method:<10} {r32:12.2f} {r16:12.2f} {r16 / r32:12.2f}x {r16 * args.batch:14.0f} "
              f"{m32:13.0f} {m16:13.0f}")


if __name__ == "__main__":
    main()
