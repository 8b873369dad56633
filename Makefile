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

# A local federation: 3 non-IID clients (Dirichlet alpha 0.5) from the bundled 5k images, 5 FedAvg rounds.
demo: seed
	$(PY) -m mnist_edge prepare --source mnist5k --clients 3 --partition dirichlet --alpha 0.5 --seed 0 --out $(DEMO)/clients
	$(PY) -m mnist_edge simulate --data $(DEMO)/clients --rounds 5 --init $(SEED) --out $(DEMO)/run

test: venv
	$(PY) -m pytest -q

# Performance benchmarks (minutes; not part of `make test`): reports land in bench/results/<CPU class>/
# (the folder `bench/perf_common.py` names for this CPU, e.g. x86_64-avx512_bf16), the round
# overhead per client line. BENCH_ARGS is passed to the training benchmarks and BENCH_TAG ends their
# file names, e.g. `make bench BENCH_ARGS=--threads=1 BENCH_TAG=-1thread`.
BENCH_ARGS ?=
BENCH_TAG ?=
bench: venv
	@dir=$$($(PY) bench/perf_common.py) && line=$$($(PY) -c 'import importlib.metadata as m; print(m.version("scaleout"))') && \
	set -x && \
	$(PY) bench/train_throughput.py $(BENCH_ARGS) --out $$dir/train_throughput$(BENCH_TAG).txt && \
	$(PY) bench/train_ideas.py $(BENCH_ARGS) --out $$dir/train_ideas$(BENCH_TAG).txt && \
	$(PY) bench/ingest.py --out $$dir/ingest.txt && \
	$(PY) bench/round_overhead.py $(BENCH_ARGS) --out $$dir/round_overhead-scaleout$$line$(BENCH_TAG).txt

clean:
	rm -rf $(VENV) $(DEMO) $(SEED) .pytest_cache
