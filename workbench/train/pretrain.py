"""Pre-train the embedded backbone ``vlt5-tiny`` on ShapesWorld captions (no VQA).

    python -m workbench.train.pretrain            # or: make pretrain
    python -m workbench.train.pretrain --steps 200 --out /tmp/ckpt   # a quick smoke run

Trains the visual CNN, the projector and a small T5 end to end on ``shapes-caption/pretrain``
(captions only, like VL-T5 "novqa"), deterministically (fixed seed and thread count), then
writes the checkpoint and a model card with its config, size, training time and caption scores
on ShapesWorld test. Downstream runs freeze the CNN and cache its features.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..data import load_images, load_task
from ..data.shapesworld import COLORS, POSITIONS, SHAPES, SIZES, ShapesWorld, caption_correctness, parse_caption
from ..models import VLModel, VisualEncoder, build_lm_config, train_tokenizer
from ..utils import repo_root, seed_everything
from .optim import build_optimizer, no_decay_vectors


@dataclass
class PretrainConfig:
    """Everything that determines the embedded checkpoint."""

    seed: int = 0
    n_scenes: int = 20000
    steps: int = 1650  # 838 s on the 2-core reference machine (budget: 15 minutes)
    batch_size: int = 64
    # 5e-4, not 2e-3: at 2e-3 the text-side tasks below were never learned (ground 0.37, fill 0.12
    # on held-out scenes after 2,000 steps); at 5e-4 they are, and they transfer to VQA.
    lr: float = 5e-4
    warmup: int = 150
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    d_model: int = 128
    n_enc_layers: int = 3
    n_dec_layers: int = 3
    n_heads: int = 4
    d_ff: int = 512
    dropout: float = 0.1
    feat_dim: int = 96
    grid: int = 3  # one token per ShapesWorld cell, like region features (one per object)
    channels: str = "32,64,128"  # widths of the CNN's three stride-2 stages
    visual_lr_mult: float = 4.0  # the CNN starts from scratch: it needs a larger step than the T5
    # Grounding objective derived from the captions (like VL-T5's visual grounding task): each
    # grid cell's token predicts the colour / shape / size that the caption names at that
    # position. Needs grid = 3 (one token per ShapesWorld cell); 0 turns it off.
    grounding_weight: float = 1.0
    # Text-side objectives on the same captions (VL-T5's masked LM and image-text matching), so the
    # encoder learns to read a prompt against the image, not only the fixed "caption:" prompt.
    # Each is the share of every batch given to that task; the rest is captioning.
    fill_share: float = 0.3  # "fill: a large _ circle at the _." -> "blue, center"
    match_share: float = 0.1  # "match: <caption, maybe with one attribute swapped>" -> "true" / "false"
    # VL-T5's grounded captioning / visual grounding, on the caption's object phrases:
    # "describe: top left" -> "small red circle" (or "nothing"); "locate: red circle" -> "top left".
    ground_share: float = 0.4
    fill_prob: float = 0.3  # chance that each attribute slot of a caption is masked (at least one is)
    # The first steps train the text-side tasks only (in proportion to their shares): reading a
    # prompt against the image is learned from a fresh model, before captioning takes over.
    text_warmup_steps: int = 0
    vocab_size: int = 600
    threads: int = 2
    eval_scenes: int = 300

    @property
    def text_share(self) -> float:
        """The share of every batch given to the text-side tasks (the rest is captioning)."""
        return self.fill_share + self.match_share + self.ground_share

    def __post_init__(self):
        shares = {"fill_share": self.fill_share, "match_share": self.match_share, "ground_share": self.ground_share}
        if min(shares.values()) < 0 or self.text_share >= 1:
            raise ValueError(f"the task shares must be >= 0 and sum to < 1 (the rest is captioning), got {shares}")
        if not 0 <= self.text_warmup_steps < self.steps:
            raise ValueError(f"text_warmup_steps must be in [0, steps={self.steps}), got {self.text_warmup_steps}")
        if self.text_warmup_steps and not self.text_share:
            raise ValueError("text_warmup_steps needs at least one text-side task share > 0 (fill/match/ground)")


def build_model(cfg: PretrainConfig, texts: list[str]) -> VLModel:
    """A fresh vlt5-tiny: byte-level BPE tokenizer, small T5, CNN encoder and projector."""
    from transformers import T5ForConditionalGeneration

    tokenizer = train_tokenizer(texts, vocab_size=cfg.vocab_size, family="t5")
    lm_config = build_lm_config(
        "t5", tokenizer, d_model=cfg.d_model, n_enc_layers=cfg.n_enc_layers, n_dec_layers=cfg.n_dec_layers,
        n_heads=cfg.n_heads, d_ff=cfg.d_ff, dropout=cfg.dropout,
    )
    lm = T5ForConditionalGeneration(lm_config)
    channels = tuple(int(c) for c in cfg.channels.split(","))
    encoder = VisualEncoder(feat_dim=cfg.feat_dim, grid=cfg.grid, channels=channels)
    return VLModel(lm, tokenizer, cfg.feat_dim, visual_encoder=encoder, seed=cfg.seed, name="vlt5-tiny")


def grounding_targets(captions: list[str]) -> torch.Tensor:
    """Per-cell class targets ``[n, 9, 3]`` (colour, shape, size; 0 = no object) parsed from captions."""
    cell = {name: r * 3 + c for (r, c), name in POSITIONS.items()}
    colors, shapes, sizes = list(COLORS), list(SHAPES), list(SIZES)
    out = torch.zeros(len(captions), 9, 3, dtype=torch.long)
    for i, caption in enumerate(captions):
        for size, color, shape, position in parse_caption(caption):
            out[i, cell[position]] = torch.tensor([colors.index(color) + 1, shapes.index(shape) + 1, sizes.index(size) + 1])
    return out


class GroundingHeads(torch.nn.Module):
    """Linear read-outs of colour / shape / size from each visual token (discarded after pre-training)."""

    def __init__(self, feat_dim: int):
        super().__init__()
        self.heads = torch.nn.ModuleList(torch.nn.Linear(feat_dim, len(v) + 1) for v in (COLORS, SHAPES, SIZES))

    def loss(self, feats: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        return sum(
            torch.nn.functional.cross_entropy(head(feats).flatten(0, 1), targets[..., k].flatten())
            for k, head in enumerate(self.heads)
        ) / len(self.heads)


# The values each attribute slot of a caption can take. The pattern tries longer values first,
# so that "top left" is one position, not "top" followed by "left".
_SLOT_VALUES = {"size": SIZES, "color": tuple(COLORS), "shape": SHAPES, "position": tuple(POSITIONS.values())}
_SLOT = re.compile("|".join(rf"(?P<{k}>\b(?:{'|'.join(sorted(v, key=len, reverse=True))})\b)"
                            for k, v in _SLOT_VALUES.items()))


def _slots(caption: str) -> list[tuple[int, int, str]]:
    """``(start, end, kind)`` of every attribute word of a caption (kind: size/color/shape/position)."""
    return [(m.start(), m.end(), m.lastgroup) for m in _SLOT.finditer(caption)]


def fill_example(caption: str, rng: np.random.RandomState, prob: float) -> tuple[str, str]:
    """Masked-attribute prediction: mask some attribute slots with ``_``; the target lists them."""
    slots = _slots(caption)
    chosen = [i for i in range(len(slots)) if rng.uniform() < prob] or [rng.randint(len(slots))]
    text, answers, last = [], [], 0
    for i in chosen:
        start, end, _ = slots[i]
        text += [caption[last:start], "_"]
        answers.append(caption[start:end])
        last = end
    text.append(caption[last:])
    return "fill: " + "".join(text), ", ".join(answers)


def match_example(caption: str, rng: np.random.RandomState) -> tuple[str, str]:
    """Image-text matching with hard negatives: half the captions get one attribute swapped."""
    if rng.randint(2):
        return "match: " + caption, "true"
    slots = _slots(caption)
    start, end, kind = slots[rng.randint(len(slots))]
    others = [v for v in _SLOT_VALUES[kind] if v != caption[start:end]]
    return "match: " + caption[:start] + others[rng.randint(len(others))] + caption[end:], "false"


def ground_example(caption: str, rng: np.random.RandomState) -> tuple[str, str]:
    """VL-T5's grounded captioning or visual grounding, on the objects a caption names (half each).

    * ``describe: top left`` -> ``small red circle`` (``nothing`` for an empty cell);
    * ``locate: red circle`` / ``locate: large square`` / ``locate: blue`` -> every matching
      position in the caption's order joined by ``and``, or ``nowhere`` (referring expressions
      are drawn from a named object or at random, so absent ones occur).
    """
    objects = parse_caption(caption)
    if rng.randint(2):
        cells = [pos for *_, pos in objects] if rng.randint(2) else list(POSITIONS.values())
        where = cells[rng.randint(len(cells))]
        found = [f"{size} {color} {shape}" for size, color, shape, pos in objects if pos == where]
        return f"describe: {where}", found[0] if found else "nothing"
    # an expression: a non-empty subset of (size, colour, shape), values from an object or random
    subsets = ((1,), (2,), (1, 2), (0, 2), (0, 1, 2), (0, 1))
    keep = subsets[rng.randint(len(subsets))]
    if rng.uniform() < 0.6:
        values = objects[rng.randint(len(objects))][:3]
    else:
        values = (SIZES[rng.randint(2)], list(COLORS)[rng.randint(len(COLORS))], SHAPES[rng.randint(len(SHAPES))])
    words = [values[k] for k in keep]
    phrase = " ".join(words) if 2 in keep else " ".join(words) + " shape"
    hits = [obj[3] for obj in objects if all(obj[k] == values[k] for k in keep)]
    return f"locate: {phrase}", " and ".join(hits) if hits else "nowhere"


def task_pairs(captions: list[str], cfg: PretrainConfig, step: int,
               rng: np.random.RandomState) -> list[tuple[str, str]]:
    """``(prompt, target)`` for one batch: each caption goes to a task drawn by the config's shares.

    During the text warm-up (``step < cfg.text_warmup_steps``) the draw covers the text-side tasks
    only, in proportion to their shares; afterwards the remaining share is captioning.
    """
    scale = cfg.text_share if step < cfg.text_warmup_steps else 1.0
    pairs = []
    for caption in captions:
        u = rng.uniform() * scale
        if u < cfg.fill_share:
            pairs.append(fill_example(caption, rng, cfg.fill_prob))
        elif u < cfg.fill_share + cfg.match_share:
            pairs.append(match_example(caption, rng))
        elif u < cfg.text_share:
            pairs.append(ground_example(caption, rng))
        else:
            pairs.append(("caption:", caption))
    return pairs


def tokenizer_corpus(captions: list[str]) -> list[str]:
    """Captions plus the question phrasings: the tokenizer's vocabulary only, never a label.

    Like T5's tokenizer covers all of English, the subword vocabulary knows the words questions
    use; the model itself never sees a question or an answer during pre-training.
    """
    questions = [e.prompt for e in load_task("shapes-vqa", "train", n_scenes=2000)]
    return captions + questions + ["caption:", "vqa:", "fill: _", "match: true false", "describe: nothing", "locate: and nowhere"]


@torch.no_grad()
def evaluate_captions(model: VLModel, n_scenes: int, batch_size: int = 100, num_beams: int = 1) -> dict:
    """Caption ``n_scenes`` ShapesWorld test scenes; correctness rates plus CIDEr-D / BLEU-4."""
    from ..eval import caption_scores

    model.eval()
    examples = load_task("shapes-caption", "test", n_scenes=n_scenes)
    world = ShapesWorld(0)
    preds = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        feats = model.encode_images(load_images(chunk))
        preds += model.generate_text(feats, [e.prompt for e in chunk], num_beams=num_beams, max_new_tokens=80)
    checks = [caption_correctness(p, world.scene("caption-test", i)) for i, p in enumerate(preds)]
    scores = caption_scores({e.id: p for e, p in zip(examples, preds)}, {e.id: list(e.answers) for e in examples})
    return {
        "n_scenes": len(examples),
        "color_shape_correct": float(np.mean([c["color_shape"] for c in checks])),
        "attributes_correct": float(np.mean([c["attributes"] for c in checks])),
        "fully_correct": float(np.mean([c["full"] for c in checks])),
        "CIDEr": scores["CIDEr"],
        "BLEU-4": scores["BLEU-4"],
        "samples": [{"caption": p, "reference": e.answers[0]} for p, e in zip(preds[:5], examples[:5])],
        # the first scenes alone, for a quick re-check of the card (tests/models/test_checkpoint.py)
        "first_50": {
            "color_shape_correct": float(np.mean([c["color_shape"] for c in checks[:50]])),
            "fully_correct": float(np.mean([c["full"] for c in checks[:50]])),
        },
    }


def pretrain(cfg: PretrainConfig, out: Path | None = None, quiet: bool = False,
             device: str = "cpu") -> tuple[VLModel, dict]:
    """Train vlt5-tiny and (if ``out``) save it with its model card. Returns (model, report).

    ``device="cuda"`` trains on a GPU (fp32): fast for trying recipes, but the committed
    checkpoint is built on CPU, where the run is bit-reproducible.
    """
    from tqdm.auto import tqdm

    t_start = time.perf_counter()
    seed_everything(cfg.seed, threads=cfg.threads)
    examples = load_task("shapes-caption", "pretrain", n_scenes=cfg.n_scenes)
    captions = [e.answers[0] for e in examples]
    images = torch.from_numpy(load_images(examples))  # uint8 [n, 64, 64, 3]
    model = build_model(cfg, tokenizer_corpus(captions)).to(device)
    prompt_ids, prompt_mask = model.encode_prompts(["caption:"])
    labels_all = model.encode_targets(captions)  # [n, L], -100 padded
    grounding = None
    if cfg.grounding_weight > 0:
        if cfg.grid != 3:
            raise ValueError(f"the grounding objective needs grid = 3 (one token per cell), got grid = {cfg.grid}")
        grounding = GroundingHeads(cfg.feat_dim).to(device)
        targets_all = grounding_targets(captions).to(device)

    # The trainer's optimiser, with pre-training's settings: the CNN (and the grounding heads that
    # train it) at visual_lr_mult, vectors not decayed, cosine decay to 5 %.
    named = list(model.named_parameters())
    if grounding is not None:
        named += [(f"grounding.{n}", p) for n, p in grounding.named_parameters()]

    def lr_scale(name: str) -> float:
        return cfg.visual_lr_mult if name.startswith(("visual_encoder.", "grounding.")) else 1.0

    opt, sched = build_optimizer(named, cfg.lr, cfg.steps, warmup_steps=cfg.warmup, weight_decay=cfg.weight_decay,
                                 decay="cosine", floor=0.05, no_decay=no_decay_vectors, lr_scale=lr_scale)
    gen = torch.Generator().manual_seed(cfg.seed)
    task_rng = np.random.RandomState(cfg.seed)
    model.train()
    losses = []
    bar = tqdm(range(cfg.steps), disable=quiet, desc="pretrain vlt5-tiny", unit="step")
    trainable = [p for g in opt.param_groups for p in g["params"]]
    for step in bar:
        idx = torch.randint(len(examples), (cfg.batch_size,), generator=gen)
        feats = model.encode_images(images[idx])
        idx = idx.to(device)
        if cfg.text_share > 0:
            pairs = task_pairs([captions[i] for i in idx.tolist()], cfg, step, task_rng)
            ids, mask = model.encode_prompts([p for p, _ in pairs])
            labels = model.encode_targets([t for _, t in pairs])
        else:
            labels = labels_all[idx]
            labels = labels[:, : int((labels != -100).sum(1).max())].contiguous()
            ids, mask = prompt_ids.expand(len(idx), -1), prompt_mask.expand(len(idx), -1)
        loss = model(feats, ids, mask, labels=labels).loss
        if grounding is not None:
            loss = loss + cfg.grounding_weight * grounding.loss(feats, targets_all[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        if step % 50 == 0:
            bar.set_postfix(loss=f"{np.mean(losses[-50:]):.3f}")
            if quiet and step % 250 == 0:
                print(f"step {step}: loss {np.mean(losses[-50:]):.3f} ({time.perf_counter() - t_start:.0f} s)", flush=True)
    train_s = time.perf_counter() - t_start
    scores = evaluate_captions(model, cfg.eval_scenes)
    report = {
        "config": asdict(cfg),
        "train_seconds": round(train_s, 1),
        "final_loss": float(np.mean(losses[-100:])),
        "parameters": {
            "total": sum(p.numel() for p in model.parameters()),
            "lm": sum(p.numel() for p in model.lm.parameters()),
            "visual_encoder": sum(p.numel() for p in model.visual_encoder.parameters()),
            "projector": sum(p.numel() for p in model.projector.parameters()),
        },
        "test_scores": scores,
        "torch": torch.__version__,
    }
    if out is not None:
        out = Path(out)
        model.save_pretrained(out)
        (out / "pretrain_report.json").write_text(json.dumps(report, indent=2))
        (out / "README.md").write_text(model_card(report))
    return model, report


def _task_mix(cfg: PretrainConfig) -> str:
    """The card's sentence on which tasks, all derived from the captions, shared each batch."""
    if not cfg.text_share:
        return "Every batch is captioning (prompt `caption:`)."
    parts = [f"{100 * share:.0f} % {text}" for share, text in (
        (1 - cfg.text_share, "captioning (`caption:`)"),
        (cfg.fill_share, "attribute filling (`fill: a large _ circle at the _.` -> `blue, center`)"),
        (cfg.match_share, "caption-image matching (`match: <caption, maybe with one attribute swapped>` -> `true` / `false`)"),
        (cfg.ground_share, "grounded captioning and grounding on the caption's object phrases "
                 "(`describe: top left` -> `small red circle`; `locate: red circle` -> `top left`)"),
    ) if share]
    return ("Each batch mixes tasks made from the captions alone (like VL-T5's pre-training tasks): "
            + "; ".join(parts) + ".")


