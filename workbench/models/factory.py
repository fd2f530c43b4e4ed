"""One factory for every backbone: ``load_backbone(name_or_path, **options) -> VLModel``.

Like timm's ``create_model``: names are registered with ``@register_backbone(name)``; anything else
is read as a local directory. Nothing is ever downloaded (``local_files_only=True`` everywhere).

A directory may hold

- a workbench checkpoint written by ``VLModel.save_pretrained`` (``workbench_config.json``,
  ``model.safetensors``, tokenizer files): loaded as saved;
- any Hugging Face T5 or BART checkpoint (``config.json``, ``model.safetensors`` or
  ``pytorch_model.bin``, tokenizer files): wrapped with a fresh visual projector, which needs
  ``feat_dim=`` (and takes ``seed=`` for its initialisation).

Options: ``feat_dim`` (int), ``seed`` (int, default 0; fresh projector / visual encoder only),
``device`` (``"cpu"``, ``"cuda"``, ``"auto"`` = :func:`workbench.utils.pick_device`; default: CPU),
``visual_encoder`` (HF checkpoints only: ``True`` for a default :class:`VisualEncoder`, a dict of its
arguments, or an instance), ``name`` (a label stored in the config), ``layout`` (``"text_first"`` or
``"visual_first"``: an HF checkpoint is wrapped ``text_first`` by default, the official VL-T5 / VL-BART
input; a workbench checkpoint keeps the layout it records and refuses another).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import torch

from workbench.registry import Registry
from workbench.utils import pick_device, repo_root

from .families import family_for_model_type
from .checkpoint import CONFIG_NAME
from .context import check_layout
from .vl_model import VLModel

BACKBONES: Registry[Callable[..., VLModel]] = Registry("backbone")
_OPTIONS = {"feat_dim", "seed", "device", "visual_encoder", "name", "layout"}

HF_WEIGHT_FILES = (
    "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json"
)
TOKENIZER_FILES = ("tokenizer.json", "spiece.model", "vocab.json")


def register_backbone(name: str):
    """Decorator: register ``fn(**options) -> VLModel`` under ``name`` for :func:`load_backbone`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"a backbone name must be a non-empty string, got {name!r}")

    def deco(fn):
        return BACKBONES.register(name, fn)

    return deco


def list_backbones() -> list[str]:
    """The registered backbone names, sorted."""
    return BACKBONES.names()


def load_backbone(name_or_path, **options) -> VLModel:
    """Build a :class:`VLModel` from a registered name or a local directory (see module docstring)."""
    unknown = set(options) - _OPTIONS
    if unknown:
        raise TypeError(f"unknown option(s) {sorted(unknown)}; load_backbone accepts {sorted(_OPTIONS)}")
    if isinstance(name_or_path, str) and name_or_path in BACKBONES:
        return BACKBONES.get(name_or_path)(**options)
    if not isinstance(name_or_path, (str, Path)):
        raise TypeError(f"name_or_path must be a str or Path, got {type(name_or_path).__name__}")
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return load_directory(path, **options)
    text = str(name_or_path)
    looks_like_path = (
        isinstance(name_or_path, Path) or "/" in text or "\\" in text or text.startswith((".", "~")) or path.exists()
    )
    if looks_like_path:
        raise FileNotFoundError(
            f"{path} is not a directory. Put a backbone there: either a Hugging Face T5/BART checkpoint "
            f"(config.json, model.safetensors or pytorch_model.bin, tokenizer.json or spiece.model / "
            f"vocab.json + merges.txt) or a directory written by VLModel.save_pretrained. Nothing is downloaded."
        )
    raise ValueError(
        f"unknown backbone {text!r}; known names: {list_backbones()}, or pass a local directory holding a "
        "T5/BART checkpoint (nothing is downloaded: e.g. 'data/models/t5-base/')"
    )


def load_directory(path, feat_dim: int | None = None, seed: int = 0, device=None, visual_encoder=None,
                   name: str | None = None, layout: str | None = None) -> VLModel:
    """Load a workbench checkpoint or wrap an HF T5/BART checkpoint found in ``path``."""
    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path} is not a directory")
    device = _device(device)
    if (path / CONFIG_NAME).is_file():
        if visual_encoder is not None:
            raise ValueError("visual_encoder= only applies when wrapping a plain HF checkpoint; "
                             f"{path} is a workbench checkpoint with its own")
        model = VLModel.from_pretrained(path, feat_dim=feat_dim, device=device, layout=layout)
        if name is not None:
            model.config.name = name
        return model
    if (path / "config.json").is_file():
        return _wrap_hf_directory(path, feat_dim, seed, device, visual_encoder, name, layout or "text_first")
    raise FileNotFoundError(
        f"{path} holds neither {CONFIG_NAME} (a workbench checkpoint) nor config.json (a Hugging Face "
        f"checkpoint). Put the model's config.json, weights ({' or '.join(HF_WEIGHT_FILES[::2])}) and "
        "tokenizer files in that directory."
    )


