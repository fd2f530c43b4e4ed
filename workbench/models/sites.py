"""Modification sites: where PEFT modules attach to a :class:`~workbench.models.VLModel`.

A site holds the modifications registered at one insertion point, as submodules at
``<layer>.peft_mods.<point key>`` (so ``state_dict``, ``.to()`` and ``.parameters()`` see them). Two
hooks per point apply them: a forward pre-hook stores the sub-layer input X, a forward hook replaces
the output H by ``mod(x, h)`` in turn. Hooks are installed once per point, never by rewriting a
Hugging Face ``forward``. :class:`SitesMixin` gives the model its public API for them
(``insertion_points``, ``add_sublayer_modification``, ``add_projection_modification``,
``add_input_modifier``, ``modifications``, ``remove_modifications``, ``refresh_hooks``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from .families import InsertionPoint, unknown_point_error


class ModificationSite(nn.ModuleDict):
    """The modifications registered at one insertion point, applied in insertion order.

    It lives at ``<layer>.peft_mods.<point key>`` so its modules are submodules of the model.
    Two hooks feed it: a forward pre-hook on the module whose first input is X stores X, and a
    forward hook on the module whose output is H replaces H by ``mods(x, h)`` in turn.
    """

    def __init__(self, point: InsertionPoint):
        super().__init__()
        self.point_name = point.name
        self.kind = point.kind
        # Plain attributes (not submodules): the modules the hooks sit on, and the handles.
        self._hooked: tuple = ()
        self._handles: list = []
        self._x = None

    def apply(self, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """Run every modification in order: ``h <- mod(x, h)``."""
        for mod in self.values():
            h = mod(x, h)
        return h

    def extra_repr(self) -> str:
        return f"point={self.point_name!r}"


def first_input(args, kwargs):
    """The first input of a module call: HF passes ``hidden_states`` first (positionally); fall back
    to the keyword names."""
    if args:
        return args[0]
    for key in ("hidden_states", "input", "x"):
        if key in kwargs:
            return kwargs[key]
    return next(iter(kwargs.values()), None)


class _CaptureX:
    """Forward pre-hook: remember the sub-layer input X for the site (a callable object rather than
    a closure so that ``copy.deepcopy(model)`` rebinds it to the copied site)."""

    def __init__(self, site: ModificationSite):
        self.site = site

    def __call__(self, module, args, kwargs):
        self.site._x = first_input(args, kwargs)
        return None


class _ModifyH:
    """Forward hook: replace the output H (or ``output[0]`` for attention tuples) by the site's mods."""

    def __init__(self, site: ModificationSite):
        self.site = site

    def __call__(self, module, args, kwargs, output):
        site = self.site
        x, site._x = site._x, None  # drop the reference: X must not outlive the forward
        if len(site) == 0:
            return None
        if x is None:  # the pre-hook did not run: the module was called from an unexpected place
            x = first_input(args, kwargs)
        if isinstance(output, tuple):
            return (site.apply(x, output[0]),) + tuple(output[1:])
        return site.apply(x, output)



