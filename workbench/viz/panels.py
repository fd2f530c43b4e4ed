"""ipywidgets panels. The logic is plain Python that tests drive by setting ``.value``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

from ..methods import list_methods, method_spec


def main_knob(method: str) -> tuple[str, tuple] | None:
    """``(config field, choices)`` of a method's main knob (recorded with its registration), or None."""
    return method_spec(method).main_knob if method in list_methods() else None


@dataclass
class GalleryPanel:
    """Pick a method, the number of shots and the method's main knob; run one configuration.

    ``base`` is the RunConfig the choices modify; ``settings`` maps a method to the RunConfig
    fields it gets on top of ``base`` (e.g. ``{"lora": {"lr": 5e-3}, "mixphm": {"method_config":
    {"reduction_factor": 16}}}``), so that the panel rebuilds exactly the gallery's configurations;
    ``runner`` trains it (default :func:`workbench.train.run`, which reuses finished runs from the
    store). ``widget()`` builds the ipywidgets view; the state lives in ``method``, ``n_shots`` and
    ``knob_value`` (``None`` = the method's default) so that tests and scripts can drive the panel
    without a browser.

    A knob value equal to the method's default is dropped from the config, so choosing it gives
    the same run (and run-store hash) as not choosing it.
    """

    base: object
    methods: tuple
    shots: tuple = (16, 32, 64, 100, 500, 1000)
    runner: Callable | None = None
    settings: dict = field(default_factory=dict)
    method: str = "lora"
    n_shots: int = 64
    knob_value: object = None
    last: object = field(default=None, repr=False)

    def config(self):
        """The RunConfig for the current choices."""
        if self.method not in self.methods:
            raise ValueError(f"unknown method {self.method!r}; the panel offers {list(self.methods)}")
        if self.n_shots not in self.shots:
            raise ValueError(f"n_shots must be one of {self.shots}, got {self.n_shots}")
        from ..methods import get_config

        extra = dict(self.settings.get(self.method, {}))
        overrides = dict(extra.pop("method_config", {}))
        knob = main_knob(self.method)
        if knob is not None and self.knob_value is not None:
            name, choices = knob
            if self.knob_value not in choices:
                raise ValueError(f"{self.method}: {name} must be one of {choices}, got {self.knob_value!r}")
            overrides[name] = self.knob_value
        defaults = get_config(self.method)
        overrides = {k: v for k, v in overrides.items() if getattr(defaults, k, object()) != v}
        return self.base.replace(method=self.method, n_shots=self.n_shots, method_config=overrides, **extra)

    def run(self):
        """Train (or reuse) the current configuration and keep its result in ``last``."""
        if self.runner is None:
            from ..train import run as runner
        else:
            runner = self.runner
        self.last = runner(self.config())
        return self.last

    def widget(self):
        """An ipywidgets VBox: method / shots / knob dropdowns, a run button and an output area."""
        import ipywidgets as w

        method = w.Dropdown(options=list(self.methods), value=self.method, description="method")
        shots = w.Dropdown(options=list(self.shots), value=self.n_shots, description="N")
        knob = w.Dropdown(description="knob")
        button = w.Button(description="run", button_style="primary")
        out = w.Output()

        def refresh_knob(*_):
            spec = main_knob(method.value)
            knob.options = ["default"] + (list(spec[1]) if spec else [])
            knob.description = spec[0] if spec else "knob"
            knob.value = self.knob_value if spec and self.knob_value in spec[1] else "default"

        def on_run(_):
            self.method, self.n_shots = method.value, shots.value
            self.knob_value = None if knob.value == "default" else knob.value
            with out:
                out.clear_output()
                try:
                    result = self.run()
                except ValueError as e:  # an impossible config: say why instead of a traceback
                    print(f"not run: {e}")
                    return
                print(result.summary())

        method.observe(refresh_knob, names="value")
        button.on_click(on_run)
        refresh_knob()
        return w.VBox([w.HBox([method, shots, knob, button]), out])
