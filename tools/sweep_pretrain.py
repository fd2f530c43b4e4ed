"""Try a pre-training recipe: pretrain vlt5-tiny with it, then fine-tune on shapes-vqa; one JSON line per result.

    python tools/sweep_pretrain.py NAME '{"fill_share": 0.2}' ['[["full", 1000, 1e-3, 15], ...]']
    python tools/sweep_pretrain.py base '{"ckpt": "data/checkpoints/vlt5-tiny"}'   # fine-tune only

Each fine-tuning entry is [method, N, lr, epochs] (epochs turned into a step budget) (seed 13, 500 test questions). Pre-trains on
CUDA unless DEV=cpu; results go to $OUT/sweep/NAME.jsonl (default /tmp). Used for the recipe
sweep reported in the README ("Where things stand"); run several at once on a GPU machine.
"""
import json
import os
import sys
import time
from pathlib import Path

from workbench.train.pretrain import PretrainConfig, pretrain
from workbench.train import RunConfig, run

DEFAULT_FINE_TUNING = [["full", 1000, 1e-3, 15], ["lora", 1000, 5e-3, 15], ["full", 64, 1e-3, 40]]


def main(name: str, over: dict, fts: list | None) -> None:
    out = Path(os.environ.get("OUT", "/tmp")) / "sweep"
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{name}.jsonl", "a") as log:

        def emit(**kw):
            line = json.dumps({**kw, "variant": name})
            log.write(line + "\n")
            log.flush()
            print(line, flush=True)

        t = time.time()
        if "ckpt" in over:
            ck = over["ckpt"]
        else:
            ck = Path("/tmp/ck") / name
            _, rep = pretrain(PretrainConfig(**over), out=ck, quiet=True, device=os.environ.get("DEV", "cuda"))
            s = rep["test_scores"]
            emit(stage="pretrain", s=round(time.time() - t), cs=s["color_shape_correct"], full=s["fully_correct"],
                 cider=s["CIDEr"], loss=rep["final_loss"])
        base = RunConfig(backbone=str(ck), task="shapes-vqa", seed=13, test_size=500, patience=10, quiet=True)
        for method, n, lr, ep in fts or DEFAULT_FINE_TUNING:
            t = time.time()
            steps_per_epoch = -(-n // base.batch_size)
            r = run(base.replace(method=method, n_shots=n, lr=lr, max_steps=ep * steps_per_epoch,
                                 eval_every=(2 if n <= 64 else 3) * steps_per_epoch))
            emit(stage="ft", method=method, n=n, lr=lr, epochs=ep, s=round(time.time() - t), acc=r.test_accuracy,
                 dev=r.metrics["dev_best"], best_step=r.metrics["best_step"],
                 per_type={k: round(v, 2) for k, v in r.metrics["test"]["per_type"].items()})


if __name__ == "__main__":
    main(sys.argv[1], json.loads(sys.argv[2]), json.loads(sys.argv[3]) if len(sys.argv) > 3 else None)
