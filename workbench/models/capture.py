"""Activation capture: read named points of a :class:`~workbench.models.VLModel` with forward hooks.

Like TransformerLens's ``run_with_cache``: the model owns its points and its per-forward context
(:mod:`workbench.models.context`); this module only reads them. Two ways to use it::

    from workbench.models import capture

    with capture(model, ["encoder.1.ffn", "encoder.1.ffn:input", "projector"]) as acts:
        model(visual_feats, input_ids, attention_mask, labels=labels)
    acts["encoder.1.ffn"]          # [n_samples, d_model], mean over the valid tokens

    acts = capture(model, ["decoder.*.ffn", "decoder.final"], data=batches, max_samples=256)

Names that can be read (:func:`available_points` lists them for a model, in forward order;
``points`` may also be shell-style patterns such as ``"encoder.*.ffn"`` or ``"*@*:delta"``):

- ``projector``: the visual projector's output (the visual tokens, before any input modifier).
- ``<point>`` for every insertion point (``encoder.2.ffn``, ``decoder.0.cross_attn.v``, ...):
  the sub-layer output H (before dropout and residual) or the projection's output, *as the
  backbone computes it, before the sub-layer / projection modifications registered at that
  point* (the frozen H a method module receives; projection methods inside a sub-layer,
  e.g. LoRA or PETAL on ``q``, do change the H of that sub-layer).
- ``<point>:input``: the sub-layer input X (the residual stream entering it; T5: before its
  LayerNorm) or the projection's input.
- ``<point>:modified``: what the point hands on after its modifications (H'; equal to
  ``<point>`` when nothing is registered there).
- ``<point>@<name>`` for every method module registered with ``add_sublayer_modification`` /
  ``add_projection_modification`` (``model.modifications()``; ``<name>`` is its name at the
  point, ``"0"`` by default): the module's own output ``module(x, h)``; ``...:x`` and ``...:h``
  its two inputs; ``...:delta`` = output - h, the module's contribution (MixPHM's u = Delta(f)).
- ``encoder.final`` / ``decoder.final``: the last hidden state of the encoder / decoder stack.

Token pooling (``pool``) is explicit, applied per forward call with the attention mask of that call:

- ``"mean"`` (default): mean over the *valid* tokens, as the model's context
  (:meth:`~workbench.models.context.ForwardContext.token_mask`) gives them: encoder-side tensors
  use the mask the encoder receives (visual mask + prompt mask, after input modifiers such as
  prompt tuning); the projector uses the visual mask (all ones when not given); decoder-side
  tensors use the decoder attention mask when one is passed, else ``labels != -100`` (position t
  of the teacher-forced decoder predicts ``labels[t]``), else every position. The ``k`` / ``v``
  projections of cross-attention run over encoder tokens and use the encoder mask.
- ``"first"``: the first valid token of each row (position 0 with right padding; for the
  encoder that is the first token of the model's layout: visual for ``visual_first``, text for
  ``text_first``).
- ``"flatten"``: ``[batch, seq * features]`` with invalid positions set to 0; batches of
  different lengths are right-padded with zeros to the longest.
- ``"tokens"``: every valid token as its own row ``[n_valid_tokens, features]``.

``max_samples`` counts examples (batch rows) per name, for every pooling. Under ``generate``
the decoder runs once per new token: decoder-side names then get one row per example and step.

Nothing about the model changes: the hooks only read (detached copies), return ``None``, and are
all removed when the block ends, also on an exception. Activations are collected on the CPU in float32 by default (``keep_on_device=True`` keeps
them where they were computed; ``device=`` names another place; ``dtype=`` another precision).
"""

from __future__ import annotations

import difflib
import fnmatch
import warnings
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from .sites import first_input

POOLS = ("mean", "first", "flatten", "tokens")
_BATCH_KEYS = ("visual_feats", "input_ids", "attention_mask", "labels", "visual_mask", "decoder_input_ids",
               "decoder_attention_mask")
_POSITIONAL = ("visual_feats", "input_ids", "attention_mask", "labels")


@dataclass(frozen=True)
class _Spec:
    """How one capturable name is read: which module, which hook, which tensor, which mask."""

    name: str
    module: nn.Module
    hook: str  # "pre" (read an input), "post" (read the output), "post_first" (output, before other hooks)
    what: str  # "output" | "arg0" | "arg1" | "delta" | "stack"
    context: str  # "visual" | "encoder" | "decoder": which mask pools it
    stack: str | None = None  # "encoder" | "decoder" (None for the projector)
    point: str | None = None  # the insertion point it belongs to


