"""The embedded visual encoder (a small CNN) and a disk cache for the features it produces.

Real backbones get their visual features from elsewhere (CLIP grids, Faster R-CNN regions in a
feature store). The embedded ``vlt5-tiny`` backbone sees 64x64 ShapesWorld / easy-VQA renders, so it
carries its own encoder: three stride-2 convolutions (64 -> 32 -> 16 -> 8 pixels), a 1x1 projection
and an average pool to a ``grid x grid`` map, one feature vector per cell.

Downstream questions ask "left of", "at the top": position must survive. Each cell's vector is the
concatenation ``[content ; code(row, col)]`` where ``code`` is a fixed 2-D sin/cos code of the cell
centre, so the grid position is recoverable from the last ``pos_dim`` channels alone, whatever the
later layers do with the visual tokens' order.

GroupNorm (not BatchNorm) keeps an image's features independent of the batch it is encoded in,
which is what makes caching features per image sound.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

from workbench.utils import atomic_path, onednn_convolutions, repo_root

CACHE_FORMAT_VERSION = 1


def grid_position_code(grid: int, dim: int) -> torch.Tensor:
    """A fixed ``[grid*grid, dim]`` sin/cos code of each cell centre (row-major order).

    ``dim`` must be a multiple of 4: ``dim/4`` frequencies (pi, 2 pi, 4 pi, ...) x {sin, cos} x
    {row, col}. Distinct cells get distinct codes; the lowest frequency alone orders them.
    """
    if dim % 4 or dim <= 0:
        raise ValueError(f"pos_dim must be a positive multiple of 4, got {dim}")
    n_freq = dim // 4
    centres = (torch.arange(grid, dtype=torch.float64) + 0.5) / grid  # in (0, 1)
    rows, cols = torch.meshgrid(centres, centres, indexing="ij")
    rows, cols = rows.reshape(-1, 1), cols.reshape(-1, 1)
    freqs = math.pi * (2.0 ** torch.arange(n_freq, dtype=torch.float64)).reshape(1, -1)
    code = torch.cat(
        [torch.sin(rows * freqs), torch.cos(rows * freqs), torch.sin(cols * freqs), torch.cos(cols * freqs)], dim=1
    )
    return code.float()


class VisualEncoder(nn.Module):
    """uint8 RGB images ``[b, H, W, 3]`` -> grid features ``[b, grid*grid, feat_dim]``.

    Args:
        feat_dim: the size of each output vector (content ``feat_dim - pos_dim`` + position ``pos_dim``).
        grid: cells per side (4 -> 16 visual tokens, 8 -> 64).
        channels: widths of the three stride-2 conv stages.
        pos_dim: size of the position code (a multiple of 4); 0 disables it.
        groups: GroupNorm groups per stage.

    Accepts numpy arrays or tensors, one image ``[H, W, 3]`` or a batch; normalises inside
    (``(x / 255 - 0.5) / 0.25``). Any size works (the last pool adapts); 64x64 is the design size.
    """

    def __init__(self, feat_dim: int = 64, grid: int = 4, channels: Sequence[int] = (32, 64, 96), pos_dim: int = 16,
                 groups: int = 8):
        super().__init__()
        if pos_dim and (pos_dim % 4 or pos_dim >= feat_dim):
            raise ValueError(f"pos_dim must be a multiple of 4 smaller than feat_dim ({feat_dim}), got {pos_dim}")
        if grid < 1:
            raise ValueError(f"grid must be >= 1, got {grid}")
        if any(c % groups for c in channels):
            raise ValueError(f"every channel count {tuple(channels)} must be divisible by groups={groups}")
        self.feat_dim, self.grid, self.pos_dim = int(feat_dim), int(grid), int(pos_dim)
        self.channels, self.groups = tuple(int(c) for c in channels), int(groups)
        layers, c_in = [], 3
        for c in self.channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1), nn.GroupNorm(groups, c), nn.GELU()]
            c_in = c
        self.convs = nn.Sequential(*layers)
        self.proj = nn.Conv2d(c_in, feat_dim - pos_dim, 1)
        self.pool = nn.AdaptiveAvgPool2d(grid)
        # Not persistent: it is a function of (grid, pos_dim), which the config records.
        self.register_buffer("pos_code", grid_position_code(grid, pos_dim) if pos_dim else torch.zeros(grid * grid, 0),
                             persistent=False)

    @property
    def n_visual(self) -> int:
        """Number of visual tokens per image."""
        return self.grid * self.grid

    def config_dict(self) -> dict:
        """The constructor arguments (stored in the backbone config and in the cache key)."""
        return dict(feat_dim=self.feat_dim, grid=self.grid, channels=list(self.channels), pos_dim=self.pos_dim,
                    groups=self.groups)

    @classmethod
    def from_config_dict(cls, d: dict) -> "VisualEncoder":
        """Rebuild from :meth:`config_dict` (weights freshly initialised; load them separately)."""
        return cls(**d)

    def prepare(self, images) -> torch.Tensor:
        """Validate and normalise images into a float ``[b, 3, H, W]`` tensor on this module's device."""
        if isinstance(images, (list, tuple)):
            images = np.stack([np.asarray(im) for im in images])
        if isinstance(images, np.ndarray):
            images = torch.from_numpy(np.ascontiguousarray(images))
        if not isinstance(images, torch.Tensor):
            raise TypeError(f"images must be a numpy array or tensor, got {type(images).__name__}")
        if images.dim() == 3:
            images = images.unsqueeze(0)
        if images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(
                f"images must be uint8 RGB [batch, H, W, 3] (or one [H, W, 3]), got shape {tuple(images.shape)}"
            )
        if images.dtype != torch.uint8:
            raise ValueError(f"images must be uint8 (0..255), got {images.dtype}")
        w = self.proj.weight
        x = images.to(w.device).permute(0, 3, 1, 2).to(w.dtype)
        return (x / 255.0 - 0.5) / 0.25

    def forward(self, images) -> torch.Tensor:
        """Images -> ``[b, grid*grid, feat_dim]`` features (content first, position code last)."""
        x = self.prepare(images)
        with _convolution_backend():
            x = self.pool(self.proj(self.convs(x)))  # [b, C, grid, grid]
        x = x.flatten(2).transpose(1, 2)  # [b, grid*grid, C], row-major cells like pos_code
        pos = self.pos_code.to(x.dtype).unsqueeze(0).expand(x.shape[0], -1, -1)
        return torch.cat([x, pos], dim=-1)


