"""PEFT-VL Workbench: parameter-efficient tuning of vision-language models, with probes.

The package is layered in one direction::

    data -> models -> methods -> train -> studies -> viz -> notebooks

A module imports its own layer and the layers before it. ``probes`` (RSA, CKA, MI, routing) and
``eval`` (VQA accuracy, caption scores) are pure maths, and ``utils`` / ``registry`` are shared
infrastructure: every layer may import them and they import nothing else of the workbench.
``tests/test_layers.py`` states this contract for every module.
"""

__version__ = "0.1.0"

# Before torch runs anything: one CPU code path on every x86 machine (utils.pin_cpu_numerics).
from .utils import pin_cpu_numerics as _pin_cpu_numerics

_pin_cpu_numerics()