def _check_model(model) -> None:
    for attr in ("insertion_points", "modifications", "projector", "lm", "context", "refresh_hooks"):
        if not hasattr(model, attr):
            raise TypeError(
                f"capture needs a workbench VLModel (insertion_points, modifications, projector, lm, context); "
                f"got {type(model).__name__} without {attr!r}"
            )


def _context(point) -> str:
    """The token axis of a point: the cross-attention k/v projections run over encoder tokens."""
    if point.stack == "decoder" and point.sublayer == "cross_attn" and point.projection in ("k", "v"):
        return "encoder"
    return point.stack


def _catalogue(model) -> "OrderedDict[str, _Spec]":
    """Every capturable name of ``model``, in forward order."""
    specs: OrderedDict[str, _Spec] = OrderedDict()
    specs["projector"] = _Spec("projector", model.projector, "post", "output", "visual")
    mods = model.modifications()
    enc, dec = model.lm.get_encoder(), model.lm.get_decoder()
    for stack, stack_module in (("encoder", enc), ("decoder", dec)):
        for point in model.insertion_points(stack=stack).values():
            ctx = _context(point)
            h_mod = model.get_submodule(point.module_path)
            x_mod = model.get_submodule(point.x_path)
            n = point.name
            specs[n] = _Spec(n, h_mod, "post_first", "output", ctx, stack, n)
            specs[f"{n}:input"] = _Spec(f"{n}:input", x_mod, "pre", "arg0", ctx, stack, n)
            specs[f"{n}:modified"] = _Spec(f"{n}:modified", h_mod, "post", "output", ctx, stack, n)
            for mod_name, module in mods.get(n, []):
                base = f"{n}@{mod_name}"
                specs[base] = _Spec(base, module, "post", "output", ctx, stack, n)
                specs[f"{base}:x"] = _Spec(f"{base}:x", module, "pre", "arg0", ctx, stack, n)
                specs[f"{base}:h"] = _Spec(f"{base}:h", module, "pre", "arg1", ctx, stack, n)
                specs[f"{base}:delta"] = _Spec(f"{base}:delta", module, "post", "delta", ctx, stack, n)
        specs[f"{stack}.final"] = _Spec(f"{stack}.final", stack_module, "post", "stack", stack, stack)
    return specs


def available_points(model) -> list[str]:
    """Every name :func:`capture` can read on ``model``, in forward order (see the module doc)."""
    _check_model(model)
    return list(_catalogue(model))


def point_info(model, name: str) -> dict:
    """What a capture name refers to: ``{"stack", "point", "context"}`` (``context`` names the mask)."""
    _check_model(model)
    cat = _catalogue(model)
    if name not in cat:
        raise _unknown(name, cat)
    s = cat[name]
    return {"stack": s.stack, "point": s.point, "context": s.context}


def _unknown(name, cat) -> ValueError:
    close = difflib.get_close_matches(str(name), list(cat), n=5, cutoff=0.5)
    hint = f" did you mean {close}?" if close else ""
    return ValueError(
        f"unknown capture point {name!r};{hint} names look like 'projector', 'encoder.0.ffn', "
        "'encoder.0.ffn:input', 'encoder.0.ffn:modified', 'decoder.1.cross_attn.v', "
        "'encoder.0.ffn@0' (a method module; ':x', ':h', ':delta'), 'encoder.final', 'decoder.final' "
        "(workbench.probes.available_points(model) lists them all)"
    )


def _resolve(points, cat) -> list[str]:
    if isinstance(points, str):
        points = [points]
    try:
        points = list(points)
    except TypeError:
        raise ValueError(f"points must be a name or a list of names, got {type(points).__name__}") from None
    if not points:
        raise ValueError("points must name at least one capture point")
    out: list[str] = []
    for p in points:
        if not isinstance(p, str):
            raise ValueError(f"points must be strings, got {p!r}")
        if p in cat:
            names = [p]
        elif any(c in p for c in "*?["):
            names = [n for n in cat if fnmatch.fnmatchcase(n, p)]
            if not names:
                raise ValueError(f"the pattern {p!r} matches no capture point of this model "
                                 "(workbench.models.available_points(model) lists them)")
        else:
            raise _unknown(p, cat)
        out.extend(n for n in names if n not in out)
    return out