class SitesMixin:
    """The insertion points and modification sites of a :class:`~workbench.models.VLModel`.

    Expects ``self._points`` (name -> :class:`InsertionPoint`), ``self.input_modifiers`` and
    ``self.device`` from the model.
    """

    def insertion_points(self, kind: str | None = None, stack: str | None = None) -> "OrderedDict[str, InsertionPoint]":
        """Every named insertion point in forward order, optionally filtered by ``kind`` / ``stack``.

        ``kind``: ``"sublayer"`` or ``"projection"``; ``stack``: ``"encoder"`` or ``"decoder"``.
        """
        if kind not in (None, "sublayer", "projection"):
            raise ValueError(f"kind must be None, 'sublayer' or 'projection', got {kind!r}")
        if stack not in (None, "encoder", "decoder"):
            raise ValueError(f"stack must be None, 'encoder' or 'decoder', got {stack!r}")
        return OrderedDict(
            (n, p) for n, p in self._points.items()
            if (kind is None or p.kind == kind) and (stack is None or p.stack == stack)
        )

    def get_point(self, name: str) -> InsertionPoint:
        """The :class:`InsertionPoint` called ``name``; a ValueError suggests close valid names."""
        if name not in self._points:
            raise unknown_point_error(name, self._points)
        return self._points[name]

    def get_point_module(self, name: str) -> nn.Module:
        """The module at a point: the projection ``nn.Linear`` (or its peft wrapper), or the module
        whose output is H (the attention module for attention sub-layers)."""
        return self.get_submodule(self.get_point(name).module_path)

    # --- modifications --------------------------------------------------------------------------

    def add_sublayer_modification(self, point_name: str, module: nn.Module, name: str | None = None) -> str:
        """Register ``module`` (``forward(x, h) -> h'``) at a sub-layer point; returns its module path.

        ``x`` is the residual stream entering the sub-layer (T5: before its LayerNorm; BART: the
        sub-layer's input), ``h`` its output before dropout and residual. Several modifications at
        one point compose in the order they were added. The module becomes a submodule at
        ``<point.mods_path>.<name>`` (``name`` defaults to its index at the point).
        """
        return self._add_modification(point_name, module, name, "sublayer")

    def add_projection_modification(self, point_name: str, module: nn.Module, name: str | None = None) -> str:
        """Register ``module`` (``forward(x, y) -> y'``) on a projection point (q k v o wi wo).

        ``x`` is the projection's input, ``y`` its output; e.g. VL-PET's decoder value adapter is
        ``y + up(gelu(down(x)))`` at ``decoder.{i}.cross_attn.v``, IA3 is ``y * l``.
        """
        return self._add_modification(point_name, module, name, "projection")

    def _add_modification(self, point_name, module, name, kind) -> str:
        point = self.get_point(point_name)
        if point.kind != kind:
            other = "add_projection_modification" if point.kind == "projection" else "add_sublayer_modification"
            raise ValueError(f"{point_name!r} is a {point.kind} point; use {other}")
        if not isinstance(module, nn.Module):
            raise TypeError(f"a modification must be an nn.Module, got {type(module).__name__}")
        site = self._site(point, create=True)
        name = str(len(site)) if name is None else str(name)
        if "." in name or not name:
            raise ValueError(f"modification name must be non-empty and contain no '.', got {name!r}")
        if name in site:
            raise ValueError(f"a modification named {name!r} already exists at {point_name!r}")
        site[name] = module.to(self.device)
        return f"{point.mods_path}.{name}"

    def _site(self, point: InsertionPoint, create: bool = False) -> ModificationSite | None:
        layer = self.get_submodule(point.layer_path)
        mods = getattr(layer, "peft_mods", None)
        if mods is not None and point.key in mods:
            return mods[point.key]
        if not create:
            return None
        if mods is None:
            layer.peft_mods = nn.ModuleDict()  # registered, so it is part of the state_dict
        site = ModificationSite(point)
        layer.peft_mods[point.key] = site
        self._hook_site(site, point)
        return site

    def _hook_site(self, site: ModificationSite, point: InsertionPoint) -> None:
        x_mod = self.get_submodule(point.x_path)
        h_mod = self.get_submodule(point.module_path)
        site._handles = [
            x_mod.register_forward_pre_hook(_CaptureX(site), with_kwargs=True),
            h_mod.register_forward_hook(_ModifyH(site), with_kwargs=True),
        ]
        site._hooked = (x_mod, h_mod)

    def refresh_hooks(self) -> None:
        """Move hooks whose module was replaced since they were installed.

        peft's ``inject_adapter_in_model`` replaces e.g. BART's ``fc2`` by a wrapper; a hook left on
        the wrapped base layer would see the output without the LoRA update. Checking identity is a
        few attribute lookups per site, so every forward / encode / generate does it.
        """
        for point, site in self._iter_sites():
            x_mod = self.get_submodule(point.x_path)
            h_mod = self.get_submodule(point.module_path)
            if site._hooked and (site._hooked[0] is not x_mod or site._hooked[1] is not h_mod):
                for handle in site._handles:
                    handle.remove()
                self._hook_site(site, point)

    def _iter_sites(self):
        for point in self._points.values():
            site = self._site(point)
            if site is not None:
                yield point, site

    def modifications(self) -> "OrderedDict[str, list[tuple[str, nn.Module]]]":
        """Point name -> ``[(name, module), ...]`` of every registered modification, in order."""
        return OrderedDict((p.name, list(site.items())) for p, site in self._iter_sites() if len(site))

    def remove_modifications(self, point_name: str | None = None, kind: str | None = None) -> list[nn.Module]:
        """Remove the modifications (and their hooks) at one point, of one kind, or all; return them."""
        if point_name is not None:
            self.get_point(point_name)  # validates the name
        removed = []
        for point, site in list(self._iter_sites()):
            if (point_name is not None and point.name != point_name) or (kind is not None and point.kind != kind):
                continue
            for handle in site._handles:
                handle.remove()
            site._handles, site._hooked = [], ()
            removed.extend(site.values())
            layer = self.get_submodule(point.layer_path)
            del layer.peft_mods[point.key]
            if len(layer.peft_mods) == 0:
                del layer.peft_mods
        return removed

    def remove_sublayer_modifications(self, point_name: str | None = None) -> list[nn.Module]:
        """Remove sub-layer modifications (all, or those at ``point_name``); return the modules."""
        return self.remove_modifications(point_name, kind="sublayer")

    def remove_projection_modifications(self, point_name: str | None = None) -> list[nn.Module]:
        """Remove projection modifications (all, or those at ``point_name``); return the modules."""
        return self.remove_modifications(point_name, kind="projection")

    def add_input_modifier(self, module: nn.Module) -> int:
        """Append ``module`` (``forward(inputs: EncoderInputs) -> EncoderInputs``) to the input path.

        Prompt tuning: ``return inputs.insert(inputs.n_visual, self.prompt)``. Modifiers run in
        order, after the visual/text concatenation, in forward, encode and generate alike. Returns
        the index in ``model.input_modifiers``.
        """
        if not isinstance(module, nn.Module):
            raise TypeError(f"an input modifier must be an nn.Module, got {type(module).__name__}")
        self.input_modifiers.append(module.to(self.device))
        return len(self.input_modifiers) - 1

    def remove_input_modifiers(self) -> list[nn.Module]:
        """Remove every input modifier; return them."""
        removed = list(self.input_modifiers)
        self.input_modifiers = nn.ModuleList()
        return removed

    # --- saving ---------------------------------------------------------------------------------
