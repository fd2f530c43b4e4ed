"""PEFT methods: one module per method, a dataclass config and a registry entry each.

Every module in this package registers its method(s) when imported; this file imports them all,
so adding a method is adding a module (like HF peft's tuners folder).
"""

import importlib
import pkgutil

from .base import (
    MethodConfig,
    MethodHandle,
    apply,
    count_parameters,
    freeze_backbone,
    get_config,
    handle_of,
    list_methods,
    load_method,
    merge,
    register_method,
    save_method,
)

for _info in pkgutil.iter_modules(__path__):
    if not _info.name.startswith("_") and _info.name != "base":
        importlib.import_module(f"{__name__}.{_info.name}")

__all__ = [
    "MethodConfig",
    "MethodHandle",
    "apply",
    "count_parameters",
    "freeze_backbone",
    "get_config",
    "handle_of",
    "list_methods",
    "load_method",
    "merge",
    "register_method",
    "save_method",
]