class Activations(Mapping):
    """What :func:`capture` collects: name -> tensor ``[n_samples, features]`` (pooled as asked).

    A read-only mapping, filled while the capture runs (reading inside the ``with`` block gives
    what has been collected so far). Names that were asked for but recorded nothing (e.g. decoder
    names when only the encoder ran) are not keys; indexing them raises a KeyError that says so.
    Attributes: ``pool``, ``requested`` (the resolved names), ``info`` (name -> stack / point /
    mask context).
    """

    def __init__(self, requested: list[str], pool: str, info: dict):
        self.requested = list(requested)
        self.pool = pool
        self.info = info
        self._chunks: dict[str, list[torch.Tensor]] = {n: [] for n in requested}
        self._rows: dict[str, int] = {n: 0 for n in requested}
        self._cache: dict[str, torch.Tensor] = {}

    def _add(self, name: str, value: torch.Tensor, rows: int) -> None:
        self._chunks[name].append(value)
        self._rows[name] += rows
        self._cache.pop(name, None)

    def n_samples(self, name: str) -> int:
        """How many examples (batch rows) were recorded for ``name``."""
        if name not in self._rows:
            raise KeyError(f"{name!r} was not captured; captured names: {self.requested}")
        return self._rows[name]

    def __getitem__(self, name: str) -> torch.Tensor:
        if name not in self._chunks:
            raise KeyError(f"{name!r} was not captured; captured names: {self.requested}")
        chunks = self._chunks[name]
        if not chunks:
            raise KeyError(
                f"{name!r} recorded nothing: its module did not run (decoder names need a forward pass "
                "with labels or decoder_input_ids; encode() runs the encoder only)"
            )
        if name not in self._cache:
            if self.pool == "flatten":
                width = max(c.shape[1] for c in chunks)
                chunks = [c if c.shape[1] == width else nn.functional.pad(c, (0, width - c.shape[1])) for c in chunks]
            self._cache[name] = chunks[0] if len(chunks) == 1 else torch.cat(chunks, 0)
        return self._cache[name]

    def __iter__(self):
        return (n for n in self.requested if self._chunks[n])

    def __len__(self) -> int:
        return sum(1 for n in self.requested if self._chunks[n])

    def __repr__(self) -> str:
        shapes = ", ".join(f"{n!r}: {tuple(self[n].shape)}" for n in self)
        return f"Activations(pool={self.pool!r}, {{{shapes}}})"


