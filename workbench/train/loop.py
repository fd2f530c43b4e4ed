"""The trainer: ``run(config) -> RunResult`` under the low-resource protocol.

One run = build the backbone, draw the (train, dev) split from the task's pool, look up the
visual features (the embedded encoder's cache, or a feature store streamed batch by batch), apply
the method, train with AdamW + linear warm-up/decay + clipping, evaluate on dev every
``eval_every`` epochs keeping the best trainable state, stop early, score the last and the
dev-best states on test, and write everything to the run store atomically.

Everything task-specific comes from the task's :class:`~workbench.data.TaskSpec` (answer length,
metric, pool split and size, whether a feature store is required), never from its name. Bad input
(missing files, images missing from the store, a feature dimension that disagrees) is reported
before training starts.
"""

from __future__ import annotations

import math
import resource
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data import Example, FeatureStore, TaskSpec, get_task_spec, low_resource_split
from ..eval import answer_soft_scores, evaluate
from ..utils import numerics_fingerprint, pick_device, seed_everything
from . import optim
from .config import RunConfig, hash_of
from .store import DONE, DamagedRunError, DamagedRunWarning, RunStore

# task_options read by the trainer itself; every other option goes to the task's loader.
TRAINER_TASK_OPTIONS = ("features", "target")
# VQA training targets: "sample" (the official VL-T5 / MixPHM code) or "most_frequent".
TARGETS = ("sample", "most_frequent")
# Salt of the answer-sampling generator's seed: its draws never touch the shuffling generator.
_ANSWER_SEED_SALT = 0xA75


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
class Batch:
    """One batch; unpacks as ``feats, prompt_ids, prompt_mask, labels`` (the visual mask is extra).

    ``visual_mask`` is ``[b, n_visual]`` bool, False on zero-padded regions, or None when every
    image of the split has the same number of visual tokens (then nothing is padded).
    """

    feats: torch.Tensor
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    labels: torch.Tensor
    visual_mask: torch.Tensor | None = None

    def __iter__(self):
        return iter((self.feats, self.prompt_ids, self.prompt_mask, self.labels))


class AnswerTable:
    """Training targets sampled in proportion to their VQA soft scores (:func:`workbench.eval.answer_soft_scores`).

    Only examples with more than one distinct (normalised) answer get an entry: the others always
    train on ``Example.target``, and drawing nothing for them keeps one-answer tasks unchanged.
    """

    def __init__(self, model, examples):
        texts, self.rows, self.probs = [], {}, {}
        for i, e in enumerate(examples):
            scored = answer_soft_scores(e.answers)
            if len(scored) < 2:
                continue
            self.rows[i] = np.arange(len(texts), len(texts) + len(scored))
            weights = np.array([s for _, s in scored], dtype=np.float64)
            self.probs[i] = np.cumsum(weights / weights.sum())
            texts += [a for a, _ in scored]
        self.labels = model.encode_targets(texts) if texts else None

    def __len__(self):
        return len(self.rows)

    def draw(self, indices: list[int], rng: np.random.Generator) -> tuple[list[int], list[int]]:
        """``(batch rows, label rows)`` for the examples of ``indices`` that have a choice."""
        rows = [r for r, i in enumerate(indices) if i in self.rows]
        if not rows:
            return [], []
        u = rng.random(len(rows))
        picked = []
        for k, r in enumerate(rows):
            cum = self.probs[indices[r]]
            j = min(int(np.searchsorted(cum, u[k] * cum[-1], side="right")), len(cum) - 1)
            picked.append(int(self.rows[indices[r]][j]))
        return rows, picked


