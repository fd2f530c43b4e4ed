"""PEFT methods: one module per method, a dataclass config and a registry entry (with metadata) each.

Every module in this package registers its method(s) when imported; this file imports them all,
so adding a method is adding a module (like HF peft's tuners folder). The references each method
follows are in ``docs/methods.md``.
"""

import importlib
import pkgutil

from .base import (
    METHODS,
    MethodConfig,
    MethodHandle,
    MethodSpec,
    applied_method,
    apply,
    count_parameters,
    freeze_backbone,
    get_config,
    handle_of,
    is_method_parameter,
    list_methods,
    load_method,
    merge,
    method_spec,
    register_method,
    save_method,
)

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "METHODS",
    "MethodConfig",
    "MethodHandle",
    "MethodSpec",
    "applied_method",
    "apply",
    "count_parameters",
    "freeze_backbone",
    "get_config",
    "handle_of",
    "is_method_parameter",
    "list_methods",
    "load_method",
    "merge",
    "method_spec",
    "register_method",
    "save_method",
]