class Capture:
    """The context manager behind :func:`capture` (``with Capture(...) as acts``)."""

    def __init__(self, model, points, max_samples=None, pool="mean", device=None, keep_on_device=False,
                 dtype=torch.float32):
        _check_model(model)
        if pool not in POOLS:
            raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
        if max_samples is not None and (isinstance(max_samples, bool) or not isinstance(max_samples, int)
                                        or max_samples < 1):
            raise ValueError(f"max_samples must be a positive int or None, got {max_samples!r}")
        if keep_on_device and device is not None:
            raise ValueError("give either device= (where to store) or keep_on_device=True, not both")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise ValueError(f"dtype must be a floating torch dtype or None, got {dtype!r}")
        self.model = model
        self.pool = pool
        self.max_samples = max_samples
        self.device = None if keep_on_device else torch.device(device if device is not None else "cpu")
        self.dtype = dtype
        model.refresh_hooks()  # hooks must sit on the modules that will run (peft may have replaced some)
        self._cat = _catalogue(model)
        self.names = _resolve(points, self._cat)
        self._check_shared_modules()
        info = {n: {"stack": self._cat[n].stack, "point": self._cat[n].point, "context": self._cat[n].context}
                for n in self.names}
        self.acts = Activations(self.names, pool, info)
        self._handles: list = []
        self._warned = False
        self._active = False

    def _check_shared_modules(self) -> None:
        seen: dict[int, str] = {}
        for point, mods in self.model.modifications().items():
            for mod_name, module in mods:
                key = f"{point}@{mod_name}"
                if id(module) in seen:
                    asked = [n for n in self.names if n.split(":")[0] in (key, seen[id(module)])]
                    if asked:
                        raise ValueError(
                            f"the same module object is registered at {seen[id(module)]!r} and {key!r}; its "
                            "hooks cannot tell the two calls apart, so it cannot be captured per point"
                        )
                seen[id(module)] = key

    # --- hooks -------------------------------------------------------------------------------------

    def __enter__(self) -> Activations:
        if self._active:
            raise RuntimeError("this capture is already active")
        self._active = True
        try:
            self._install()
        except BaseException:
            self._remove()
            raise
        return self.acts

    def __exit__(self, *exc) -> bool:
        self._remove()
        return False

    def _install(self) -> None:
        for name in self.names:
            spec = self._cat[name]
            if spec.hook == "pre":
                h = spec.module.register_forward_pre_hook(self._pre_hook(spec), with_kwargs=True)
            else:
                h = spec.module.register_forward_hook(self._post_hook(spec), with_kwargs=True,
                                                      prepend=spec.hook == "post_first")
            self._handles.append(h)

    def _remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        self._warned = False
        self._active = False

    def _pre_hook(self, spec: _Spec):
        def hook(module, args, kwargs):
            if spec.what == "arg0":
                t = first_input(args, kwargs)
            else:  # arg1: the h (or y) a method module receives
                t = args[1] if len(args) > 1 else kwargs.get("h", kwargs.get("y"))
            self._record(spec, t)
            return None

        return hook

    def _post_hook(self, spec: _Spec):
        def hook(module, args, kwargs, output):
            if spec.what == "stack":
                t = getattr(output, "last_hidden_state", None)
                if t is None:
                    t = output[0]
            else:
                t = output[0] if isinstance(output, tuple) else output
                if spec.what == "delta":
                    h = args[1] if len(args) > 1 else kwargs.get("h", kwargs.get("y"))
                    with torch.no_grad():
                        t = t.detach() - h.detach()
            self._record(spec, t)
            return None

        return hook

    # --- pooling -----------------------------------------------------------------------------------

    def _mask_for(self, spec: _Spec, b: int, s: int):
        context = self.model.context
        m = context.token_mask(spec.context, b, s)
        if m is None and context.has_mask(spec.context) and not self._warned:
            self._warned = True
            warnings.warn(f"capture: no attention mask of shape [{b}, {s}] for {spec.name!r} in the model's "
                          "context; pooling over every position", RuntimeWarning, stacklevel=2)
        return m

    def _record(self, spec: _Spec, t) -> None:
        if not isinstance(t, torch.Tensor):
            return
        acts = self.acts
        done = acts._rows[spec.name]
        if self.max_samples is not None and done >= self.max_samples:
            return
        with torch.no_grad():
            t = t.detach()
            if t.dim() == 2:  # already one vector per example
                t = t.unsqueeze(1)
            if t.dim() != 3:
                raise ValueError(f"capture: {spec.name!r} produced a tensor of shape {tuple(t.shape)}; "
                                 "expected [batch, seq, features]")
            b, s, _ = t.shape
            mask = self._mask_for(spec, b, s)
            if self.max_samples is not None and done + b > self.max_samples:
                keep = self.max_samples - done
                t = t[:keep]
                mask = mask[:keep] if mask is not None else None
                b = keep
            pooled = self._pool(t, mask)
            if self.dtype is not None:
                pooled = pooled.to(self.dtype)
            if self.device is not None:
                pooled = pooled.to(self.device)
            if pooled.data_ptr() == t.data_ptr():
                pooled = pooled.clone()  # never keep a view of the model's own tensor
        acts._add(spec.name, pooled, b)

    def _pool(self, t: torch.Tensor, mask) -> torch.Tensor:
        b, s, f = t.shape
        if mask is None:
            m = torch.ones(b, s, dtype=t.dtype, device=t.device)
        else:
            m = mask.to(device=t.device, dtype=t.dtype)
        if self.pool == "mean":
            w = m.unsqueeze(-1)
            return (t * w).sum(1) / w.sum(1).clamp_min(1.0)
        if self.pool == "first":
            first = (m > 0).to(torch.int64).argmax(1)  # 0 for an all-padding row
            return t[torch.arange(b, device=t.device), first]
        if self.pool == "flatten":
            return (t * m.unsqueeze(-1)).reshape(b, s * f)
        return t[m > 0]  # tokens


def _slice_batch(batch: dict, n: int) -> dict:
    return {k: (v[:n] if isinstance(v, torch.Tensor) and v.dim() > 0 else v) for k, v in batch.items()}