@dataclass
class Split:
    """A split ready for the model: tokenised prompts and targets, the examples, their features.

    Features are either held in memory (``feats [n, n_visual, feat_dim]``, the embedded encoder's
    cache) or streamed batch by batch from a :class:`FeatureStore` (``store`` with ``image_ids``),
    so that scoring a split of hundreds of thousands of questions never holds all its features.
    """

    examples: list
    feats: torch.Tensor | None  # [n, n_visual, feat_dim], or None when streamed from `store`
    prompt_ids: torch.Tensor  # [n, Lp], padded
    prompt_mask: torch.Tensor
    labels: torch.Tensor  # [n, Lt], -100 padded: Example.target
    visual_mask: torch.Tensor | None = None  # [n, n_visual] for in-memory features of unequal sizes
    store: FeatureStore | None = None
    image_ids: list | None = None
    device: torch.device | None = None
    answers: AnswerTable | None = None  # sampled VQA targets (training split only)

    def __len__(self):
        return len(self.examples)

    def batch(self, idx, answer_rng: np.random.Generator | None = None) -> Batch:
        """The batch of rows ``idx`` (a tensor on the split's device).

        With ``answer_rng`` and an answer table, each example with several distinct answers gets
        a target drawn in proportion to its soft score; the others keep ``Example.target``.
        """
        ids, mask, labels = self.prompt_ids[idx], self.prompt_mask[idx], self.labels[idx]
        if answer_rng is not None and self.answers is not None and len(self.answers):
            rows, picked = self.answers.draw(idx.tolist(), answer_rng)
            if rows:
                choice = self.answers.labels[picked]
                width = max(labels.shape[1], choice.shape[1])
                new = torch.full((labels.shape[0], width), -100, dtype=labels.dtype, device=labels.device)
                new[:, : labels.shape[1]] = labels
                new[rows] = torch.nn.functional.pad(choice, (0, width - choice.shape[1]), value=-100).to(labels.device)
                labels = new
        lp = int(mask.sum(1).max())  # trim columns that are padding for the whole batch
        lt = int((labels != -100).sum(1).max())
        if self.feats is not None:
            feats = self.feats[idx]
            vmask = self.visual_mask[idx] if self.visual_mask is not None else None
        else:
            x, m = self.store.get_batch([self.image_ids[i] for i in idx.tolist()])
            feats, vmask = _to_device(torch.from_numpy(x), self.device), _to_device(torch.from_numpy(m), self.device)
        return Batch(feats, ids[:, :lp].contiguous(), mask[:, :lp].contiguous(), labels[:, :lt].contiguous(), vmask)


def _to_device(x: torch.Tensor, device) -> torch.Tensor:
    if device is not None and device.type == "cuda":
        return x.pin_memory().to(device, non_blocking=True)
    return x if device is None else x.to(device)


def loader_options(cfg: RunConfig) -> dict:
    """``cfg.task_options`` without the ones the trainer reads (``features``, ``target``)."""
    return {k: v for k, v in cfg.task_options.items() if k not in TRAINER_TASK_OPTIONS}


def open_feature_store(cfg: RunConfig, feat_dim: int | None = None) -> FeatureStore | None:
    """The store named by ``task_options["features"]`` (None without one); errors name the option."""
    path = cfg.task_options.get("features")
    if path is None:
        return None
    try:
        return FeatureStore(path, feat_dim=feat_dim)
    except (FileNotFoundError, ValueError) as e:
        raise type(e)(f"task_options['features']: {e}") from None


def check_task_options(cfg: RunConfig, spec: TaskSpec) -> None:
    """Reject trainer options that cannot work with this task (before anything is loaded)."""
    target = cfg.task_options.get("target", "sample")
    if target not in TARGETS:
        raise ValueError(f"task_options['target'] must be one of {list(TARGETS)}, got {target!r}")
    if spec.needs_features and cfg.task_options.get("features") is None:
        raise ValueError(
            f"task {cfg.task!r} needs a feature store: set task_options['features'] to an HDF5 or npz file of "
            "visual features keyed by image id (see data/README.md); its images are not rendered or encoded "
            "by the backbone"
        )
    if cfg.pool_size is not None and not spec.has_pool_size:
        raise ValueError(
            f"pool_size applies to tasks whose pool size is an option (e.g. ShapesWorld's n_scenes); task "
            f"{cfg.task!r} has a fixed pool: leave pool_size=None (use task_options['limit'] where the task has it)"
        )


def features_for(model, examples, cfg: RunConfig):
    """Visual features per image id: a :class:`FeatureStore` (``task_options["features"]``, read
    batch by batch) or the embedded encoder's features (a dict, cached on disk).

    A store serves real datasets, and embedded tasks on a backbone without a visual encoder; it is
    refused for an embedded task on a backbone with its own encoder (it would bypass the encoder).
    """
    store = open_feature_store(cfg, feat_dim=model.config.feat_dim)
    if store is not None:
        if model.visual_encoder is not None and not get_task_spec(cfg.task).needs_features:
            # The backbone's projector was trained on its own encoder's features: a store would
            # silently replace them. A store serves backbones without an encoder.
            raise ValueError(
                f"task {cfg.task!r} has images that backbone {cfg.backbone!r} encodes with its own visual encoder; "
                "task_options['features'] would bypass it: drop the option, or use a backbone without a visual "
                "encoder for precomputed features"
            )
        check_store(store, examples, model, cfg)
        return store
    if model.visual_encoder is None:
        raise ValueError(
            f"backbone {cfg.backbone!r} has no visual encoder: set task_options={{'features': <feature store path>}}"
        )
    from ..models.visual import extract_features

    return extract_features(model.visual_encoder, examples, key=f"{cfg.task}", quiet=cfg.quiet)


