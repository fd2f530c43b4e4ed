"""ipywidgets panels. The logic is plain Python that tests drive by setting ``.value``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

from ..methods import list_methods, method_spec


def run_into(out, run: Callable, after: Callable | None = None) -> None:
    """A panel's run button: clear the Output ``out``, call ``run()`` and print its result's summary
    there (then ``after(result)``); an impossible config (ValueError) says why instead of a traceback."""
    with out:
        out.clear_output()
        try:
            result = run()
        except ValueError as e:
            print(f"not run: {e}")
            return
        print(result.summary())
        if after is not None:
            after(result)


def run_kept(runner: Callable | None, cfg, results: list):
    """``runner(cfg)`` (default :func:`workbench.train.run`), its result appended to ``results``
    unless a result of the same run is there already."""
    if runner is None:
        from ..train import run as runner
    result = runner(cfg)
    if all(r.hash != result.hash for r in results):
        results.append(result)
    return result


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
            run_into(out, self.run)

        method.observe(refresh_knob, names="value")
        button.on_click(on_run)
        refresh_knob()
        return w.VBox([w.HBox([method, shots, knob, button]), out])


@dataclass
class KnobPanel:
    """A panel over one method's knobs: a dropdown per knob (``KNOBS``: name -> offered values, the
    first being the default), N and seed; :meth:`run` trains or reuses the configuration through
    ``runner`` (e.g. ``run(cfg, store=load_study(...))``) and keeps it for :meth:`table`;
    ``analyser(result)`` may compute something to show beside it (kept in ``analyses``). The state
    lives in plain fields, so tests and scripts drive the panel without a browser. A value equal to
    the default is left out of the config, so the default setting is the study's own run (same hash).
    """

    METHOD: ClassVar[str] = ""
    KNOBS: ClassVar[dict] = {}

    base: object
    runner: Callable | None = None
    analyser: Callable | None = None
    shots: tuple = (16, 32, 64, 100, 500, 1000)
    seeds: tuple = (13, 21, 42, 87, 100)
    n_shots: int = 64
    seed: int = 13
    results: list = field(default_factory=list, repr=False)
    analyses: dict = field(default_factory=dict, repr=False)

    def overrides(self) -> dict:
        """The method_config entries of the current knobs (those that differ from the default)."""
        return {name: getattr(self, name) for name, choices in self.KNOBS.items() if getattr(self, name) != choices[0]}

    def config(self):
        """The RunConfig of the current choices (a ValueError names a value the panel does not offer)."""
        for name, choices in self.KNOBS.items():
            if getattr(self, name) not in choices:
                raise ValueError(f"{self.METHOD}: {name} must be one of {choices}, got {getattr(self, name)!r}")
        if self.n_shots not in self.shots:
            raise ValueError(f"n_shots must be one of {self.shots}, got {self.n_shots!r}")
        if self.seed not in self.seeds:
            raise ValueError(f"seed must be one of {self.seeds}, got {self.seed!r}")
        return self.base.replace(method=self.METHOD, n_shots=self.n_shots, seed=self.seed,
                                 method_config=self.overrides())

    @classmethod
    def label(cls, result) -> str:
        opts = ", ".join(f"{k}={v}" for k, v in result.config.method_config.items()) or "default"
        return f"{cls.METHOD} [{opts}] N={result.config.n_shots} s{result.config.seed}"

    def run(self):
        """Train or reuse the current configuration; add it to the table and its analysis to ``analyses``."""
        result = run_kept(self.runner, self.config(), self.results)
        if self.analyser is not None:
            rows = self.analyser(result)
            if rows is not None:
                self.analyses[self.label(result)] = rows
        return result

    def table(self):
        """One row per configuration run in this panel: its options, N, seed, test accuracy, trainable %."""
        import pandas as pd

        rows = [{"configuration": self.label(r), "N": r.config.n_shots, "seed": r.config.seed,
                 "test acc": round(r.test_accuracy, 3), "trainable %": round(r.params["trainable_pct"], 2),
                 "reused": r.reused} for r in self.results]
        return pd.DataFrame(rows, columns=["configuration", "N", "seed", "test acc", "trainable %", "reused"])

    def show(self, result) -> None:
        """What the widget shows below the table after a run (subclasses add a figure or rows)."""

    def widget(self):
        """An ipywidgets VBox: a dropdown per knob, N and seed, a run button and an output area."""
        import ipywidgets as w

        controls = {name: w.Dropdown(options=list(choices), value=getattr(self, name), description=name,
                                     style={"description_width": "initial"})
                    for name, choices in self.KNOBS.items()}
        controls["n_shots"] = w.Dropdown(options=list(self.shots), value=self.n_shots, description="N")
        controls["seed"] = w.Dropdown(options=list(self.seeds), value=self.seed, description="seed")
        button = w.Button(description="run", button_style="primary")
        out = w.Output()

        def on_run(_):
            for name, control in controls.items():
                setattr(self, name, control.value)
            run_into(out, self.run, after=lambda result: (print(self.table().to_string(index=False)),
                                                          self.show(result)))

        button.on_click(on_run)
        names = list(controls)
        return w.VBox([w.HBox([controls[n] for n in names[:4]]), w.HBox([controls[n] for n in names[4:]] + [button]),
                       out])


# MixPHM's knobs and the values the panel offers (the first of each is the official value).
MIXPHM_KNOBS = {
    "num_experts": (4, 1, 2, 8),
    "rank": (8, 1, 4, 16),
    "reduction_factor": (12, 6, 24),
    "w_red": (0.2, 0.0, 0.05, 0.5, 1.0),
    "w_mi": (0.2, 0.0, 0.05, 0.5, 1.0),
}


@dataclass
class MixPHMPanel(KnobPanel):
    """MixPHM's knobs (experts, rank, reduction factor, the two regulariser weights), N and seed; the
    ``analyser`` returns a run's redundancy rows (:func:`~workbench.studies.redundancy_analysis`),
    drawn per layer beside ``reference`` (the reference runs' rows) by :meth:`figure`."""

    METHOD: ClassVar[str] = "mixphm"
    KNOBS: ClassVar[dict] = MIXPHM_KNOBS

    reference: object = None
    measure: str = "rsa"
    num_experts: int = 4
    rank: int = 8
    reduction_factor: int = 12
    w_red: float = 0.2
    w_mi: float = 0.2

    @property
    def curves(self) -> dict:
        """label -> the redundancy rows of each configuration analysed (``method`` set to the label)."""
        return {k: v.assign(method=k) for k, v in self.analyses.items()}

    @classmethod
    def label(cls, result) -> str:
        return super().label(result).replace("[default]", "[official]")

    def figure(self):
        """The per-layer curves of ``measure`` for the reference runs and every configuration analysed."""
        import pandas as pd

        from .study_plots import plot_redundancy

        frames = ([self.reference] if self.reference is not None else []) + list(self.curves.values())
        if not frames:
            return None
        return plot_redundancy(pd.concat(frames, ignore_index=True), measure=self.measure, states=("trained",),
                               bands=False, title=f"{self.measure.upper()} per module: reference runs and the panel's")

    def show(self, result) -> None:
        import matplotlib.pyplot as plt

        if self.figure() is not None:
            plt.show()


# VL-PET's knobs the panel offers (the first of each is the default on T5: r 192, r_g 192, s 0.3).
VLPET_KNOBS = {
    "granularity": ("large", "middleX", "middleY", "small"),
    "r": (192, 48, 96, 384),
    "r_gate": (192, 48, 96, 384),
    "scale": (0.3, 0.1, 0.5, 1.0),
    "design": ("encoder + value adapter (default)", "encoder only", "value adapter only", "encoder + full decoder"),
}


@dataclass
class VLPETPanel(KnobPanel):
    """VL-PET's knobs: granularity, bottleneck r, gate rank r_g, scale s and the lightweight design
    (the defaults are VL-PET's T5 values, which vlt5-tiny resolves to), N and seed; the ``analyser``
    may return rows (e.g. gate statistics), shown below the table."""

    METHOD: ClassVar[str] = "vlpet"
    KNOBS: ClassVar[dict] = VLPET_KNOBS

    shots: tuple = (16, 64, 500, 1000)
    seeds: tuple = (13, 21, 42)
    granularity: str = "large"
    r: int = 192
    r_gate: int = 192
    scale: float = 0.3
    design: str = "encoder + value adapter (default)"

    def overrides(self) -> dict:
        from ..studies.vlpet import DESIGNS

        out = {k: v for k, v in super().overrides().items() if k != "design"}
        return {**out, **DESIGNS[self.design]}

    def show(self, result) -> None:
        from IPython.display import display

        rows = self.analyses.get(self.label(result))
        if rows is not None:
            display(rows)


# PETAL's knobs the panel offers (the first of each is the default of variant="paper").
PETAL_KNOBS = {
    "rank": (64, 4, 16, 128),
    "learn_threshold": (True, False),
    "n_experts": (4, 2, 8),
    "n_templates": (4, 1, 8),
    "w_ib": (0.1, 0.0, 0.03, 0.3, 1.0),
}


@dataclass
class PETALPanel(KnobPanel):
    """PETAL's knobs: modes R, the threshold learned or frozen, experts K, instruction templates M,
    the bottleneck weight; N and seed."""

    METHOD: ClassVar[str] = "petal"
    KNOBS: ClassVar[dict] = PETAL_KNOBS

    shots: tuple = (16, 64, 1000)
    seeds: tuple = (13, 21, 42)
    rank: int = 64
    learn_threshold: bool = True
    n_experts: int = 4
    n_templates: int = 4
    w_ib: float = 0.1


@dataclass
class EmpiricalPanel:
    """One cell of the empirical study's grid: method, task, metric, N, parameter size and seed.

    **run** shows the cell's run (``runner(cfg)``, e.g. ``run(cfg, store=load_study("empirical"))``:
    reused from the bundle or the run store, trained live otherwise), its score in the chosen metric,
    and the cell's mean +- std over the seeds that ``store`` holds. The size offered depends on the
    method (prompt / prefix length, LoRA rank, adapter bottleneck), the metric on the task (CIDEr-D
    and BLEU-4 for captions, accuracy for VQA). State in plain fields, as the other panels.
    """

    runner: Callable | None = None
    store: object = None
    method: str = "lora"
    task: str = "shapes-vqa"
    metric: str | None = None  # None: the task's headline metric
    n_shots: int = 64
    size: int | None = None  # None: the method's second size
    seed: int = 13
    results: list = field(default_factory=list, repr=False)

    @staticmethod
    def _study():
        from ..studies import empirical

        return empirical

    def sizes(self) -> tuple:
        study = self._study()
        if self.method not in study.SIZES:
            raise ValueError(f"method must be one of {tuple(study.SIZES)}, got {self.method!r}")
        return study.SIZES[self.method][1]

    def metrics(self) -> tuple:
        study = self._study()
        if self.task not in study.METRICS:
            raise ValueError(f"task must be one of {study.TASKS}, got {self.task!r}")
        return study.METRICS[self.task]

    def config(self):
        """The grid cell's RunConfig (a ValueError names what the grid does not hold)."""
        study = self._study()
        if self.n_shots not in study.N_SHOTS:
            raise ValueError(f"n_shots must be one of {study.N_SHOTS}, got {self.n_shots!r}")
        if self.seed not in study.STUDY_SEEDS:
            raise ValueError(f"seed must be one of {study.STUDY_SEEDS}, got {self.seed!r}")
        if self.metric is not None and self.metric not in self.metrics():
            raise ValueError(f"{self.task} is scored with {self.metrics()}, got {self.metric!r}")
        size = self.sizes()[1] if self.size is None else self.size
        return study.config(self.task, self.method, size, self.n_shots, self.seed)

    def score(self, result) -> float:
        """The result's test score in the panel's metric."""
        column = self._study().metric_column(self.task, self.metric)
        test = result.metrics["test"]
        return float(test["overall"] if column == "test_acc" else test[column.split("/", 1)[1]])

    def cell(self):
        """The cell's mean, std and number of seeds in ``store`` (None without a store or runs)."""
        if self.store is None:
            return None
        cfg = self.config()
        table = self._study().grid_table(self.store, metric=self.metric)
        if len(table) == 0:
            return None
        size = cfg.method_config[self._study().SIZES[self.method][0]]
        row = table[(table["task"] == self.task) & (table["method"] == self.method) & (table["size"] == size)
                    & (table["n_shots"] == self.n_shots)]
        return None if row.empty else row.iloc[0]

    def run(self):
        """Train or reuse the current cell; keep its result."""
        return run_kept(self.runner, self.config(), self.results)

    def describe(self, result) -> str:
        """The line the widget prints under the run's summary."""
        metric = self.metric or self.metrics()[0]
        text = f"{self.task} {self.method} size={self.config().method_config} N={self.n_shots}: " \
               f"{metric} {self.score(result):.3f} (seed {self.seed})"
        cell = self.cell()
        if cell is not None:
            text += f"; over {int(cell['n'])} seeds {cell['mean']:.3f} +- {cell['std']:.3f}"
        return text

    def widget(self):
        """Dropdowns for method, task, metric, N, size and seed; a run button; an output area."""
        import ipywidgets as w

        study = self._study()
        method = w.Dropdown(options=list(study.SIZES), value=self.method, description="method")
        task = w.Dropdown(options=list(study.TASKS), value=self.task, description="task")
        metric = w.Dropdown(description="metric")
        shots = w.Dropdown(options=list(study.N_SHOTS), value=self.n_shots, description="N")
        size = w.Dropdown(description="size")
        seed = w.Dropdown(options=list(study.STUDY_SEEDS), value=self.seed, description="seed")
        button = w.Button(description="run", button_style="primary")
        out = w.Output()

        def refresh(*_):
            self.method, self.task = method.value, task.value
            size.options = list(self.sizes())
            size.value = self.size if self.size in self.sizes() else self.sizes()[1]
            size.description = study.SIZES[self.method][0]
            metric.options = list(self.metrics())
            metric.value = self.metric if self.metric in self.metrics() else self.metrics()[0]

        def on_run(_):
            self.method, self.task, self.n_shots, self.seed = method.value, task.value, shots.value, seed.value
            self.size = size.value
            self.metric = None if metric.value == self.metrics()[0] else metric.value
            run_into(out, self.run, after=lambda result: print(self.describe(result)))

        method.observe(refresh, names="value")
        task.observe(refresh, names="value")
        button.on_click(on_run)
        refresh()
        return w.VBox([w.HBox([method, task, metric]), w.HBox([shots, size, seed, button]), out])
