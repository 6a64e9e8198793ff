# Two entry points for a fresh machine (Python 3.11): `make demo` and `make test`.
# Each creates .venv from pyproject.toml on first use, then runs.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
export TF_CPP_MIN_LOG_LEVEL ?= 2

.PHONY: demo test test-fast bench clean

$(VENV)/.runtime: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --upgrade pip
	$(VENV)/bin/pip install --quiet -e .
	touch $@

$(VENV)/.test: $(VENV)/.runtime
	$(VENV)/bin/pip install --quiet -e '.[test]'
	touch $@

# Generate CSS (64 px, 1K scenes / 16K queries per split), train TIRG on a CPU budget,
# evaluate 3D->3D Recall@{1,5,10,50} on the full test split and print the table.
# (TensorFlow, the input pipeline only, prints a oneDNN notice before its log level applies;
# its oneDNN kernels never touch the JAX model.)
demo: $(VENV)/.runtime
	TF_ENABLE_ONEDNN_OPTS=$${TF_ENABLE_ONEDNN_OPTS:-0} $(PY) -m cir_jax.train --config configs/tirg_css.py:cpu --workdir runs/demo

# The whole suite, slow end-to-end group included (what CI runs), one pytest-xdist worker
# per core; an idle worker takes tests queued for a busy one (`--dist worksteal`).
test: $(VENV)/.test
	$(PY) -m pytest -q -n auto --dist worksteal --durations=20

test-fast: $(VENV)/.test
	$(PY) -m pytest -q -n auto --dist worksteal -m "not slow"

bench: $(VENV)/.runtime
	$(PY) tools/benchmark.py

clean:
	rm -rf $(VENV) runs