def _as_kwargs(batch) -> dict:
    if isinstance(batch, Mapping):
        unknown = [k for k in batch if k not in _BATCH_KEYS]
        kw = {k: v for k, v in batch.items() if k in _BATCH_KEYS}
        if "visual_feats" not in kw:
            raise ValueError(f"each batch needs 'visual_feats' (got keys {sorted(batch)}); batches are dicts of "
                             f"model kwargs {_BATCH_KEYS} (other keys, here {unknown}, are ignored)")
        return kw
    if isinstance(batch, (tuple, list)) and 1 <= len(batch) <= len(_POSITIONAL):
        return {k: v for k, v in zip(_POSITIONAL, batch) if v is not None}
    raise ValueError("data must yield dicts of model kwargs (visual_feats, input_ids, attention_mask, labels, ...) "
                     f"or tuples (visual_feats, input_ids, attention_mask, labels); got {type(batch).__name__}")


def _batch_size(kw: dict) -> int:
    feats = kw["visual_feats"]
    if not hasattr(feats, "shape") or len(feats.shape) != 3:
        raise ValueError("visual_feats must be [batch, n_visual, feat_dim]")
    return int(feats.shape[0])


def _run(cap: Capture, data, eval_mode: bool) -> Activations:
    model = cap.model
    if isinstance(data, Mapping) or (isinstance(data, (tuple, list)) and data and isinstance(data[0], torch.Tensor)):
        data = [data]  # a single batch
    needs_decoder = any(cap._cat[n].stack == "decoder" for n in cap.names)
    modes = {m: m.training for m in model.modules()} if eval_mode else None
    seen = 0
    try:
        if eval_mode:
            model.eval()
        with cap, torch.no_grad():
            for batch in data:
                kw = _as_kwargs(batch)
                if cap.max_samples is not None:
                    remaining = cap.max_samples - seen
                    if remaining <= 0:
                        break
                    kw = _slice_batch(kw, remaining)
                kw = {k: (v.to(model.device) if isinstance(v, torch.Tensor) else v) for k, v in kw.items()}
                has_targets = "labels" in kw or "decoder_input_ids" in kw
                if needs_decoder and not has_targets:
                    raise ValueError("decoder-side points need batches with 'labels' (or 'decoder_input_ids') "
                                     "so that the decoder runs teacher-forced")
                if has_targets:
                    model(**kw)
                else:
                    model.encode(**kw)
                seen += _batch_size(kw)
    finally:
        if modes is not None:
            for m, training in modes.items():
                m.training = training
    if seen == 0:
        raise ValueError("data yielded no batches")
    return cap.acts


def capture(model, points, data=None, max_samples: int | None = None, pool: str = "mean", device=None,
            keep_on_device: bool = False, dtype=torch.float32, eval_mode: bool = True):
    """Read activations at named points (see the module docstring for names, pooling and masks).

    Args:
        model: a :class:`~workbench.models.VLModel` (method modules included).
        points: a name, a shell-style pattern, or a list of them (:func:`available_points`).
        data: ``None`` -> return a context manager (``with capture(...) as acts: model(...)``);
            otherwise an iterable of batches (dicts of model kwargs ``visual_feats``,
            ``input_ids``, ``attention_mask``, ``labels``, ``visual_mask``, ... or tuples
            ``(visual_feats, input_ids, attention_mask, labels)``; a single batch works too):
            the model runs over them (teacher-forced ``forward`` when the batch has labels, else
            ``encode``) under ``torch.no_grad()`` and the filled :class:`Activations` is returned.
        max_samples: cap on the examples recorded per name (and, with ``data``, on the examples run).
        pool: ``"mean"`` (valid tokens), ``"first"``, ``"flatten"`` or ``"tokens"``.
        device: where to store the activations (default CPU); ``keep_on_device=True`` keeps them on
            the device they were computed on.
        dtype: storage dtype (float32 by default; ``None`` keeps the model's).
        eval_mode: with ``data``, run the model in eval mode (dropout off, merged experts) and restore
            each module's mode afterwards.

    Returns:
        :class:`Capture` (a context manager whose ``__enter__`` gives the :class:`Activations`) when
        ``data`` is None, else the :class:`Activations` (name -> ``[n, features]``).
    """
    cap = Capture(model, points, max_samples=max_samples, pool=pool, device=device,
                  keep_on_device=keep_on_device, dtype=dtype)
    if data is None:
        return cap
    return _run(cap, data, eval_mode)
