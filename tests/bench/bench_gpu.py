"""The training step on a GPU: throughput, peak memory and model FLOP utilisation (skips without CUDA).

    python tests/bench/bench_gpu.py                          # (make bench; a note and exit on a CPU machine)
    python tests/bench/bench_gpu.py --batch 64,256 --compile --cuda-graphs
    python tests/bench/bench_gpu.py --device cpu --shape tiny --steps 2 --compile   # smoke-run the code path

1. ``workbench.train.run`` on vlt5-tiny (shapes-vqa, N = 1000, batch 16, 3 epochs), full and
   LoRA: samples/s and peak memory as the run records them (CUDA only).
2. A T5-base-shaped VL-T5 (random weights; 12 + 12 layers, d_model 768; 36 region features of
   2048-d as in VL-T5; prompt 20 tokens, answer 4): for each method, batch size and setup, the
   training step's steps/s, samples/s, peak memory and **model FLOP utilisation** -- the
   forward + backward FLOPs of a step (``FlopCounterMode``) times steps/s, as a fraction of the
   device's dense matmul rate in the step's compute dtype, measured in the same run (both printed).

Setups, each adding to the one before: ``fp32``; ``bf16`` (autocast); ``+ fused AdamW``;
``+ compile`` (``torch.compile`` of the model, ``--compile``); ``+ CUDA graphs`` (``torch.compile``
mode ``reduce-overhead``, ``--cuda-graphs``). The backbone traces as one graph; AdaMix and MixPHM
draw an expert per forward as a Python int (the official routing), so they compile in pieces.
"""

import argparse
import contextlib
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

from bench_step import matmul_gflops, sync  # this folder: the scripts run as `python tests/bench/...`
from workbench import methods
from workbench.models.testing import tiny_vlmodel
from workbench.train import RunConfig, run

# Model and input sizes: "base" is VL-T5 on T5-base; "tiny" only smoke-tests the code path on a CPU.
SHAPES = {
    "base": dict(d_model=768, layers=12, heads=12, d_ff=3072, feat_dim=2048, regions=36, prompt=20, answer=4),
    "tiny": dict(d_model=32, layers=2, heads=4, d_ff=64, feat_dim=16, regions=4, prompt=6, answer=3),
}
SETUPS = ("fp32", "bf16", "+ fused AdamW", "+ compile", "+ CUDA graphs")


def tiny_trainer(epochs: int = 3) -> None:
    print("vlt5-tiny through workbench.train.run (shapes-vqa N=1000, batch 16, bf16 autocast):")
    for method, lr in (("full", 1e-3), ("lora", 5e-3)):
        r = run(RunConfig(method=method, n_shots=1000, lr=lr, max_steps=63 * epochs, eval_every=63 * epochs, quiet=True,
                          test_size=200), force=True, store="/tmp/bench_gpu_runs")
        t = r.timings
        print(f"  {method:<6} {t['samples_per_s']:8.0f} samples/s   "
              f"peak memory {t['peak_memory_mb']:7.1f} MiB")


