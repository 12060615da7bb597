# Every target does the setup it needs; `make run` and `make test` work on a fresh clone.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
EXAMPLE := examples/bankaccount
BUILD := $(EXAMPLE)/build

.PHONY: setup run test examples bench faults mutation clean registry

$(BIN)/concordance: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet -e '.[dev]'
	touch $@

setup: $(BIN)/concordance

examples: setup
	$(BIN)/concordance build $(EXAMPLE)/aggregate --world aggregate -o $(BUILD)/bankaccount_aggregate.wasm
	$(BIN)/concordance build $(EXAMPLE)/projector --world stateless-handler -o $(BUILD)/bankaccount_projector.wasm
	$(BIN)/concordance build $(EXAMPLE)/process_manager --world process-manager -o $(BUILD)/wiretransfer_process_manager.wasm
	$(BIN)/concordance build $(EXAMPLE)/gateway --world stateless-handler -o $(BUILD)/otherbank_gateway.wasm

run: examples
	$(BIN)/concordance up $(EXAMPLE)/app.yaml

# Debian's OCI registry, for the tests and benchmarks that run components on a wasmCloud host.
registry:
	@command -v docker-registry >/dev/null || (echo "installing docker-registry with apt" && \
	  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry >/dev/null)

# Every test's name as it runs, the reasons for skips and failures, and the ten slowest at the end.
# Without docker-registry (apt-get needs root), the wasmCloud-host tests are skipped, saying why.
test: examples
	@$(MAKE) --no-print-directory registry || echo "docker-registry could not be installed:" \
	  "the tests that run components on a wasmCloud host will be skipped"
	$(BIN)/python -m pytest -v -ra --durations=10

bench: examples registry
	$(BIN)/python -m benchmarks.bench
	$(BIN)/python -m benchmarks.lattice

faults: examples
	$(BIN)/python -m faults.suite

# Mutation testing of the engine core and the naming rules on the fast tests (not part of `make test`).
mutation: setup
	$(BIN)/mutmut run --max-children 2
	$(BIN)/mutmut results

clean:
	rm -rf $(BUILD) .concordance
