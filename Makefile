# Every target installs what it needs: a fresh machine with Python 3.11 and make is enough.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
PY     := $(VENV)/bin/python
SEED_DIR ?= seed
SEED   := $(SEED_DIR)/seed.npz
DEMO   := demo

.PHONY: venv demo test seed package bench clean

venv: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	@test -n "$(PYTHON)" || { echo "error: no python3.11 or python3 on PATH (set PYTHON=/path/to/python3.11)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c constraints.txt torch==2.13.0
	$(PY) -m pip install --quiet -c constraints.txt -e '.[test]'
	touch $@

# scaleout 1.0.7's `run build` exits 0 even when build() raises: check the file instead.
seed: venv
	rm -f $(SEED)
	SCALEOUT_BUILD_OUTPUT_DIR=$(SEED_DIR) $(VENV)/bin/scaleout run build -p client
	@test -s $(SEED) || { echo "error: build did not write $(SEED) (see the log above)"; exit 1; }

package: venv
	$(VENV)/bin/scaleout package create --path client

demo: seed
	$(PY) -m mnist_edge prepare --source mnist5k --clients 3 --out $(DEMO)/clients --seed 0
	$(PY) -m mnist_edge demo --data $(DEMO)/clients/client-0 --seed-model $(SEED)

test: venv
	$(PY) -m pytest -q

bench: venv
	@echo "no benchmarks yet"

clean:
	rm -rf $(VENV) $(DEMO) $(SEED) .pytest_cache
