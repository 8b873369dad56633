# Every target installs what it needs: a fresh machine with Python 3.11 and make is enough.
#
# Two scaleout client lines are tested; LINE picks one (CONTRIBUTING.rst):
#   LINE=1.0.7 (default)  scaleout 1.0.7, Python 3.11, .venv,     pinned by constraints.txt
#   LINE=1.1              scaleout 1.1.x, Python 3.12, .venv-1.1, pinned by constraints-1.1.txt
LINE ?= 1.0.7
ifeq ($(LINE),1.0.7)
VENV        := .venv
CONSTRAINTS := constraints.txt
PYTHON_WANTED := python3.11 or python3 on PATH
PYTHON ?= $(shell command -v python3.11 || command -v python3)
else ifeq ($(LINE),1.1)
VENV        := .venv-1.1
CONSTRAINTS := constraints-1.1.txt
PYTHON_WANTED := Python 3.12: python3.12 on PATH or pyenv's ~/.pyenv/versions/3.12*/bin/python3.12
# A pyenv shim named python3.12 exists even when it refuses to run: try each candidate.
PYTHON ?= $(shell for p in "$$(command -v python3.12)" $(HOME)/.pyenv/versions/3.12*/bin/python3.12; do \
	"$$p" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null && { echo "$$p"; break; }; done)
else
$(error LINE must be 1.0.7 or 1.1, got '$(LINE)')
endif
PY     := $(VENV)/bin/python
SEED_DIR ?= seed
SEED   := $(SEED_DIR)/seed.npz
DEMO   := demo

.PHONY: venv demo demo-clients test test-slow test-all lint docs test-client-1.1 seed package package-dispatcher bench mutate mutate-report clean

venv: $(VENV)/.installed

# `scaleout run install -p client` finds python_env.yaml satisfied and records that in the venv
# (env_metadata.txt): scaleout 1.1's `run build` then runs in this venv instead of building a
# managed one of its own (~6 GB). PIP_CONSTRAINT keeps that pip run on the pins as well.
$(VENV)/.installed: pyproject.toml $(CONSTRAINTS) client/python_env.yaml
	@test -n "$(PYTHON)" || { echo "error: LINE=$(LINE) needs $(PYTHON_WANTED); none found (set PYTHON=/path/to/python)"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) torch==2.13.0
	$(PY) -m pip install --quiet -c $(CONSTRAINTS) -e '.[test]'
	PIP_CONSTRAINT=$(CURDIR)/$(CONSTRAINTS) $(VENV)/bin/scaleout run install -p client
	touch $@

# scaleout's `run build` exits 0 even when build() raises: check the file instead.
seed: venv
	rm -f $(SEED)
	SCALEOUT_BUILD_OUTPUT_DIR=$(SEED_DIR) $(VENV)/bin/scaleout run build -p client
	@test -s $(SEED) || { echo "error: build did not write $(SEED) (see the log above)"; exit 1; }

package: venv
	$(VENV)/bin/scaleout package create --path client

# The package for `scaleout client start --dispatcher` (README "Deploying"): dispatcher/scaleout.yaml
# with client/'s python_env.yaml and library, assembled in build/dispatcher, tarred as package-dispatcher.tgz.
DISPATCHER_DIR ?= build/dispatcher
package-dispatcher: venv
	$(PY) dispatcher/assemble.py $(DISPATCHER_DIR)
	$(VENV)/bin/scaleout package create --path $(DISPATCHER_DIR) --name package-dispatcher.tgz

# A local federation: 3 non-IID clients (Dirichlet alpha 0.5) from the bundled 5k images, 5 FedAvg rounds.
demo: seed
	$(PY) -m mnist_edge prepare --source mnist5k --clients 3 --partition dirichlet --alpha 0.5 --seed 0 --out $(DEMO)/clients
	$(PY) -m mnist_edge simulate --data $(DEMO)/clients --rounds 5 --init $(SEED) --out $(DEMO)/run

# Three real `scaleout client start` processes on this box, started as launch_clients starts them
# (CLIENT_NUMBER/TOTAL_N_CLIENTS, one working directory), against the loopback stand-in for the
# server that the tests use (tests/combiner.py); one training round, images/s and memory reported.
demo-clients: venv
	$(PY) bench/many_clients.py --clients 3 --images-per-client 1000 --rounds 1 --modes budget --threads-env ''

