"""Checkpoint I/O of a :class:`~workbench.models.VLModel`: one directory, written atomically.

Layout: ``workbench_config.json`` (the :class:`~workbench.models.VLConfig`, the LM config, the format
version), ``model.safetensors`` (LM + projector + visual encoder; tied tensors stored once),
``generation_config.json`` and the tokenizer files. A damaged file raises :class:`CheckpointError`
naming it.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections import OrderedDict
from dataclasses import asdict
from pathlib import Path

from typing import TYPE_CHECKING

from .families import get_family

if TYPE_CHECKING:
    from .vl_model import VLModel

CONFIG_NAME = "workbench_config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_NAME = "workbench-vlmodel"
FORMAT_VERSION = 1


class CheckpointError(ValueError):
    """A checkpoint file exists but cannot be read (corrupted, truncated, wrong contents)."""


class CheckpointMixin:
    """Saving and loading for :class:`~workbench.models.VLModel` (``save_pretrained`` / ``from_pretrained``)."""

    def backbone_state_dict(self) -> dict:
        """The state dict of the backbone alone: LM + projector + visual encoder.

        Modifications and input modifiers are left out (methods save their own weights). A model
        whose LM was rewritten by peft (``base_layer`` / ``lora_`` keys) must be merged first.
        """
        sd = OrderedDict()
        for k, v in self.state_dict().items():
            if ".peft_mods." in k or k.startswith(("input_modifiers.", "peft_shared.")):
                continue
            if ".base_layer." in k or "lora_" in k:
                raise ValueError(
                    f"the LM contains injected peft layers ({k}); merge and unload them before saving the "
                    "backbone (a method saves its own weights)"
                )
            sd[k] = v
        return sd

    def save_pretrained(self, path, overwrite: bool = True) -> Path:
        """Save config, weights and tokenizer to directory ``path``, atomically.

        Layout: ``workbench_config.json`` (the :class:`VLConfig`, the LM config, the format
        version), ``model.safetensors`` (LM + projector + visual encoder; tied tensors stored once),
        ``generation_config.json`` and the tokenizer files. Load it back with
        ``workbench.models.load_backbone(path)``. An existing directory is replaced only if it is
        empty or holds a workbench checkpoint.
        """
        from safetensors.torch import save_file

        path = Path(path)
        if path.exists():
            if not path.is_dir():
                raise FileExistsError(f"{path} exists and is not a directory")
            if any(path.iterdir()) and not (path / CONFIG_NAME).exists():
                raise FileExistsError(f"{path} is a non-empty directory that is not a workbench checkpoint; "
                                      "refusing to overwrite it")
            if not overwrite:
                raise FileExistsError(f"{path} exists (pass overwrite=True to replace it)")
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
        try:
            tensors, aliases = _dedup_tensors(self.backbone_state_dict())
            meta = {"format": "pt", "aliases": json.dumps(aliases)}
            save_file(tensors, str(tmp / WEIGHTS_NAME), metadata=meta)
            cfg = {
                "format": FORMAT_NAME,
                "format_version": FORMAT_VERSION,
                "config": asdict(self.config),
                "lm_config": self.lm.config.to_dict(),
            }
            (tmp / CONFIG_NAME).write_text(json.dumps(cfg, indent=2, sort_keys=True, default=str))
            self.lm.generation_config.save_pretrained(str(tmp))
            self.tokenizer.save_pretrained(str(tmp))
            # Swap: the old directory is moved aside first, so `path` always holds a whole checkpoint.
            if path.exists():
                old = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".old", dir=path.parent))
                os.rmdir(old)
                os.replace(path, old)
                os.replace(tmp, path)
                shutil.rmtree(old, ignore_errors=True)
            else:
                os.replace(tmp, path)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
        return path

    @classmethod
    def from_pretrained(cls, path, feat_dim: int | None = None, device=None, layout: str | None = None) -> "VLModel":
        """Load a directory written by :meth:`save_pretrained` (see ``load_backbone``).

        ``layout``, when given, must be the one the checkpoint records: its weights were trained with it.
        """
        path = Path(path)
        cfg_file = path / CONFIG_NAME
        if not cfg_file.is_file():
            raise FileNotFoundError(f"{cfg_file} not found: {path} is not a workbench checkpoint "
                                    "(save one with VLModel.save_pretrained)")
        try:
            raw = json.loads(cfg_file.read_text())
            config = cls.config_class.from_dict(raw["config"])
            lm_config_dict = raw["lm_config"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{cfg_file} is not a valid workbench config: {e}") from e
        if raw.get("format_version", 0) > FORMAT_VERSION:
            raise CheckpointError(f"{cfg_file} has format version {raw['format_version']}; this workbench "
                                  f"reads up to {FORMAT_VERSION}")
        if layout is not None and layout != config.layout:
            raise ValueError(f"layout={layout!r} disagrees with the checkpoint at {path}, which was trained with "
                             f"layout={config.layout!r} (drop the layout option, or re-save the model with another)")
        if feat_dim is not None and feat_dim != config.feat_dim:
            raise ValueError(f"feat_dim={feat_dim} disagrees with the checkpoint at {path}, whose projector "
                             f"expects feat_dim={config.feat_dim}")
        weights = path / WEIGHTS_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found: a workbench checkpoint needs {WEIGHTS_NAME} beside "
                                    f"{CONFIG_NAME}")
        fam = get_family(config.family)
        lm_config = fam.config_class().from_dict(lm_config_dict)
        lm = fam.lm_class()(lm_config)
        gen_file = path / "generation_config.json"
        if gen_file.is_file():
            from transformers import GenerationConfig

            lm.generation_config = GenerationConfig.from_pretrained(str(path), local_files_only=True)
        tokenizer = _load_tokenizer(path)
        visual_encoder = None
        if config.visual_encoder is not None:
            from .visual import VisualEncoder

            visual_encoder = VisualEncoder.from_config_dict(config.visual_encoder)
        model = cls(lm, tokenizer, config.feat_dim, visual_encoder=visual_encoder, seed=None, name=config.name,
                    layout=config.layout)
        model.config.max_new_tokens = config.max_new_tokens
        model.load_weights(weights)
        model.projector_fresh = False
        model.eval()
        if device is not None:
            model.to(device)
        return model

    def load_weights(self, file) -> None:
        """Load ``model.safetensors`` written by :meth:`save_pretrained`; errors name the file."""
        from safetensors import safe_open

        file = Path(file)
        try:
            with safe_open(str(file), framework="pt") as f:
                meta = f.metadata() or {}
                tensors = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types for a bad header / short file
            raise CheckpointError(f"cannot read {file}: the file is corrupted or truncated ({e}); "
                                  "re-save or re-create the checkpoint") from e
        try:
            aliases = json.loads(meta.get("aliases", "{}"))
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{file} has unreadable metadata: {e}") from e
        for alias, source in aliases.items():
            if source in tensors:
                tensors[alias] = tensors[source]
        expected = self.backbone_state_dict()
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise CheckpointError(f"{file} does not match the model built from its config: missing "
                                  f"{missing[:5]}{'...' if len(missing) > 5 else ''}, unexpected "
                                  f"{unexpected[:5]}{'...' if len(unexpected) > 5 else ''}")
        for k, v in tensors.items():
            if tuple(v.shape) != tuple(expected[k].shape):
                raise CheckpointError(f"{file}: tensor {k} has shape {tuple(v.shape)}, the model expects "
                                      f"{tuple(expected[k].shape)}")
        self.load_state_dict(tensors, strict=False)

    def num_parameters(self, trainable_only: bool = False) -> int:
        """Number of parameters (each shared tensor counted once)."""
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) in seen or (trainable_only and not p.requires_grad):
                continue
            seen.add(id(p))
            n += p.numel()
        return n



def _dedup_tensors(sd: dict) -> tuple[dict, dict]:
    """Keep one copy of tensors that share storage (tied embeddings); return (tensors, aliases)."""
    tensors, aliases, seen = {}, {}, {}
    for k, v in sd.items():
        key = (v.device, v.untyped_storage().data_ptr(), v.storage_offset(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if v.numel() and key in seen:
            aliases[k] = seen[key]
            continue
        seen[key] = k
        tensors[k] = v.detach().contiguous().cpu()
    return tensors, aliases


def _load_tokenizer(path: Path):
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except Exception as e:
        raise FileNotFoundError(
            f"could not load a tokenizer from {path} ({type(e).__name__}: {e}); put the tokenizer files there "
            "(tokenizer.json + tokenizer_config.json, or spiece.model for T5 / vocab.json + merges.txt for BART)"
        ) from e