@contextlib.contextmanager
def _convolution_backend():
    """oneDNN and NNPACK off for the block in the portable numerics mode (utils.onednn_convolutions):
    the convolutions then run as im2col + an MKL product on MKL's vendor-neutral branch (without
    oneDNN, torch would pick NNPACK for batches of 16 or more, whose kernels MKL_CBWR does not
    govern). The backend is chosen again for a backward pass, outside this block: the choice covers
    encoding images, not training the encoder (``make pretrain``)."""
    if onednn_convolutions():
        yield
        return
    mkldnn, nnpack = torch.backends.mkldnn.enabled, torch._C._get_nnpack_enabled()
    torch.backends.mkldnn.enabled = False
    torch.backends.nnpack.set_flags(False)
    try:
        yield
    finally:
        torch.backends.mkldnn.enabled = mkldnn
        torch.backends.nnpack.set_flags(nnpack)


# ---------------------------------------------------------------------------------------------
# Feature extraction with a disk cache
# ---------------------------------------------------------------------------------------------


def default_cache_dir() -> Path:
    """``<repo>/.cache/features`` (gitignored)."""
    return repo_root() / ".cache" / "features"


def encoder_fingerprint(encoder: nn.Module) -> str:
    """A hash of the encoder's class, config and every weight: any change gives a new value."""
    h = hashlib.sha256()
    h.update(type(encoder).__qualname__.encode())
    cfg = encoder.config_dict() if hasattr(encoder, "config_dict") else {}
    h.update(json.dumps(cfg, sort_keys=True).encode())
    for name, t in sorted(encoder.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def _numerics_key() -> dict:
    from ..utils import PINNED_CPU_ENV

    key = {"capability": torch.backends.cpu.get_cpu_capability(), **{k: os.environ.get(k) for k in PINNED_CPU_ENV}}
    return key if onednn_convolutions() else {**key, "onednn_convolutions": False}


def _images_and_ids(items, image_loader):
    """-> (uint8 array [n, H, W, 3], image ids or None). Examples are deduplicated by image id."""
    if isinstance(items, torch.Tensor):
        items = items.cpu().numpy()
    if isinstance(items, np.ndarray):
        return items, None
    items = list(items)
    if not items:
        raise ValueError("no images to encode")
    if hasattr(items[0], "image_id"):  # workbench.data.Example (or anything shaped like it)
        if image_loader is None:
            try:
                from workbench.data import load_image as image_loader
            except ImportError as e:
                raise ImportError("encoding Examples needs workbench.data.load_image (or pass image_loader=)") from e
        ids, images, seen = [], [], set()
        for ex in items:
            if ex.image_id in seen:
                continue
            seen.add(ex.image_id)
            ref = getattr(ex, "image_ref", None) or ex.image_id
            ids.append(ex.image_id)
            images.append(np.asarray(image_loader(ref)))
        return np.stack(images), ids
    return np.stack([np.asarray(im) for im in items]), None


def extract_features(encoder: nn.Module, images_or_examples, cache_dir=None, key: str | None = None,
                     batch_size: int = 256, quiet: bool = False, device=None, use_cache: bool = True,
                     image_loader=None):
    """Encode images once (in batches) and cache the features on disk.

    Args:
        encoder: a :class:`VisualEncoder` (anything mapping uint8 images to ``[b, n, d]`` works).
        images_or_examples: uint8 images ``[n, H, W, 3]`` (array, tensor or list of arrays), or a
            sequence of :class:`workbench.data.Example` whose images are loaded with
            ``image_loader`` (default ``workbench.data.load_image(example.image_ref)``).
        cache_dir: where the cache files go (default ``<repo>/.cache/features``).
        key: a readable prefix of the cache file name (e.g. ``"shapesworld-train"``); the file is
            ``<key>-<hash>.npy`` where the hash covers the pixels, the image ids, the encoder's
            class, config and weights, so a changed encoder or data set never reuses stale features.
        batch_size: images per forward pass.
        quiet: no progress bar.
        device: where to encode (default: the encoder's device).
        use_cache: False encodes without reading or writing the cache. A cache file that cannot be
            read (empty, truncated, another shape) is rebuilt; it is written atomically (a temporary
            file beside it, flushed, then renamed), so a killed run never leaves a partial one.

    Returns:
        for images: a float32 array ``[n, n_visual, feat_dim]`` aligned with the input;
        for examples: a dict ``image_id -> [n_visual, feat_dim]`` over the distinct images (the
        feature-store shape the training code looks features up in).
    """
    from tqdm.auto import tqdm

    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    images, ids = _images_and_ids(images_or_examples, image_loader)
    images = np.ascontiguousarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be uint8 [n, H, W, 3], got {images.dtype} {images.shape}")
    if key is not None and (not key or "/" in key or "\\" in key):
        raise ValueError(f"key must be a non-empty name without path separators, got {key!r}")

    file = None
    if use_cache:
        h = hashlib.sha256()
        h.update(f"v{CACHE_FORMAT_VERSION}:{images.shape}:{images.dtype}".encode())
        h.update(images.tobytes())
        h.update(json.dumps(ids).encode())
        h.update(encoder_fingerprint(encoder).encode())
        # The CNN's floats depend on the CPU code path (utils.pin_cpu_numerics): features computed
        # under other kernels are other features.
        h.update(json.dumps(_numerics_key(), sort_keys=True).encode())
        folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        file = folder / f"{key or 'features'}-{h.hexdigest()[:24]}.npy"
        feats = _read_cache(file, len(images))
        if feats is not None:
            return _package(feats, ids)

    was_training = encoder.training
    encoder.eval()
    if device is not None:
        encoder.to(device)
    chunks = []
    try:
        with torch.no_grad():
            for start in tqdm(range(0, len(images), batch_size), disable=quiet, desc="visual features",
                              unit="batch"):
                out = encoder(images[start:start + batch_size])
                chunks.append(out.float().cpu().numpy())
    finally:
        encoder.train(was_training)
    feats = np.concatenate(chunks, axis=0)
    if file is not None:
        try:
            # readers see the old file or the whole new one, never a part; a file object, since
            # np.save would append ".npy" to a bare path
            with atomic_path(file) as tmp, open(tmp, "wb") as f:
                np.save(f, feats, allow_pickle=False)
        except OSError as e:  # a full disk or a read-only cache costs the cache, not the run
            warnings.warn(f"could not write the feature cache {file}: {e}", RuntimeWarning, stacklevel=2)
    return _package(feats, ids)


def _read_cache(file: Path, n: int) -> np.ndarray | None:
    """The cached features in ``file`` if it holds a whole float32 ``[n, n_visual, feat_dim]`` array;
    None when it is absent or unreadable (empty, truncated, not an .npy file): then it is rebuilt."""
    if not file.is_file():
        return None
    try:
        feats = np.load(file, allow_pickle=False)
    except (OSError, ValueError, EOFError):  # EOFError: an empty file
        return None
    if not isinstance(feats, np.ndarray) or feats.ndim != 3 or feats.shape[0] != n or feats.dtype != np.float32:
        return None
    return feats


def _package(feats: np.ndarray, ids):
    if ids is None:
        return feats
    return {image_id: feats[i] for i, image_id in enumerate(ids)}