def _device(device):
    if device is None:
        return None
    return pick_device() if device == "auto" else torch.device(device)


def _wrap_hf_directory(path: Path, feat_dim, seed, device, visual_encoder, name, layout) -> VLModel:
    check_layout(layout)
    try:
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
    except json.JSONDecodeError as e:
        raise ValueError(f"{path / 'config.json'} is not valid JSON: {e}") from e
    fam = family_for_model_type(model_type)  # names the supported model types otherwise
    if not any((path / f).is_file() for f in HF_WEIGHT_FILES):
        raise FileNotFoundError(f"no weights in {path}: put one of {list(HF_WEIGHT_FILES)} there (beside config.json)")
    if not any((path / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(
            f"no tokenizer in {path}: put tokenizer.json + tokenizer_config.json there (or spiece.model for T5, "
            "vocab.json + merges.txt for BART)"
        )
    if feat_dim is None:
        raise ValueError(f"feat_dim= is required to wrap the HF checkpoint {path} (the last dimension of your "
                         "visual features; the projector maps it to d_model)")
    from transformers import AutoTokenizer

    from .visual import VisualEncoder

    lm = fam.lm_class().from_pretrained(str(path), local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    if len(tokenizer) > lm.config.vocab_size:
        raise ValueError(f"the tokenizer in {path} has {len(tokenizer)} tokens but the model's vocab_size is "
                         f"{lm.config.vocab_size}")
    if visual_encoder is True:
        visual_encoder = {"feat_dim": feat_dim}
    if isinstance(visual_encoder, dict):
        with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's RNG
            torch.manual_seed(seed)
            visual_encoder = VisualEncoder(**visual_encoder)
    model = VLModel(lm, tokenizer, feat_dim, visual_encoder=visual_encoder, seed=seed, name=name, layout=layout)
    if device is not None:
        model.to(device)
    return model


# Registered names built from another name's committed checkpoint (default: a directory of their own).
_CHECKPOINT_OF = {"vlt5-tiny-scratch": "vlt5-tiny"}


def _checkpoint_dir(name: str) -> Path:
    """Where the committed weights of a registered backbone live (read by its loader and its fingerprint)."""
    return repo_root() / "data" / "checkpoints" / _CHECKPOINT_OF.get(name, name)


@register_backbone("vlt5-tiny")
def vlt5_tiny(**options) -> VLModel:
    """The embedded backbone: a small T5 with its own CNN, pre-trained on ShapesWorld captions."""
    path = _checkpoint_dir("vlt5-tiny")
    if not (path / CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"the embedded checkpoint {path} does not exist yet: run `make pretrain` to build it "
            "(it pre-trains vlt5-tiny on ShapesWorld captions and saves it there)"
        )
    return load_directory(path, **options)


@register_backbone("vlt5-tiny-scratch")
def vlt5_tiny_scratch(seed: int = 0, **options) -> VLModel:
    """vlt5-tiny with its language model re-initialised: the "no language pre-training" baseline.

    The CNN and the projector keep their pre-trained weights (so the cached visual features are the
    same); the T5 gets Hugging Face's fresh initialisation, seeded by ``seed``. Comparing a run on it
    with the same run on ``vlt5-tiny`` shows what caption pre-training buys downstream.
    """
    model = vlt5_tiny(**options)
    with torch.random.fork_rng(devices=[]):  # seeded, without moving the caller's RNG
        torch.manual_seed(seed)
        model.lm.apply(model.lm._init_weights)
    model.config.name = "vlt5-tiny-scratch"
    return model


_FINGERPRINTS: dict = {}


def backbone_fingerprint(name_or_path) -> str:
    """A short digest of a backbone's weights and config (for naming runs).

    Two runs with the same config but different checkpoint contents (e.g. after ``make pretrain``)
    must not share a run directory. The digest covers the config and weight files of the resolved
    directory and is cached per (file, size, mtime). Returns ``"missing"`` if nothing is there.
    """
    import hashlib

    if isinstance(name_or_path, str) and name_or_path in BACKBONES:
        path = _checkpoint_dir(name_or_path)
    else:
        path = Path(name_or_path).expanduser()
    files = [path / f for f in (CONFIG_NAME, "config.json", *HF_WEIGHT_FILES) if (path / f).is_file()]
    if not files:
        return "missing"
    key = tuple((str(f), f.stat().st_size, f.stat().st_mtime_ns) for f in files)
    if key not in _FINGERPRINTS:
        h = hashlib.sha256()
        for f in files:
            h.update(f.name.encode())
            h.update(f.read_bytes())
        _FINGERPRINTS[key] = h.hexdigest()[:16]
    return _FINGERPRINTS[key]