# The fast tier (unit and in-process tests, a few minutes): what to run while changing code.
test: venv
	$(PY) -m pytest -q -m "not e2e and not slow"

# The slow tiers: real `scaleout client start` processes against the loopback combiner (e2e) and
# training on real images for more than a few seconds (slow).
test-slow: venv
	$(PY) -m pytest -q -m "e2e or slow"

# Everything CI runs on one client line: lint, the fast tier, the slow tiers.
test-all: lint test test-slow

lint: venv
	$(VENV)/bin/ruff check client tests bench docs

# The Sphinx docs (docs/), warnings as errors, plots drawn from bench/results/; tests/test_docs.py builds them too.
docs: venv
	$(PY) -m sphinx -W -b html docs docs/_build/html

# The whole suite on the scaleout 1.1.x line (Python 3.12, .venv-1.1).
test-client-1.1:
	$(MAKE) test-all LINE=1.1

# Performance benchmarks (minutes; not part of `make test`): reports land in bench/results/<CPU class>/
# (the folder `bench/perf_common.py` names for this CPU, e.g. x86_64-avx512_bf16), the round overhead
# per client line (LINE=1.1 for the 1.1 line), the DP step times too (privacy_steps.txt; the DP accuracy
# tables, an hour or more, are bench/README.rst "Privacy: accuracy per budget"). BENCH_ARGS is
# passed to each but ingest, BENCH_TAG ends the per-class file names, e.g.
# `make bench BENCH_ARGS=--threads=1 BENCH_TAG=-1thread`.
BENCH_ARGS ?=
BENCH_TAG ?=
bench: venv
	@dir=$$($(PY) bench/perf_common.py) && line=$$($(PY) -c 'import importlib.metadata as m; print(m.version("scaleout"))') && \
	set -x && \
	$(PY) bench/train_throughput.py $(BENCH_ARGS) --out $$dir/train_throughput$(BENCH_TAG).txt && \
	$(PY) bench/train_ideas.py $(BENCH_ARGS) --out $$dir/train_ideas$(BENCH_TAG).txt && \
	$(PY) bench/ingest.py --out $$dir/ingest.txt && \
	$(PY) bench/round_overhead.py $(BENCH_ARGS) --out $$dir/round_overhead-scaleout$$line$(BENCH_TAG).txt && \
	$(PY) bench/privacy.py --steps-only $(BENCH_ARGS) --out $$dir/privacy_steps$(BENCH_TAG).txt

# Mutation testing (CONTRIBUTING.rst; not part of `make test`): mutmut over the modules of pyproject.toml
# [tool.mutmut] against the fast in-process tests listed there, in parts that can run one after another
# or side by side: `make mutate MODULES="shards/* training.py"` runs those modules only (all without
# MODULES), in build/mutate/<part>/, saves bench/results/mutation-<part>.json and merges every saved
# part into bench/results/mutation.txt. TESTS="tests/test_data.py ..." narrows a part's tests to some of
# the selection (fewer tests can only kill fewer mutants). MUTATE_ARGS=--resume continues an interrupted part,
# MUTATE_ARGS=--recheck runs a part's survivors again after a test was added. One worker and nice on
# a shared machine (MUTATE_CHILDREN=2 where the cores are free).
MODULES         ?=
MUTATE_CHILDREN ?= 1
MUTATE_NICE     ?= 10
MUTATE_ARGS     ?=
TESTS           ?=
mutate: $(VENV)/.installed-mutate
	nice -n $(MUTATE_NICE) $(PY) bench/mutate.py --children $(MUTATE_CHILDREN) --modules "$(MODULES)" \
	    --tests "$(TESTS)" $(MUTATE_ARGS)

# The merged report alone, from the saved parts (after editing bench/mutation_equivalents.txt).
mutate-report: $(VENV)/.installed
	$(PY) bench/mutation_report.py merge

# mutmut's own dependencies, then mutmut without its click>=8.4.2 (see constraints.txt).
$(VENV)/.installed-mutate: $(VENV)/.installed
	$(PY) -m pip install --quiet -c constraints.txt libcst coverage setproctitle textual
	$(PY) -m pip install --quiet -c constraints.txt --no-deps mutmut
	touch $@

clean:
	rm -rf .venv .venv-1.1 $(DEMO) $(SEED) .pytest_cache build
