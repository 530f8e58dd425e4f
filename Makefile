# embedkit front door. Every target works on a fresh machine: it creates .venv on first use.
SHELL := /bin/bash
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | sha1sum | cut -c1-12)
# Third-party SageMaker clients (AWS CLI v1, LangChain, llama-index) for the client suite, in a venv of
# their own: awscli pins botocore exactly and the others bring large trees; no torch in it.
CLIENTS := .venv-clients
CLIENTS_REQ := tests/clients/requirements.txt
CLIENTS_STAMP := $(CLIENTS)/.installed-$(shell cat $(CLIENTS_REQ) | sha1sum | cut -c1-12)
# infinity-emb for make bench's serving comparison, in a venv of its own (it pins its own
# transformers / sentence-transformers); torch first, at the version embedkit uses.
INFINITY := .venv-infinity
INFINITY_TORCH := torch==2.13.0
INFINITY_PKG := infinity-emb[server,torch]==0.0.78
INFINITY_STAMP := $(INFINITY)/.installed-$(shell echo '$(INFINITY_TORCH) $(INFINITY_PKG)' | sha1sum | cut -c1-12)
# FlagEmbedding (BAAI's reference for BGE-M3's dense, sparse and ColBERT outputs) for the golden parity
# tests, in a venv of its own: it needs transformers 4.x. Torch first, at the version embedkit uses;
# the upper bounds are needed: newer transformers / sentence-transformers / huggingface-hub / datasets
# break FlagEmbedding 1.4.2's imports.
REFERENCE := .venv-flagembedding
REFERENCE_TORCH := torch==2.13.0
REFERENCE_PKGS := FlagEmbedding==1.4.2 transformers>=4.44,<4.58 sentence-transformers<6 huggingface-hub<1 datasets<4
REFERENCE_STAMP := $(REFERENCE)/.installed-$(shell echo '$(REFERENCE_TORCH) $(REFERENCE_PKGS)' | sha1sum | cut -c1-12)
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: install clients reference bench-venvs demo test test-fast lint docs format bench clean

install: $(STAMP)

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q "torch==2.13.0"
	$(BIN)/python -m pip install -q -e ".[dev]"
	rm -f $(VENV)/.installed-*
	touch $(STAMP)

clients: $(CLIENTS_STAMP)

$(CLIENTS_STAMP): $(CLIENTS_REQ)
	test -x $(CLIENTS)/bin/python || $(PY) -m venv $(CLIENTS)
	$(CLIENTS)/bin/python -m pip install -q --upgrade pip
	$(CLIENTS)/bin/python -m pip install -q -r $(CLIENTS_REQ)
	rm -f $(CLIENTS)/.installed-*
	touch $(CLIENTS_STAMP)

reference: $(REFERENCE_STAMP)

$(REFERENCE_STAMP):
	test -x $(REFERENCE)/bin/python || $(PY) -m venv $(REFERENCE)
	$(REFERENCE)/bin/python -m pip install -q --upgrade pip
	$(REFERENCE)/bin/python -m pip install -q "$(REFERENCE_TORCH)"
	$(REFERENCE)/bin/python -m pip install -q $(foreach p,$(REFERENCE_PKGS),"$(p)")
	rm -f $(REFERENCE)/.installed-*
	touch $(REFERENCE_STAMP)

bench-venvs: $(INFINITY_STAMP)

$(INFINITY_STAMP):
	test -x $(INFINITY)/bin/python || $(PY) -m venv $(INFINITY)
	$(INFINITY)/bin/python -m pip install -q --upgrade pip
	$(INFINITY)/bin/python -m pip install -q "$(INFINITY_TORCH)"
	$(INFINITY)/bin/python -m pip install -q "$(INFINITY_PKG)"
	rm -f $(INFINITY)/.installed-*
	touch $(INFINITY_STAMP)

demo: install
	$(BIN)/python -m embedkit.demo

# lint-imports checks the layers of src/embedkit ([tool.importlinter] in pyproject.toml).
lint: install
	$(BIN)/ruff check src tests bench scripts
	$(BIN)/ruff format --check src tests bench scripts
	$(BIN)/lint-imports

# The documentation (docs/, mkdocs.yml); --strict turns a broken link or anchor into a failure.
docs: install
	$(BIN)/mkdocs build --strict --site-dir build/site

format: install
	$(BIN)/ruff format src tests bench scripts
	$(BIN)/ruff check --fix src tests bench scripts

# The inner loop: lint, the docs build and the unit tests not marked slow (no servers, no jobs);
# a few minutes on 2 cores once .venv exists. `make test` is the full suite CI runs.
test-fast: lint docs
	$(BIN)/python -m pytest -q tests/unit -m "not slow"

# The two third-party venvs install (mostly waiting on downloads and unpacking) while lint and the
# docs build run: -j saves their minutes on a fresh clone.
test: install
	$(MAKE) --no-print-directory -j4 --output-sync=target lint docs clients reference
	EMBEDKIT_CLIENTS_PYTHON=$(CURDIR)/$(CLIENTS)/bin/python EMBEDKIT_REQUIRE_CLIENTS=1 \
	EMBEDKIT_REFERENCE_PYTHON=$(CURDIR)/$(REFERENCE)/bin/python EMBEDKIT_REQUIRE_REFERENCE=1 \
	$(BIN)/python -m pytest -q

# The infinity-emb venv is best effort: where it does not install, the serve section says so and
# skips that comparison.
bench: install
	-$(MAKE) --no-print-directory bench-venvs
	$(BIN)/python -m bench.run

clean:
	rm -rf $(VENV) $(CLIENTS) $(INFINITY) $(REFERENCE) build dist src/*.egg-info .pytest_cache .ruff_cache demo-output