def check_store(store: FeatureStore, examples, model, cfg: RunConfig) -> None:
    """Every image of ``examples`` is in the store and has the backbone's feature dimension."""
    missing = store.missing(e.image_id for e in examples)
    if missing:
        raise ValueError(
            f"the feature store {store.path} (task_options['features']) has no features for {len(missing)} "
            f"image(s) of task {cfg.task!r}, e.g. image {missing[0]!r} (others: {missing[1:4]}); the store's keys "
            f"look like {store.keys()[:3]}: build the store over these images, or match its keys with "
            "task_options['image_id_format']"
        )
    if not examples:
        return
    first = examples[0].image_id
    dim = store.shape(first)[-1]
    if dim != model.config.feat_dim:
        source = (f"backbone_options['feat_dim']={cfg.backbone_options['feat_dim']}"
                  if "feat_dim" in cfg.backbone_options else f"the backbone's feat_dim {model.config.feat_dim}")
        raise ValueError(
            f"{source} disagrees with the feature store {store.path} (task_options['features']): its image "
            f"{first!r} has feat_dim {dim}; set backbone_options={{'feat_dim': {dim}}} or use a store of "
            f"{model.config.feat_dim}-d features"
        )


def prepare_split(model, examples: list[Example], feats, device, sample_answers: bool = False) -> Split:
    """Tokenise a split and attach its features (``feats``: a dict ``image_id -> array`` or a store).

    ``sample_answers`` builds the table of soft-scored answers that training draws targets from.
    """
    ids, mask = model.encode_prompts([e.prompt for e in examples])
    labels = model.encode_targets([e.target for e in examples])
    answers = AnswerTable(model, examples) if sample_answers else None
    common = dict(device=device, answers=answers)
    if isinstance(feats, FeatureStore):
        return Split(examples, None, ids.to(device), mask.to(device), labels.to(device), store=feats,
                     image_ids=[e.image_id for e in examples], **common)
    arrays = [feats[e.image_id] for e in examples]
    visual_mask = None
    if len({a.shape for a in arrays}) <= 1:
        x = torch.from_numpy(np.stack(arrays).astype(np.float32))
    else:  # unequal numbers of visual tokens: zero-pad and mask
        n = max(a.shape[0] for a in arrays)
        x = torch.zeros(len(arrays), n, arrays[0].shape[1])
        visual_mask = torch.zeros(len(arrays), n, dtype=torch.bool)
        for row, a in enumerate(arrays):
            x[row, : a.shape[0]] = torch.from_numpy(np.asarray(a, dtype=np.float32))
            visual_mask[row, : a.shape[0]] = True
        visual_mask = visual_mask.to(device)
    if device.type == "cuda":
        x = x.pin_memory()  # one pinned host->device copy per split
    return Split(examples, x.to(device, non_blocking=True), ids.to(device), mask.to(device), labels.to(device),
                 visual_mask=visual_mask, **common)


def load_splits(cfg: RunConfig):
    """(train, dev, test) example lists under the low-resource protocol.

    The pool is the spec's ``pool_split`` (its size set by ``cfg.pool_size`` where the spec has a
    pool-size option), train and dev the seeded draw of ``n_shots`` each, test the spec's
    ``test_split`` (its first ``cfg.test_size`` examples).
    """
    spec = get_task_spec(cfg.task)
    check_task_options(cfg, spec)
    opts = loader_options(cfg)
    pool_opts = dict(opts)
    if cfg.pool_size is not None:
        pool_opts[spec.pool_size_option] = cfg.pool_size
    pool = spec.load(spec.pool_split, **pool_opts)
    train, dev = low_resource_split(pool, cfg.n_shots, cfg.seed)
    test = spec.load(spec.test_split, **opts)
    if cfg.test_size is not None:
        test = test[: cfg.test_size]
    for name, examples in (("train", train), ("dev", dev), ("test", test)):
        unscored = next((e for e in examples if not e.answers), None)
        if unscored is not None:
            raise ValueError(
                f"task {cfg.task!r}: example {unscored.id!r} of the {name} split has no reference answer; "
                "a run needs annotated splits (the test questions of VQA v2 / GQA come without answers)"
            )
    return train, dev, test


# ------------------------------------------------------------------------------ optimiser
def build_optimizer(handle, cfg: RunConfig, lr: float, total_steps: int):
    """The run's AdamW and schedule (:func:`workbench.train.optim.build_optimizer`): no weight decay on
    biases and LayerNorms, linear warm-up over ``warmup_ratio`` of the steps, then linear decay to 0."""
    params = handle.trainable_parameters()
    if not params:
        raise ValueError(f"method {cfg.method!r} left no trainable parameter")
    return optim.build_optimizer(params, lr, total_steps, warmup_steps=max(1, int(cfg.warmup_ratio * total_steps)),
                                 weight_decay=cfg.weight_decay, eps=cfg.adam_eps, decay="linear")


