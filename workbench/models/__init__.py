"""The VL backbone: visual features -> projector -> HF seq2seq LM (T5, BART), and its insertion points.

Public API::

    from workbench.models import load_backbone
    model = load_backbone("vlt5-tiny")                       # the embedded checkpoint
    model = load_backbone("data/models/t5-base", feat_dim=512)  # any local T5/BART checkpoint
    ids, mask = model.encode_prompts(["vqa: what colour is the circle?"])
    out = model(visual_feats, ids, mask, labels=model.encode_targets(["red"]))   # out.loss
    model.generate_text(visual_feats, ids, mask, num_beams=3)                    # ["red"]

How PEFT methods attach (see :mod:`workbench.models.vl_model`):

- sub-layer modification (adapters, MixPHM, VL-PET encoder modules)::

      model.add_sublayer_modification("encoder.0.ffn", module)   # module(x, h) -> h'

- projection (LoRA via peft, IA3, PETAL, VL-PET's decoder value adapter)::

      point = model.get_point("decoder.0.cross_attn.v")  # .module_path, .lm_path, .in_dim, .out_dim
      model.add_projection_modification(point.name, module)   # module(x, y) -> y'

- input embeddings (prompt tuning)::

      model.add_input_modifier(module)   # module(inputs: EncoderInputs) -> EncoderInputs

The per-forward context (masks, labels, stack outputs) that methods read: ``model.context``
(:class:`ForwardContext`). Activation capture at every named point: :func:`capture`.
"""

from .capture import Activations, available_points, capture, point_info
from .checkpoint import CheckpointError
from .context import LAYOUTS, EncoderInputs, ForwardContext
from .factory import list_backbones, load_backbone, load_directory, register_backbone
from .families import FAMILIES, Family, InsertionPoint, build_lm_config, get_family
from .sites import ModificationSite
from .tokenizer import train_tokenizer
from .visual import VisualEncoder, extract_features
from .vl_model import VLConfig, VLModel

__all__ = [
    "FAMILIES",
    "LAYOUTS",
    "Activations",
    "ForwardContext",
    "available_points",
    "capture",
    "point_info",
    "CheckpointError",
    "EncoderInputs",
    "Family",
    "InsertionPoint",
    "ModificationSite",
    "VLConfig",
    "VLModel",
    "VisualEncoder",
    "build_lm_config",
    "extract_features",
    "get_family",
    "list_backbones",
    "load_backbone",
    "load_directory",
    "register_backbone",
    "train_tokenizer",
]