def model_card(report: dict) -> str:
    cfg, p, s = report["config"], report["parameters"], report["test_scores"]
    samples = "\n".join(f"| {x['caption']} | {x['reference']} |" for x in s["samples"])
    return f"""# vlt5-tiny — the workbench's embedded backbone

A VL-T5-style model small enough for a laptop CPU: a CNN visual encoder ({cfg['grid']}x{cfg['grid']} grid of
{cfg['feat_dim']}-d features with a position code) -> visual projector (Linear + LayerNorm) -> a T5
encoder-decoder ({cfg['n_enc_layers']} + {cfg['n_dec_layers']} layers, d_model {cfg['d_model']}, d_ff {cfg['d_ff']},
{cfg['n_heads']} heads, ReLU FFN) with a byte-level BPE tokenizer ({cfg['vocab_size']} tokens; encodes any text).

Pre-trained **on ShapesWorld captions only** (`shapes-caption/pretrain`, {cfg['n_scenes']:,} scenes), no question
answering — like VL-T5 "novqa", so VQA is a task *inconsistent* with pre-training.
{_task_mix(PretrainConfig(**cfg))}
The tokenizer's vocabulary was fitted on captions and question phrasings (vocabulary only, no labels).
The CNN is also trained with a grounding objective derived from the same captions (weight
{cfg['grounding_weight']}): each of the 3x3 cells' visual tokens predicts the colour, shape and size that the
caption names at that position (like VL-T5's visual-grounding pre-training task); its heads are discarded.

Rebuild it with `make pretrain` (`python -m workbench.train.pretrain`): deterministic for a given machine,
seed {cfg['seed']}, {cfg['threads']} threads.

| | |
| --- | --- |
| parameters (total) | {p['total']:,} |
| language model | {p['lm']:,} |
| visual encoder | {p['visual_encoder']:,} |
| projector | {p['projector']:,} |
| training | {cfg['steps']} steps x batch {cfg['batch_size']}, AdamW lr {cfg['lr']}, cosine decay |
| training time | {report['train_seconds']:.0f} s on the machine that built it (torch {report['torch']}) |
| final training loss | {report['final_loss']:.3f} |

## Caption scores on ShapesWorld test ({s['n_scenes']} scenes, greedy decoding)

| measure | value |
| --- | --- |
| every object's colour and shape named (nothing invented) | {100 * s['color_shape_correct']:.1f} % |
| ... and sizes | {100 * s['attributes_correct']:.1f} % |
| ... and positions (fully correct) | {100 * s['fully_correct']:.1f} % |
| CIDEr-D | {s['CIDEr']:.3f} |
| BLEU-4 | {s['BLEU-4']:.3f} |

Samples (generated | reference):

| generated | reference |
| --- | --- |
{samples}

`tests/models/test_checkpoint.py` re-scores a sample and checks it against this card
(`pretrain_report.json` holds the same numbers).
"""


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=repo_root() / "data" / "checkpoints" / "vlt5-tiny")
    parser.add_argument("--quiet", action="store_true")
    parser.add_argument("--device", default="cpu", help="cpu (reproducible; the committed checkpoint) or cuda")
    for name, default in asdict(PretrainConfig()).items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=type(default), default=default)
    args = parser.parse_args(argv)
    cfg = PretrainConfig(**{k: getattr(args, k) for k in asdict(PretrainConfig())})
    _, report = pretrain(cfg, out=args.out, quiet=args.quiet, device=args.device)
    s = report["test_scores"]
    print(f"saved {args.out} in {report['train_seconds']:.0f} s; colour+shape correct {100 * s['color_shape_correct']:.1f} %, "
          f"fully correct {100 * s['fully_correct']:.1f} %, CIDEr {s['CIDEr']:.3f}")


if __name__ == "__main__":
    main()