# ------------------------------------------------------------------------------ evaluation
@torch.no_grad()
def predict(model, split: Split, cfg: RunConfig, batch_size: int = 256) -> list[str]:
    """Greedy (or beam) decoding of every example of ``split``, batch by batch.

    The budget is ``max(cfg.max_new_tokens, the task's max_answer_length)`` new tokens.
    """
    was_training = model.training
    model.eval()
    out = []
    max_new = max(cfg.max_new_tokens, get_task_spec(cfg.task).max_answer_length)
    try:
        for start in range(0, len(split), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(split)), device=split.prompt_ids.device)
            b = split.batch(idx)
            with _autocast(b.feats.device, cfg.bf16):
                out += model.generate_text(b.feats, b.prompt_ids, b.prompt_mask, visual_mask=b.visual_mask,
                                           num_beams=cfg.num_beams, max_new_tokens=max_new)
    finally:
        model.train(was_training)
    return out


def score(predictions: list[str], examples: list[Example], task: str | TaskSpec) -> dict:
    """The task's metric (:func:`workbench.eval.evaluate`): accuracy overall and per question type
    (``"vqa"``, ``"exact"``), or CIDEr-D with BLEU-4 (``"cider"``)."""
    spec = task if isinstance(task, TaskSpec) else get_task_spec(task)
    return evaluate(predictions, examples, spec.metric)


def _autocast(device, bf16: bool):
    if device.type == "cuda" and bf16:
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast(device.type, enabled=False)


