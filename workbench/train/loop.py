"""The trainer: ``run(config) -> RunResult`` under the low-resource protocol.

One run = build the backbone, draw the (train, dev) split, look up the cached visual features,
apply the method, train with AdamW + linear warm-up/decay + clipping, evaluate on dev every
``eval_every`` epochs keeping the best trainable state, stop early, score the last and the
dev-best states on test, and write everything to the run store atomically.
"""

from __future__ import annotations

import math
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import Example, load_task, low_resource_split
from ..utils import pick_device, seed_everything
from .config import RunConfig
from .metrics import accuracy_by_type, caption_scores
from .store import RunStore

CAPTION_TASKS = ("shapes-caption",)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or inf; the run is recorded as failed at ``step``."""

    def __init__(self, step: int, value: float, run_hash: str):
        self.step, self.value, self.run_hash = step, value, run_hash
        super().__init__(
            f"run {run_hash}: the training loss became {value} at step {step}; the run is recorded as failed "
            "(try a lower lr or a smaller grad_clip)"
        )


@dataclass
class RunResult:
    """What a run produced (also what the run store holds)."""

    config: RunConfig
    metrics: dict
    history: list
    params: dict
    timings: dict
    path: Path | None = None
    reused: bool = False
    predictions: dict = field(default_factory=dict, repr=False)

    @property
    def hash(self) -> str:
        return self.config.hash

    @property
    def test_accuracy(self) -> float:
        return self.metrics["test"]["overall"]

    def summary(self) -> str:
        m = self.metrics
        return (
            f"{self.config.method:>10} N={self.config.n_shots:<5} seed={self.config.seed:<4} "
            f"test={m['test']['overall']:.3f} (last {m['test_last']['overall']:.3f}) "
            f"dev={m['dev_best']:.3f} trainable={self.params['trainable_pct']:.2f}%"
        )


# ------------------------------------------------------------------------------------ data
@dataclass
class Split:
    """A split ready for the model: features, tokenised prompts and targets, the examples."""

    examples: list
    feats: torch.Tensor  # [n, n_visual, feat_dim]
    prompt_ids: torch.Tensor  # [n, Lp], padded
    prompt_mask: torch.Tensor
    labels: torch.Tensor  # [n, Lt], -100 padded

    def __len__(self):
        return len(self.examples)

    def batch(self, idx):
        ids, mask, labels = self.prompt_ids[idx], self.prompt_mask[idx], self.labels[idx]
        lp = int(mask.sum(1).max())  # trim columns that are padding for the whole batch
        lt = int((labels != -100).sum(1).max())
        return self.feats[idx], ids[:, :lp].contiguous(), mask[:, :lp].contiguous(), labels[:, :lt].contiguous()


def features_for(model, examples, cfg: RunConfig) -> dict:
    """Visual features per image id: the embedded encoder (cached on disk) or a feature store."""
    store_path = cfg.task_options.get("features")
    if store_path is not None:
        from ..data import FeatureStore

        store = FeatureStore(store_path, feat_dim=model.config.feat_dim)
        return {e.image_id: store[e.image_id] for e in examples}
    if model.visual_encoder is None:
        raise ValueError(
            f"backbone {cfg.backbone!r} has no visual encoder: set task_options={{'features': <feature store path>}}"
        )
    from ..models.visual import extract_features

    return extract_features(model.visual_encoder, examples, key=f"{cfg.task}", quiet=cfg.quiet)


def prepare_split(model, examples: list[Example], feats: dict, device) -> Split:
    ids, mask = model.encode_prompts([e.prompt for e in examples])
    labels = model.encode_targets([e.target for e in examples])
    x = torch.from_numpy(np.stack([feats[e.image_id] for e in examples]).astype(np.float32))
    if device.type == "cuda":
        x = x.pin_memory()  # one pinned host->device copy per split
    return Split(examples, x.to(device, non_blocking=True), ids.to(device), mask.to(device), labels.to(device))


def load_splits(cfg: RunConfig):
    """(train, dev, test) example lists under the low-resource protocol."""
    opts = {k: v for k, v in cfg.task_options.items() if k != "features"}
    pool_opts = dict(opts)
    if cfg.pool_size is not None and cfg.task.startswith("shapes"):
        pool_opts["n_scenes"] = cfg.pool_size
    pool = load_task(cfg.task, "train", **pool_opts)
    train, dev = low_resource_split(pool, cfg.n_shots, cfg.seed)
    test = load_task(cfg.task, "test", **opts)
    if cfg.test_size is not None:
        test = test[: cfg.test_size]
    return train, dev, test


# ------------------------------------------------------------------------------ optimiser
def _no_decay(name: str) -> bool:
    n = name.lower()
    return n.endswith("bias") or "layer_norm" in n or "layernorm" in n or ".norm" in n or "projector.1." in n


def build_optimizer(handle, cfg: RunConfig, lr: float, total_steps: int):
    """AdamW without weight decay on biases and LayerNorms; linear warm-up then linear decay."""
    params = handle.trainable_parameters()
    if not params:
        raise ValueError(f"method {cfg.method!r} left no trainable parameter")
    groups = [
        {"params": [p for n, p in params if not _no_decay(n)], "weight_decay": cfg.weight_decay},
        {"params": [p for n, p in params if _no_decay(n)], "weight_decay": 0.0},
    ]
    opt = torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, eps=cfg.adam_eps)
    warmup = max(1, int(cfg.warmup_ratio * total_steps))

    def schedule(step):
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return opt, torch.optim.lr_scheduler.LambdaLR(opt, schedule)


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def predict(model, split: Split, cfg: RunConfig, batch_size: int = 256) -> list[str]:
    """Greedy (or beam) decoding of every example of ``split``."""
    was_training = model.training
    model.eval()
    out = []
    max_new = cfg.max_new_tokens if cfg.task not in CAPTION_TASKS else max(cfg.max_new_tokens, 64)
    try:
        for start in range(0, len(split), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(split)))
            feats, ids, mask, _ = split.batch(idx)
            with _autocast(feats.device, cfg.bf16):
                out += model.generate_text(feats, ids, mask, num_beams=cfg.num_beams, max_new_tokens=max_new)
    finally:
        model.train(was_training)
    return out


def score(predictions: list[str], examples: list[Example], task: str) -> dict:
    """Accuracy overall and per question type (VQA), or CIDEr / BLEU-4 (captioning)."""
    if task in CAPTION_TASKS:
        scores = caption_scores(
            {e.id: p for e, p in zip(examples, predictions)}, {e.id: list(e.answers) for e in examples}
        )
        return {"overall": scores["CIDEr"], **scores, "per_type": {}}
    return accuracy_by_type(predictions, examples)


def _autocast(device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------ run
def run(config: RunConfig | None = None, *, force: bool = False, store: RunStore | str | None = None,
        **overrides) -> RunResult:
    """Train and evaluate one configuration, or return the stored result.

    Args:
        config: the run (defaults to ``RunConfig()``); ``overrides`` replace its fields.
        force: retrain even if the run store already holds this configuration.
        store: a :class:`RunStore` or a directory (default ``runs/`` or ``$WORKBENCH_RUNS``).

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the failure is recorded in the store).
    """
    from tqdm.auto import tqdm

    from .. import methods
    from ..models import load_backbone

    cfg = (config or RunConfig()).replace(**overrides) if overrides else (config or RunConfig())
    store = store if isinstance(store, RunStore) else RunStore(store)
    if not force and store.is_finished(cfg.hash):
        return load_run(cfg.hash, store)

    t_start = time.perf_counter()
    seed_everything(cfg.seed)
    device = pick_device(cfg.device)
    model = load_backbone(cfg.backbone, device=device)
    train_ex, dev_ex, test_ex = load_splits(cfg)
    feats = features_for(model, train_ex + dev_ex + test_ex, cfg)
    train, dev, test = (prepare_split(model, ex, feats, device) for ex in (train_ex, dev_ex, test_ex))

    handle = methods.apply(model, cfg.method, **cfg.method_config)
    params = methods.count_parameters(model)
    lr = cfg.lr if cfg.lr is not None else handle.config.lr
    steps_per_epoch = math.ceil(len(train) / (cfg.batch_size * cfg.grad_accum))
    total_steps = cfg.max_steps or steps_per_epoch * cfg.epochs
    opt, sched = build_optimizer(handle, cfg, lr, total_steps)
    trainable = [p for _, p in handle.trainable_parameters()]

    gen = torch.Generator().manual_seed(cfg.seed)
    history, best, best_state, bad_evals = [], -1.0, None, 0
    step, samples, train_time = 0, 0, 0.0
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=total_steps, disable=cfg.quiet, desc=f"{cfg.method} N={cfg.n_shots}", unit="step")
    model.train()
    try:
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            order = torch.randperm(len(train), generator=gen)
            losses = []
            micro = [order[i : i + cfg.batch_size] for i in range(0, len(train), cfg.batch_size)]
            for k, idx in enumerate(micro):
                feats_b, ids, mask, labels = train.batch(idx.to(train.feats.device))
                with _autocast(device, cfg.bf16):
                    out = model(feats_b, ids, mask, labels=labels)
                    loss = out.loss + sum(handle.extra_losses().values(), torch.zeros((), device=device))
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(step, float(loss.detach()), cfg.hash)
                (loss / cfg.grad_accum).backward()
                losses.append(float(loss.detach()))
                samples += len(idx)
                if (k + 1) % cfg.grad_accum == 0 or k == len(micro) - 1:
                    if cfg.grad_clip:
                        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                    opt.step()
                    sched.step()
                    opt.zero_grad(set_to_none=True)
                    step += 1
                    bar.update(1)
                    if step >= total_steps:
                        break
            train_time += time.perf_counter() - t0
            record = {"epoch": epoch, "step": step, "loss": float(np.mean(losses))}
            if epoch % cfg.eval_every == 0 or step >= total_steps or epoch == cfg.epochs:
                record["dev"] = score(predict(model, dev, cfg), dev_ex, cfg.task)["overall"]
                if record["dev"] > best:
                    best, best_state, bad_evals = record["dev"], handle.state_dict(), 0
                else:
                    bad_evals += 1
                bar.set_postfix(loss=f"{record['loss']:.3f}", dev=f"{record['dev']:.3f}")
            history.append(record)
            if bad_evals >= cfg.patience or step >= total_steps:
                break
    except NonFiniteLossError as e:
        bar.close()
        store.write_failure(cfg.hash, {"config": cfg.to_dict(), "reason": str(e), "step": e.step,
                                       "history": history})
        raise
    bar.close()

    test_pred_last = predict(model, test, cfg)
    last = score(test_pred_last, test_ex, cfg.task)
    handle.load_state_dict(best_state)
    test_pred = predict(model, test, cfg)
    metrics = {
        "test": score(test_pred, test_ex, cfg.task),
        "test_last": last,
        "dev_best": best,
        "best_epoch": max((h for h in history if "dev" in h), key=lambda h: h["dev"])["epoch"],
        "epochs_run": history[-1]["epoch"],
        "steps": step,
        "lr": lr,
    }
    timings = {
        "wall_s": time.perf_counter() - t_start,
        "train_s": train_time,
        "samples_per_s": samples / max(train_time, 1e-9),
        "peak_memory_mb": _peak_memory_mb(device),
        "device": str(device),
        "bf16": bool(device.type == "cuda" and cfg.bf16),
    }
    path = store.write(cfg.hash, {"config": cfg.to_dict(), "metrics": metrics, "history": history,
                                  "params": params, "timings": timings,
                                  "predictions": {e.id: p for e, p in zip(test_ex, test_pred)}},
                       tensors=handle.state_dict())
    return RunResult(cfg, metrics, history, params, timings, path, reused=False,
                     predictions={e.id: p for e, p in zip(test_ex, test_pred)})


def load_run(run_hash: str, store: RunStore | None = None) -> RunResult:
    """A finished run from the store."""
    store = store or RunStore()
    rec = store.read(run_hash)
    return RunResult(RunConfig.from_dict(rec["config"]), rec["metrics"], rec["history"], rec["params"],
                     rec["timings"], store.path(run_hash), reused=True, predictions=rec.get("predictions", {}))


def load_results(store: RunStore | str | None = None):
    """Every finished run as one pandas DataFrame (config fields, metrics, per-type accuracy)."""
    import pandas as pd

    store = store if isinstance(store, RunStore) else RunStore(store)
    rows = []
    for h in store.finished():
        r = load_run(h, store)
        row = {"run": h, **{k: v for k, v in r.config.to_dict().items() if not isinstance(v, dict)}}
        row["method_config"] = r.config.method_config
        row["test_acc"] = r.metrics["test"]["overall"]
        row["test_acc_last"] = r.metrics["test_last"]["overall"]
        row["dev_best"] = r.metrics["dev_best"]
        for t, v in r.metrics["test"].get("per_type", {}).items():
            row[f"acc/{t}"] = v
        row["trainable"] = r.params["trainable"]
        row["trainable_pct"] = r.params["trainable_pct"]
        row["samples_per_s"] = r.timings["samples_per_s"]
        row["wall_s"] = r.timings["wall_s"]
        rows.append(row)
    return pd.DataFrame(rows)
