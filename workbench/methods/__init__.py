"""PEFT methods: one module per method, a dataclass config and a registry entry each."""

from . import full, lora  # noqa: F401  (registration)
from .base import (
    MethodConfig,
    MethodHandle,
    apply,
    count_parameters,
    freeze_backbone,
    get_config,
    list_methods,
    register_method,
)

__all__ = [
    "MethodConfig",
    "MethodHandle",
    "apply",
    "count_parameters",
    "freeze_backbone",
    "get_config",
    "list_methods",
    "register_method",
]
