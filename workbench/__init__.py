"""PEFT-VL Workbench: parameter-efficient tuning of vision-language models, with probes.

The package is layered in one direction::

    data -> models -> methods -> train -> probes -> viz -> notebooks

``probes`` is pure maths over tensors and may be used by ``methods``; it never imports
``train`` or ``methods``.
"""

__version__ = "0.1.0"
