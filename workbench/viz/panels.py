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


# MixPHM's knobs and the values the panel offers (the first of each is the official value).
MIXPHM_KNOBS = {
    "num_experts": (4, 1, 2, 8),
    "rank": (8, 1, 4, 16),
    "reduction_factor": (12, 6, 24),
    "w_red": (0.2, 0.0, 0.05, 0.5, 1.0),
    "w_mi": (0.2, 0.0, 0.05, 0.5, 1.0),
}


@dataclass
class MixPHMPanel:
    """Train (or reuse) one MixPHM configuration and draw its per-layer redundancy beside reference runs.

    The state lives in plain fields (``num_experts``, ``rank``, ``reduction_factor``, ``w_red``,
    ``w_mi``, ``n_shots``, ``seed``) so tests and scripts drive the panel without a browser:
    set them, call :meth:`run`. ``runner(cfg)`` trains or reuses a run (e.g. ``run(cfg,
    store=load_study("mixphm"))``); ``analyser(result)`` returns its redundancy rows
    (:func:`~workbench.studies.redundancy_analysis` on the restored model; None: no curves).
    ``reference``: redundancy rows of the reference runs, drawn beside the new one. Every run of
    the session is kept in :meth:`table`. A value equal to the official one is left out of the
    config, so the official setting is the study's own run (the same hash).
    """

    base: object
    runner: Callable | None = None
    analyser: Callable | None = None
    reference: object = None
    shots: tuple = (16, 32, 64, 100, 500, 1000)
    seeds: tuple = (13, 21, 42, 87, 100)
    measure: str = "rsa"
    num_experts: int = 4
    rank: int = 8
    reduction_factor: int = 12
    w_red: float = 0.2
    w_mi: float = 0.2
    n_shots: int = 64
    seed: int = 13
    results: list = field(default_factory=list, repr=False)
    curves: dict = field(default_factory=dict, repr=False)

    def config(self):
        """The RunConfig of the current choices (a ValueError names a value the panel does not offer)."""
        overrides = {}
        for name, choices in MIXPHM_KNOBS.items():
            value = getattr(self, name)
            if value not in choices:
                raise ValueError(f"mixphm: {name} must be one of {choices}, got {value!r}")
            if value != choices[0]:
                overrides[name] = value
        if self.n_shots not in self.shots:
            raise ValueError(f"n_shots must be one of {self.shots}, got {self.n_shots!r}")
        if self.seed not in self.seeds:
            raise ValueError(f"seed must be one of {self.seeds}, got {self.seed!r}")
        return self.base.replace(method="mixphm", n_shots=self.n_shots, seed=self.seed, method_config=overrides)

    @staticmethod
    def label(result) -> str:
        mc = result.config.method_config
        opts = ", ".join(f"{k}={v}" for k, v in mc.items()) or "official"
        return f"mixphm [{opts}] N={result.config.n_shots} s{result.config.seed}"

    def run(self):
        """Train or reuse the current configuration; add it to the table and its curves to ``curves``."""
        if self.runner is None:
            from ..train import run as runner
        else:
            runner = self.runner
        result = runner(self.config())
        if all(r.hash != result.hash for r in self.results):
            self.results.append(result)
        if self.analyser is not None:
            rows = self.analyser(result)
            if rows is not None:
                self.curves[self.label(result)] = rows.assign(method=self.label(result))
        return result

    def table(self):
        """One row per configuration run in this panel: its options, N, seed, test accuracy, trainable %."""
        import pandas as pd

        rows = [{"configuration": self.label(r), "N": r.config.n_shots, "seed": r.config.seed,
                 "test acc": round(r.test_accuracy, 3), "trainable %": round(r.params["trainable_pct"], 2),
                 "reused": r.reused} for r in self.results]
        return pd.DataFrame(rows, columns=["configuration", "N", "seed", "test acc", "trainable %", "reused"])

    def figure(self):
        """The per-layer curves of ``measure`` for the reference runs and every configuration analysed."""
        import pandas as pd

        from .study_plots import plot_redundancy

        frames = ([self.reference] if self.reference is not None else []) + list(self.curves.values())
        if not frames:
            return None
        df = pd.concat(frames, ignore_index=True)
        return plot_redundancy(df, measure=self.measure, states=("trained",), bands=False,
                               title=f"{self.measure.upper()} per module: reference runs and the panel's")

    def widget(self):
        """An ipywidgets VBox: a dropdown per knob, N and seed, a run button and an output area."""
        import ipywidgets as w
        import matplotlib.pyplot as plt

        controls = {name: w.Dropdown(options=list(choices), value=getattr(self, name), description=name,
                                     style={"description_width": "initial"})
                    for name, choices in MIXPHM_KNOBS.items()}
        controls["n_shots"] = w.Dropdown(options=list(self.shots), value=self.n_shots, description="N")
        controls["seed"] = w.Dropdown(options=list(self.seeds), value=self.seed, description="seed")
        button = w.Button(description="run", button_style="primary")
        out = w.Output()

        def on_run(_):
            for name, control in controls.items():
                setattr(self, name, control.value)
            with out:
                out.clear_output()
                try:
                    result = self.run()
                except ValueError as e:
                    print(f"not run: {e}")
                    return
                print(result.summary())
                print(self.table().to_string(index=False))
                fig = self.figure()
                if fig is not None:
                    plt.show()

        button.on_click(on_run)
        names = list(controls)
        return w.VBox([w.HBox([controls[n] for n in names[:4]]), w.HBox([controls[n] for n in names[4:]] + [button]),
                       out])
