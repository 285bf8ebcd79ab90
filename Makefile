# The two commands a new user needs (each sets up everything it lacks):
#   make run    a completion on the default model; creates .venv and fetches the weights if missing
#   make test   the whole test suite, real-model tests included
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch. It is installed before the project, because a bare "torch"
# requirement on a machine without torch pulls a multi-GB CUDA build.
TORCH_SPEC ?= torch==2.13.0
PROMPT ?= What is the capital of France?
ARGS ?=

.PHONY: setup run test fetch clean

# Everything, for development: the package with its test stack.
setup: $(VENV)/.test-ready

# The virtual environment with torch in it, before anything that requires torch.
$(VENV)/.torch-ready:
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install --quiet "$(TORCH_SPEC)"
	touch $@

# What `make run` and the README's next step (`nanoengine serve`) need: the package and its server extra.
$(VENV)/.run-ready: pyproject.toml $(VENV)/.torch-ready
	$(BIN)/python -m pip install --quiet -e ".[server]"
	touch $@

# What `make test` needs besides: the test extra (transformers as the reference, the clients).
$(VENV)/.test-ready: pyproject.toml $(VENV)/.torch-ready
	$(BIN)/python -m pip install --quiet -e ".[test]"
	touch $@

run: $(VENV)/.run-ready
	$(BIN)/nanoengine complete --chat "$(PROMPT)" $(ARGS)

test: $(VENV)/.test-ready
	$(BIN)/python -m pytest $(ARGS)

fetch: $(VENV)/.run-ready
	$(BIN)/nanoengine fetch

clean:
	rm -rf $(VENV) build src/*.egg-info .pytest_cache
