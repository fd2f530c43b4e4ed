# PEFT-VL Workbench. `make lab` to explore, `make test` to check everything.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed
NOTEBOOKS := $(sort $(wildcard notebooks/[0-9]*.ipynb))
PYTEST_NBVAL := --nbval --nbval-current-env --nbval-sanitize-with notebooks/sanitize.cfg --nbval-cell-timeout 900

.PHONY: setup lab test test-unit test-browser test-notebooks notebooks reproduce bench pretrain clean

$(PY):
	$(PYTHON) -m venv $(VENV)

# Re-install when the dependency list changes; torch first so nothing pulls a CUDA build.
$(STAMP): pyproject.toml | $(PY)
	bash tools/install_torch.sh $(PY)
	$(PY) -m pip install -q -e ".[test]"
	touch $(STAMP)

setup: $(STAMP)  ## create/update the virtual environment

# Jupyter refuses to run as root unless told; containers often are root.
ROOT_FLAG := $(if $(filter 0,$(shell id -u)),--allow-root)

lab: setup  ## open JupyterLab on notebooks/ (localhost, token authentication)
	$(VENV)/bin/jupyter lab --notebook-dir=notebooks --ServerApp.ip=localhost $(ROOT_FLAG)

test: setup  ## unit tests + every notebook re-executed and compared (nbval), then the notebooks in a real browser
	OMP_NUM_THREADS=2 $(PY) -m pytest tests --ignore=tests/browser $(NOTEBOOKS) $(PYTEST_NBVAL) -p no:cacheprovider
	OMP_NUM_THREADS=2 $(PY) -m pytest tests/browser -p no:cacheprovider -rs

test-browser: setup  ## JupyterLab in Chromium: every notebook run, every widget panel turned (tests/browser)
	OMP_NUM_THREADS=2 $(PY) -m pytest tests/browser -p no:cacheprovider -rs -s

test-unit: setup
	$(PY) -m pytest tests --ignore=tests/browser -p no:cacheprovider

test-notebooks: setup
	$(PY) -m pytest $(NOTEBOOKS) $(PYTEST_NBVAL) -p no:cacheprovider

notebooks: setup  ## rebuild every notebook from its source in notebooks/src/ (outputs dropped: then make reproduce)
	for src in notebooks/src/[0-9]*.py; do \
	  $(PY) tools/make_notebook.py $$src notebooks/$$(basename $$src .py).ipynb || exit 1; \
	done

reproduce: setup  ## execute every notebook headless in place; refreshes figures/
	cd notebooks && for nb in $(notdir $(NOTEBOOKS)); do \
	  ../$(VENV)/bin/jupyter nbconvert --to notebook --execute --inplace \
	    --ExecutePreprocessor.timeout=1800 $$nb || exit 1; done

# Studies (workbench/studies/): train what the run store and the bundle lack, then export the bundle.
STUDY    ?=
EXECUTOR ?= local
.PHONY: studies
studies: setup  ## run every study (or STUDY=name; EXECUTOR=local|processes|ray) and export its bundle to results/
	@for s in $(or $(STUDY),$$($(PY) -m workbench.studies list --names)); do \
	  echo "== study $$s"; \
	  $(PY) -m workbench.studies run $$s --executor $(EXECUTOR); rc=$$?; \
	  $(PY) -m workbench.studies export $$s || exit 1; \
	  [ $$rc -eq 0 ] || exit $$rc; done

bench: setup  ## benchmark scripts: print speed/memory figures as ratios
	@for b in $(sort $(wildcard tests/bench/bench_*.py)); do \
	  echo "== $$b"; OMP_NUM_THREADS=2 $(PY) $$b || exit 1; done

pretrain: setup  ## rebuild the embedded checkpoint data/checkpoints/vlt5-tiny
	$(PY) -m workbench.train.pretrain

clean:
	rm -rf $(VENV) .cache runs