def base_sized(method: str, setup: str, batch: int, steps: int, device: str, shape: dict,
               warmup: int = 5) -> dict:
    """steps/s, peak MiB and FLOPs per step of forward + backward + clip + AdamW on a VLModel of ``shape``."""
    level = SETUPS.index(setup)
    bf16, fused, compiled, graphs = level >= 1, level >= 2, level >= 3, level >= 4
    torch.manual_seed(0)
    model = tiny_vlmodel("t5", feat_dim=shape["feat_dim"], d_model=shape["d_model"], layers=shape["layers"],
                         heads=shape["heads"], d_ff=shape["d_ff"], dropout=0.1).to(device)
    handle = methods.apply(model, method)
    params = [p for _, p in handle.trainable_parameters()]
    opt = torch.optim.AdamW(params, lr=1e-4, fused=True if fused else None)
    model.train()
    vocab = model.tokenizer.vocab_size
    feats = torch.randn(batch, shape["regions"], shape["feat_dim"], device=device)
    ids = torch.randint(3, vocab, (batch, shape["prompt"]), device=device)
    mask = torch.ones_like(ids)
    labels = torch.randint(3, vocab, (batch, shape["answer"]), device=device)
    forward = model
    if compiled:
        forward = torch.compile(model, mode="reduce-overhead" if graphs else None)
    autocast = torch.autocast(device, dtype=torch.bfloat16) if bf16 else contextlib.nullcontext()

    def loss():
        with autocast:
            def fwd():
                return forward(feats, ids, mask, labels=labels)

            return handle.loss(fwd)  # AdaMix's consistency loss runs a second forward

    def step():
        loss().backward()
        torch.nn.utils.clip_grad_norm_(params, 5.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    with FlopCounterMode(display=False) as counter:  # eager, so the count is the model's, not the compiler's
        with autocast:
            out = model(feats, ids, mask, labels=labels)
        out.loss.backward()
    opt.zero_grad(set_to_none=True)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(warmup):
        step()
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    rate = steps / (time.perf_counter() - t0)
    peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else float("nan")
    del model, forward, opt
    if device == "cuda":
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return {"steps_s": rate, "peak_mib": peak, "flops": counter.get_total_flops()}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per setup (after 5 warm-up steps)")
    parser.add_argument("--batch", default="64", help="batch sizes, comma-separated (e.g. 64,256)")
    parser.add_argument("--methods", default="full,lora,pfeiffer,compacter,mixphm,vlpet")
    parser.add_argument("--compile", action="store_true", help="add the torch.compile setup")
    parser.add_argument("--cuda-graphs", action="store_true",
                        help="add torch.compile mode='reduce-overhead' (CUDA graphs; implies --compile)")
    parser.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    parser.add_argument("--shape", default="base", choices=tuple(SHAPES))
    parser.add_argument("--matmul-n", type=int, default=None, help="size of the square matmuls of the rate "
                        "(default: 8192 on CUDA, 512 on a CPU)")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing to measure (the CPU figures are in the other benches)")
        return
    batches = [int(b) for b in args.batch.split(",")]
    setups = list(SETUPS[:3])
    if args.compile or args.cuda_graphs:
        setups.append(SETUPS[3])
    if args.cuda_graphs:
        if args.device != "cuda":
            parser.error("--cuda-graphs needs --device cuda")
        setups.append(SETUPS[4])
    device, shape = args.device, SHAPES[args.shape]
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU"
    print(f"device: {name}  torch {torch.__version__}")
    if device == "cuda":
        tiny_trainer()
    n = args.matmul_n or (8192 if device == "cuda" else 512)
    rate = {name: 1e9 * matmul_gflops(n, dtype, 10, device)
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16))}
    print(f"\ndense matmul rate (n = {n}): fp32 {rate['fp32'] / 1e12:.1f} TFLOP/s, bf16 {rate['bf16'] / 1e12:.1f} "
          "TFLOP/s (model FLOP utilisation is measured against the setup's compute dtype)")
    print(f"\n{args.shape} shape: {shape['layers']} + {shape['layers']} layers, d_model {shape['d_model']}, "
          f"{shape['regions']} regions x {shape['feat_dim']}-d, prompt {shape['prompt']}, answer {shape['answer']}")
    print(f"  {'method':<10} {'batch':>5} {'setup':<14} {'steps/s':>8} {'samples/s':>9} {'TFLOP/s':>8} "
          f"{'MFU':>6} {'peak MiB':>9}")
    for method in args.methods.split(","):
        for batch in batches:
            for setup in setups:
                r = base_sized(method, setup, batch, args.steps, device, shape)
                achieved = r["flops"] * r["steps_s"]
                mfu = achieved / rate["fp32" if setup == "fp32" else "bf16"]
                print(f"  {method:<10} {batch:>5} {setup:<14} {r['steps_s']:8.2f} {r['steps_s'] * batch:9.0f} "
                      f"{achieved / 1e12:8.3f} {mfu:6.1%} {r['peak_mib']:9.0f}", flush=True)
    print("  target: model FLOP utilisation >= 30 % in bf16 (against the measured bf16 matmul rate)")


if __name__ == "__main__":
    main()