def _peak_memory_mb(device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ------------------------------------------------------------------------------------ run
def build_backbone(cfg: RunConfig, device, store: FeatureStore | None = None):
    """``load_backbone(cfg.backbone, device=device, **cfg.backbone_options)``; errors name the option."""
    from ..models import load_backbone

    try:
        return load_backbone(cfg.backbone, device=device, **cfg.backbone_options)
    except TypeError as e:  # an option load_backbone does not know
        raise TypeError(f"RunConfig.backbone_options: {e}") from None
    except ValueError as e:
        if "feat_dim" in str(e) and "feat_dim" not in cfg.backbone_options:
            hint = ""
            if store is not None and len(store):
                hint = f" (the feature store has feat_dim {store.shape(store.keys()[0])[-1]})"
            raise ValueError(f"{e}; set RunConfig.backbone_options={{'feat_dim': ...}}{hint}") from None
        raise


def build_run(cfg: RunConfig, spec: TaskSpec, feature_store: FeatureStore | None, device):
    """What a run starts from, in the trainer's order (so a seed gives the same model and draws):
    seed, backbone, the low-resource splits, their features, the prepared splits.
    Returns ``(model, train, dev, test)``; the method is applied by the caller."""
    seed_everything(cfg.seed)
    model = build_backbone(cfg, device, feature_store)
    if feature_store is not None:
        feature_store.close()  # reopened with the backbone's feat_dim by features_for
    train_ex, dev_ex, test_ex = load_splits(cfg)
    feats = features_for(model, train_ex + dev_ex + test_ex, cfg)
    sample = spec.kind == "vqa" and cfg.task_options.get("target", "sample") == "sample"
    train = prepare_split(model, train_ex, feats, device, sample_answers=sample)
    dev, test = (prepare_split(model, ex, feats, device) for ex in (dev_ex, test_ex))
    return model, train, dev, test


def run(config: RunConfig | None = None, *, force: bool = False, store: RunStore | str | None = None,
        **overrides) -> RunResult:
    """Train and evaluate one configuration, or return the stored result.

    Args:
        config: the run (defaults to ``RunConfig()``); ``overrides`` replace its fields.
        force: retrain even if the run store already holds this configuration.
        store: a :class:`RunStore` or a directory (default ``runs/`` or ``$WORKBENCH_RUNS``).

    Before training starts, bad input raises with the option to fix named: a missing dataset
    folder or official file (FileNotFoundError), a task that needs a feature store without
    ``task_options["features"]``, an image missing from the store, a ``feat_dim`` that disagrees
    with the store, an unknown option.

    VQA training targets: with ``task_options["target"] = "sample"`` (default) each use of an
    example with several distinct human answers trains on one answer drawn in proportion to its
    VQA soft score (0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / 4+ humans, the table of the official
    VL-T5 / MixPHM code), from a generator of its own seeded by ``cfg.seed``; ``"most_frequent"``
    always trains on ``Example.target``. One-answer tasks draw nothing and are unaffected.

    Runs are reused only when whole: a stored run that is damaged (a truncated or edited file, a
    config that no longer matches its hash) is reported with a warning and trained again. Two
    processes running the same config never train it at once: the second waits on the run's lock
    (``.locks/<hash>.lock`` in the store) and then returns the first one's result (``reused=True``).

    Raises:
        NonFiniteLossError: the loss became NaN/inf (the failure is recorded in the store).
        StoreNotWritableError: the store's directory cannot be written (before any training).
    """
    cfg = (config or RunConfig()).replace(**overrides) if overrides else (config or RunConfig())
    store = store if isinstance(store, RunStore) else RunStore(store)
    payload = cfg.hash_payload()
    run_hash = hash_of(payload)
    if not force:
        stored = stored_run(run_hash, store)
        if stored is not None:
            return stored
    store.check_writable()

    def waiting():
        if not cfg.quiet:
            print(f"run {run_hash}: another process is training this config; waiting for it "
                  f"(lock {store.root / '.locks' / (run_hash + '.lock')})", file=sys.stderr, flush=True)

    with store.lock(run_hash, on_wait=waiting):
        store.recover(run_hash)
        if not force:  # finished by another process while this one waited
            stored = stored_run(run_hash, store)
            if stored is not None:
                return stored
        return _train(cfg, store, run_hash, payload)


def stored_run(run_hash: str, store: RunStore) -> RunResult | None:
    """The stored run if it is finished and whole; None (with a warning if it is damaged) otherwise."""
    if not store.is_finished(run_hash):
        return None
    try:
        return load_run(run_hash, store)
    except DamagedRunError as e:
        warnings.warn(f"{e}; training the run again", DamagedRunWarning, stacklevel=3)
    except FileNotFoundError:  # removed between the check and the read
        pass
    return None


def _train(cfg: RunConfig, store: RunStore, run_hash: str, payload: dict) -> RunResult:
    """Train, evaluate and publish one run (called under the run's lock)."""
    from tqdm.auto import tqdm

    from .. import methods

    t_start = time.perf_counter()
    spec = get_task_spec(cfg.task)
    check_task_options(cfg, spec)
    feature_store = open_feature_store(cfg)  # a missing file fails before the backbone is built
    device = pick_device(cfg.device)
    model, train, dev, test = build_run(cfg, spec, feature_store, device)
    train_ex, dev_ex, test_ex = train.examples, dev.examples, test.examples
    sample = train.answers is not None

    handle = methods.apply(model, cfg.method, **cfg.method_config)
    params = {**methods.count_parameters(model), "projector_note": handle.projector_note}
    lr = cfg.lr if cfg.lr is not None else handle.config.lr
    total_steps, eval_every = cfg.budget()
    steps_per_epoch = math.ceil(len(train) / (cfg.batch_size * cfg.grad_accum))
    opt, sched = build_optimizer(handle, cfg, lr, total_steps)
    trainable = [p for _, p in handle.trainable_parameters()]
    eval_stats = getattr(handle, "eval_statistics", None)
    eval_stats = eval_stats if callable(eval_stats) else None

    gen = torch.Generator().manual_seed(cfg.seed)
    answer_rng = np.random.default_rng([cfg.seed, _ANSWER_SEED_SALT]) if sample else None
    history, best, best_step, best_state, bad_evals = [], -1.0, 0, None, 0
    step, samples, train_time, losses = 0, 0, 0.0, []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    bar = tqdm(total=total_steps, disable=cfg.quiet, desc=f"{cfg.method} N={cfg.n_shots}", unit="step")
    model.train()
    done = False
    try:
        while not done:  # epochs: one shuffled pass over the training split each
            order = torch.randperm(len(train), generator=gen)
            micro = [order[i : i + cfg.batch_size] for i in range(0, len(train), cfg.batch_size)]
            t0 = time.perf_counter()
            for k, idx in enumerate(micro):
                b = train.batch(idx.to(train.prompt_ids.device), answer_rng=answer_rng)
                with _autocast(device, cfg.bf16):
                    def forward(b=b):
                        return model(b.feats, b.prompt_ids, b.prompt_mask, labels=b.labels, visual_mask=b.visual_mask)

                    loss = handle.loss(forward)
                if not torch.isfinite(loss):
                    raise NonFiniteLossError(step, float(loss.detach()), cfg.hash)
                (loss / cfg.grad_accum).backward()
                losses.append(float(loss.detach()))
                samples += len(idx)
                if (k + 1) % cfg.grad_accum != 0 and k != len(micro) - 1:
                    continue
                if cfg.grad_clip:
                    torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                bar.update(1)
                if step % eval_every and step < total_steps:
                    continue
                train_time += time.perf_counter() - t0
                record = {"step": step, "epoch": round(step / steps_per_epoch, 3), "loss": float(np.mean(losses)),
                          "dev": score(predict(model, dev, cfg), dev_ex, spec)["overall"]}
                if eval_stats is not None:  # e.g. PETAL's mode gates: how they evolve over training
                    stats = eval_stats()
                    if stats:
                        record["method"] = stats
                losses = []
                if record["dev"] > best:
                    best, best_step, best_state, bad_evals = record["dev"], step, handle.state_dict(), 0
                else:
                    bad_evals += 1
                bar.set_postfix(loss=f"{record['loss']:.3f}", dev=f"{record['dev']:.3f}")
                history.append(record)
                t0 = time.perf_counter()
                if bad_evals >= cfg.patience or step >= total_steps:
                    done = True
                    break
            else:
                train_time += time.perf_counter() - t0
    except NonFiniteLossError as e:
        bar.close()
        store.write_failure(cfg.hash, {"config": cfg.to_dict(), "reason": str(e), "step": e.step,
                                       "history": history})
        raise
    bar.close()
    method_stats = handle.training_statistics()  # e.g. expert draw counts: not in the weights

    test_pred_last = predict(model, test, cfg)
    last = score(test_pred_last, test_ex, spec)
    handle.load_state_dict(best_state)
    test_pred = predict(model, test, cfg)
    metrics = {
        "test": score(test_pred, test_ex, spec),
        "test_last": last,
        "dev_best": best,
        "best_step": best_step,
        "steps": step,
        "evals": len(history),
        "stopped_early": step < total_steps,
        "lr": lr,
    }
    if method_stats:
        metrics["method_stats"] = method_stats
    timings = {
        "wall_s": time.perf_counter() - t_start,
        "train_s": train_time,
        "samples_per_s": samples / max(train_time, 1e-9),
        "peak_memory_mb": _peak_memory_mb(device),
        "device": str(device),
        "bf16": bool(device.type == "cuda" and cfg.bf16),
        "numerics": numerics_fingerprint(),  # what the floats depend on (utils.pin_cpu_numerics)
    }
    path = store.write(run_hash, {"config": cfg.to_dict(), "identity": {"hash": run_hash, "payload": payload},
                                  "metrics": metrics, "history": history,
                                  "params": params, "timings": timings,
                                  "predictions": {e.id: p for e, p in zip(test_ex, test_pred)}},
                       tensors=handle.state_dict())
    return RunResult(cfg, metrics, history, params, timings, path, reused=False,
                     predictions={e.id: p for e, p in zip(test_ex, test_pred)})


# Records every run has (``predictions`` and ``identity`` are absent from older runs).
_REQUIRED = ("config", "metrics", "history", "params", "timings")


def load_run(run_hash: str, store: RunStore | str | None = None) -> RunResult:
    """A finished run from the store, checked: its files against ``DONE``, its config against its hash.

    Raises:
        FileNotFoundError: no finished run ``run_hash`` in the store.
        DamagedRunError: the run is damaged; the error names the directory and the file.
    """
    store = store if isinstance(store, RunStore) else RunStore(store)
    rec = store.read(run_hash)
    path = store.locate(run_hash) or store.path(run_hash)
    for name in _REQUIRED:
        if name not in rec:
            raise DamagedRunError(path, f"{name}.json", "the file is missing")
    try:
        cfg = config_of(rec)
    except (TypeError, ValueError) as e:
        raise DamagedRunError(path, "config.json", f"not a valid RunConfig ({e})") from None
    _check_identity(cfg, rec.get("identity"), run_hash, path)
    try:
        result = RunResult(cfg, rec["metrics"], rec["history"], rec["params"], rec["timings"], path, reused=True,
                           predictions=rec.get("predictions", {}))
        for key in ("test", "test_last"):
            float(result.metrics[key]["overall"])
        float(result.metrics["dev_best"])
        float(result.params["trainable_pct"])
        float(result.timings["wall_s"])
    except (KeyError, TypeError, ValueError) as e:
        raise DamagedRunError(path, None, f"a record lacks an entry or has the wrong type ({type(e).__name__}: {e})") from None
    return result


@dataclass
class RestoredRun:
    """A stored run rebuilt: its backbone with the method applied and the trained weights loaded,
    and its splits (``train``, ``dev``, ``test``), ready for probes and re-scoring.

    Built by :func:`restore_run`. ``weights`` says what the method holds: ``"trained"`` (the run's
    best checkpoint, what its test score was computed with) or ``"init"`` (the method as the run
    initialised it, before any step: "before training").
    """

    result: RunResult
    model: torch.nn.Module
    handle: object
    train: Split
    dev: Split
    test: Split
    weights: str = "trained"

    @property
    def config(self) -> RunConfig:
        return self.result.config

    def split(self, name: str) -> Split:
        if name not in ("train", "dev", "test"):
            raise ValueError(f"split must be 'train', 'dev' or 'test', got {name!r}")
        return getattr(self, name)

    def batches(self, split: str = "test", batch_size: int = 64, max_samples: int | None = None) -> list[dict]:
        """The split as model keyword batches (``visual_feats``, ``input_ids``, ``attention_mask``,
        ``labels``, ``visual_mask``) in its order: what :func:`workbench.models.capture` and
        :func:`workbench.studies.redundancy_analysis` take."""
        s = self.split(split)
        n = len(s) if max_samples is None else min(len(s), int(max_samples))
        out = []
        for start in range(0, n, batch_size):
            idx = torch.arange(start, min(n, start + batch_size), device=s.prompt_ids.device)
            b = s.batch(idx)
            out.append(dict(visual_feats=b.feats, input_ids=b.prompt_ids, attention_mask=b.prompt_mask,
                            labels=b.labels, visual_mask=b.visual_mask))
        return out

    def predict(self, split: str = "test") -> list[str]:
        """Greedy (or the run's beam) answers on a split, in eval mode."""
        self.model.eval()
        return predict(self.model, self.split(split), self.config)

    def score(self, split: str = "test") -> dict:
        """The task's metrics on a split (``score(...)["overall"]`` is the run's headline number)."""
        s = self.split(split)
        return score(self.predict(split), s.examples, self.config.task)


def restore_run(run: RunResult | str, store: RunStore | str | None = None, weights: str = "trained",
                device=None) -> RestoredRun:
    """Rebuild a stored run's trained model and splits, as the trainer built them.

    Args:
        run: a :class:`RunResult` (e.g. from :func:`run` or :func:`load_run`) or a run hash.
        store: the run store holding it (a bundle from :func:`workbench.studies.load_study` too).
        weights: ``"trained"`` (the run's stored method weights: its best checkpoint) or ``"init"``
            (the method as the run's seed initialised it, before training).
        device: where to build the model (default: the CPU).

    The order of the trainer is replayed (seed, backbone, splits, features, method), so the ``init``
    weights are the run's own initial ones. Raises ``FileNotFoundError`` when the store has no
    weights for the run (a bundle keeps them only for the runs its study's ``keep_weights`` names)
    before building anything.
    """
    from .. import methods

    if weights not in ("trained", "init"):
        raise ValueError(f"weights must be 'trained' or 'init', got {weights!r}")
    store = store if isinstance(store, RunStore) else RunStore(store)
    result = run if isinstance(run, RunResult) else load_run(run, store)
    cfg = result.config
    state = None
    if weights == "trained":
        path = store.locate(cfg.hash) if result.path is None else Path(result.path)
        file = None if path is None else Path(path) / "method.safetensors"
        if file is None or not file.is_file():
            raise FileNotFoundError(
                f"run {cfg.hash} ({cfg.method} N={cfg.n_shots} seed={cfg.seed}) has no stored method weights"
                f"{'' if path is None else f' in {path}'}; a bundle keeps them only for the runs its study's "
                "keep_weights selects (weights='init' rebuilds the untrained method)")
        from safetensors.torch import load_file

        try:
            state = load_file(str(file))
        except Exception as e:  # noqa: BLE001 - any unreadable file is a damaged run
            raise DamagedRunError(path, "method.safetensors", f"unreadable ({type(e).__name__}: {e})") from None
    spec = get_task_spec(cfg.task)
    model, train, dev_split, test = build_run(cfg, spec, open_feature_store(cfg),
                                              torch.device(device) if device is not None else torch.device("cpu"))
    handle = methods.apply(model, cfg.method, **cfg.method_config)
    if state is not None:
        handle.load_state_dict(state)
    model.eval()
    return RestoredRun(result, model, handle, train, dev_split, test, weights)


def config_of(rec: dict) -> RunConfig:
    """The config a stored run was trained with: its ``config.json``, and, where that leaves the
    learning rate to the method's default and the default has changed since (LoRA's went from 3e-3
    to 1.5e-3), the learning rate its identity record resolved. Such a run is not damaged: it is the
    run at that spelled-out learning rate, under the hash it always had.

    Raises TypeError / ValueError for a record that is not a valid RunConfig."""
    cfg = RunConfig.from_dict(rec["config"])
    payload = rec["identity"].get("payload") if isinstance(rec.get("identity"), dict) else None
    trained = payload.get("lr") if isinstance(payload, dict) else None
    if cfg.lr is None and isinstance(trained, (int, float)) and not isinstance(trained, bool):
        try:
            default = cfg.default_lr()
        except Exception:  # noqa: BLE001 - e.g. a method that no longer exists: _check_identity says so
            return cfg
        if default is not None and trained != default:
            cfg = cfg.replace(lr=float(trained))
    return cfg


def _check_identity(cfg: RunConfig, identity, run_hash: str, path) -> None:
    """The stored config must be the one the run's hash was computed from."""
    if identity is None:  # a run written before identity.json: recompute the hash from the current files
        try:
            actual = cfg.hash
        except Exception as e:  # noqa: BLE001 - e.g. a method that no longer exists
            raise DamagedRunError(path, "config.json", f"its hash cannot be computed ({e})") from None
        if actual != run_hash:
            raise DamagedRunError(path, "config.json", f"the config hashes to {actual}, not {run_hash} (edited after "
                                  "the run, or the run predates a change of checkpoint or method defaults)")
        return
    try:
        payload = identity["payload"]
        ok = hash_of(payload) == run_hash == identity["hash"]
        mine = {k: v for k, v in cfg.hash_fields().items() if k != "method_config"}
        ok = ok and all(payload.get(k) == v for k, v in mine.items())
        ok = ok and set(payload) - set(mine) <= set(_DERIVED)
        ok = ok and all(payload["method_config"].get(k) == v for k, v in cfg.method_config.items() if k != "lr")
    except (KeyError, TypeError, AttributeError) as e:
        raise DamagedRunError(path, "identity.json", f"not a valid identity record ({e})") from None
    if not ok:
        raise DamagedRunError(path, "config.json", f"the config does not match the run's hash {run_hash} "
                              "(config.json or identity.json was edited after the run was written)")


# Entries of a hash payload that are not config fields.
_DERIVED = ("method_config", "backbone_fingerprint", "features_fingerprint", "data_fingerprint")


def metric_columns(test: dict) -> dict:
    """The test split's scalar metrics besides the headline, as ``test/<name>`` columns (e.g.
    ``test/BLEU-4`` and ``test/CIDEr`` for captioning)."""
    return {f"test/{k}": float(v) for k, v in test.items()
            if k not in ("overall", "n", "per_type") and isinstance(v, (int, float)) and not isinstance(v, bool)}


def load_results(store: RunStore | str | None = None):
    """Every finished run as one pandas DataFrame (config fields, metrics, per-type accuracy).

    A damaged run (a truncated or edited file, a config that does not match its hash) and a stray
    directory holding ``DONE`` are skipped, each with a :class:`DamagedRunWarning` naming the
    directory and the file; the other runs are returned.
    """
    import pandas as pd

    store = store if isinstance(store, RunStore) else RunStore(store)
    rows = []
    runs, stray = store.scan()
    for p in stray:
        warnings.warn(f"skipping {p}: a directory holding {DONE} that is not a run (left by an interrupted "
                      "write; delete it)", DamagedRunWarning, stacklevel=2)
    legacy = []
    for h in runs:
        try:
            r = load_run(h, store)
        except DamagedRunError as e:
            if "`epochs` is gone" in e.reason:  # not damaged: written before budgets were counted in steps
                legacy.append(h)
            else:
                warnings.warn(f"skipping {e}", DamagedRunWarning, stacklevel=2)
            continue
        except FileNotFoundError:  # replaced or removed while the store was read
            continue
        row = {"run": h, **{k: v for k, v in r.config.to_dict().items() if not isinstance(v, dict)}}
        row["method_config"] = r.config.method_config
        row["test_acc"] = r.metrics["test"]["overall"]
        row["test_acc_last"] = r.metrics["test_last"]["overall"]
        row["dev_best"] = r.metrics["dev_best"]
        for t, v in r.metrics["test"].get("per_type", {}).items():
            row[f"acc/{t}"] = v
        row.update(metric_columns(r.metrics["test"]))
        row["trainable"] = r.params.get("trainable")
        row["trainable_pct"] = r.params["trainable_pct"]
        row["samples_per_s"] = r.timings.get("samples_per_s")
        row["wall_s"] = r.timings["wall_s"]
        row["method_stats"] = r.metrics.get("method_stats")  # e.g. expert draw counts (MixPHM, AdaMix)
        rows.append(row)
    if legacy:  # one warning, not one per run: a store kept across the change holds many
        warnings.warn(f"skipping {len(legacy)} runs of {store.root} written before budgets were counted in steps "
                      f"(their config has `epochs`; e.g. {', '.join(legacy[:3])}): they cannot be compared with "
                      "runs of the current protocol; delete them or move them to another store",
                      DamagedRunWarning, stacklevel=2)
    return pd.DataFrame(rows)
