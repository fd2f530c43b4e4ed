"""Figures, tables and widgets for the notebooks (matplotlib, pandas, ipywidgets).

- :mod:`.data_plots`: example grids with their prompts and answers, question-type and answer
  distributions, a low-resource split next to its pool.
- :mod:`.training_plots`: results tables (overall and per question type), learning curves,
  accuracy against % trainable parameters, what each run answers, method families.
- :mod:`.panels`: ipywidgets panels (the method gallery's method / N / main-knob panel) whose
  logic is plain Python, so tests drive them by setting ``.value``.
"""
