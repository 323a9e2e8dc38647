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
# how a run was launched is pipeline.launch's to say (pipeline/launched.py), or plan's PLAN_LAUNCH below: one left
# exported in the user's shell would make a one-process goal's messages name a launch it never made
unexport PYTHON_PIPELINE_LAUNCH

ifneq ($(words $(RECIPE)),1)
$(error RECIPE='$(RECIPE)': make cannot handle a file name with a space (it splits it into two targets); rename the \
recipe file, or run its stages directly: python -m pipeline <stage> '$(RECIPE)')
endif
# A recipe's stamps are kept under its path (relative to here, extension dropped): LLaMA-Factory's layout has
# examples/train_lora/qwen3_lora_sft.yaml and examples/merge_lora/qwen3_lora_sft.yaml, which make chains.
stamps_of = .stamps/$(basename $(patsubst /%,%,$(patsubst $(CURDIR)/%,%,$(abspath $(1)))))
STAMPS := $(call stamps_of,$(RECIPE))
# `make -n` (--dry-run, --just-print) changes nothing on disk. GNU make still runs the rule that remakes an included
# makefile under -n, and expands (so runs the $(file) of) every recipe it prints: a dry run moved old stamps, wrote
# deps.mk, scope.mk and args.new. Under -n, deps runs into a temporary folder (below) and nothing else is written.
DRY_RUN := $(findstring n,$(firstword -$(MAKEFLAGS)))
# Stamps written before (.stamps/<file name>/) are moved here when their deps.mk names this recipe: without that, the
# first make after the update retrained every finished run from scratch. A dry run reads them where they are.
LEGACY_STAMPS := .stamps/$(basename $(notdir $(RECIPE)))
# (Files under .stamps are tested by the shell, not $(wildcard): make keeps a folder's names from the first look, and
# deps may write this recipe's folder while the Makefile is read, below.)
ifeq ($(shell test -d $(STAMPS) || test ! -f $(LEGACY_STAMPS)/deps.mk || echo move),move)
ifeq ($(call stamps_of,$(word 1,$(patsubst RECIPE_FILES=%,%,$(shell grep -m1 '^RECIPE_FILES=' $(LEGACY_STAMPS)/deps.mk)))),$(STAMPS))
ifeq ($(DRY_RUN),)
$(shell mkdir -p $(dir $(STAMPS)) && mv $(LEGACY_STAMPS) $(STAMPS))
else
STAMPS := $(LEGACY_STAMPS)
endif
endif
endif
STAGE_GOALS := data validate inspect plan train dry-run merge export eval chat all

# Several ranks (or nodes) go through the deepspeed launcher; one rank is a plain python process.
# NNODES > 1: this node's part of a job without ssh (docs/packing-and-scale.md); HOSTFILE: DeepSpeed over ssh.
# PLAN_LAUNCH: plan's environment as the launcher gives the ranks (pipeline/launched.py: its options, percent-encoded),
# so the commands plan's messages name launch the job `make train` with these variables would.
ifeq ($(NPROC)$(HOSTFILE)$(NNODES),11)
LAUNCH := $(PY) -m pipeline
PLAN_LAUNCH :=
else
LAUNCH_OPTIONS := $(strip $(if $(HOSTFILE),--hostfile $(HOSTFILE)) \
	$(if $(filter-out 1,$(NNODES)),--nnodes $(NNODES) --node_rank $(NODE_RANK) --master_addr '$(MASTER_ADDR)') \
	$(if $(MASTER_PORT),--master_port $(MASTER_PORT)) --num_gpus $(NPROC))
LAUNCH := $(PY) -m pipeline.launch $(LAUNCH_OPTIONS) --module pipeline
LAUNCH_SPACE := $(subst ,, )
PLAN_LAUNCH := PYTHON_PIPELINE_LAUNCH=$(subst $(LAUNCH_SPACE),%20,$(subst ',%27,$(subst %,%25,$(LAUNCH_OPTIONS))))
endif

.PHONY: help setup test-deps data validate inspect plan train dry-run merge export eval chat all test test-slow test-all bench clean FORCE

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
#
# deps runs while make reads this file when deps.mk is missing or an input is newer than scope.mk, not as the rule that
# remakes an included makefile: a failing rule always adds make's own lines to ours ("deps.mk: No such file or
# directory", "make: *** [...scope.mk] Error 2"), and GNU make runs that rule even under -n, which changes nothing on
# disk (a dry run runs deps into a temporary folder). On a mistake, make stops there ($(error)): our message, then one
# line of make's own ("Makefile:N: *** stopped by the message above; nothing ran.  Stop."), exit 2 as every user
# mistake (make's question mode would hide that line, but exits 1, which means a bug here). While .venv is not set up
# (or requirements.txt changed since), the rule below runs: setup first, then deps, with make's lines after a mistake.
STAGE_RUN := $(filter $(STAGE_GOALS),$(MAKECMDGOALS))
ifneq ($(STAGE_RUN),)
ifeq ($(wildcard $(RECIPE)),)
$(error RECIPE=$(RECIPE): no such recipe file (the recipes here: $(wildcard recipes/*.yaml)))
endif
DEPS_NOW := $(if $(DRY_RUN),yes,$(shell [ -e $(VENV)/.setup-done ] && [ ! requirements.txt -nt $(VENV)/.setup-done ] \
	&& echo yes))
-include $(STAMPS)/scope.mk
ifeq ($(DEPS_NOW),)
include $(STAMPS)/deps.mk
else
-include $(STAMPS)/deps.mk
endif
endif

# On a bad recipe, validate lists every problem (deps checks fewer), so deps' own messages are shown only when
# validate finds none: each problem is printed once. Not for `make export`: an export recipe names no dataset, which
# validate requires, so validate's one message would hide deps' own. Both get PREP_ARGS (below).
# The recipes in scope are inputs too: UPSTREAMS is read off them, so a recipe added or edited in a folder deps
# searched (scope.mk's SCOPE_FOLDERS; a new upstream, an upstream's output_dir changed) is seen. So are those folders:
# a folder's time changes when a name is added to it, removed or renamed, so a recipe put in a folder created since
# (recipes/new/x.yaml changes recipes/) or a recipe removed is seen by the next make too (measured: deps takes 0.5 s, a
# check of the inputs' times 5 ms). deps.mk is rewritten only when its text changes, so that such a change does not make
# this recipe's stages stale (they depend on deps.mk); scope.mk, which no stage depends on, is rewritten every time, so
# that deps runs once per change, and a folder that appears (datasets/build/x) costs one deps run and changes nothing.
SCOPE_RECIPES := $(filter-out $(RECIPE),$(wildcard $(foreach d,$(dir $(RECIPE)) $(SCOPE_FOLDERS),$(d)*.yaml $(d)*.yml)))
DEPS_INPUTS := $(RECIPE) $(RECIPE_FILES) $(SCOPE_RECIPES) $(wildcard $(SCOPE_FOLDERS:%=%.)) $(VENV)/.setup-done
# `make eval` of a benchmark recipe (LLaMA-Factory's eval recipe: a top-level `task:` key): like export's, it names no
# dataset, so validate's message about that would come before deps' own (read before deps.mk exists: a grep)
BENCHMARK_GOAL = $(and $(filter eval,$(MAKECMDGOALS)),$(shell grep -qE '^task:[[:space:]]*[^[:space:]#]' '$(RECIPE)' && echo y))
# deps' output into folder $(1): deps.mk (rewritten only when its text changes) and scope.mk; 2 on a mistake
deps_into = mkdir -p $(1) && { $(PY) -m pipeline deps $(RECIPE) $(PREP_ARGS) > $(1)/scope.mk.tmp \
	2> $(1)/scope.mk.err || { rm -f $(1)/scope.mk.tmp; \
	$(if $(filter export,$(MAKECMDGOALS))$(BENCHMARK_GOAL),,$(PY) -m pipeline validate $(RECIPE) $(PREP_ARGS) &&) \
	cat $(1)/scope.mk.err >&2; rm -f $(1)/scope.mk.err; exit 2; }; } && \
	rm -f $(1)/scope.mk.err && grep -v '^SCOPE_FOLDERS=' $(1)/scope.mk.tmp > $(1)/deps.mk.tmp && \
	{ cmp -s $(1)/deps.mk.tmp $(1)/deps.mk && rm -f $(1)/deps.mk.tmp || mv $(1)/deps.mk.tmp $(1)/deps.mk; } && \
	grep '^SCOPE_FOLDERS=' $(1)/scope.mk.tmp > $(1)/scope.mk.new; rm -f $(1)/scope.mk.tmp; \
	mv $(1)/scope.mk.new $(1)/scope.mk
# --dry-run is train's option (`make train ARGS=--dry-run`, what `make dry-run` runs): deps, build and validate get
# ARGS without it (PREP_ARGS) and run for real first, as under `make dry-run`; handed it, build refused it, so a dry
# run of a recipe whose data was not built yet stopped there. A goal with no dry run of its own (merge, eval, all, ...)
# refuses it before anything runs: the dry run then ran, and merge refused --dry-run after it.
TRAIN_DRY_RUN := $(filter --dry-run,$(ARGS))
PREP_ARGS = $(filter-out --dry-run,$(ARGS))
ifneq ($(TRAIN_DRY_RUN),)
ifneq ($(filter-out train dry-run,$(STAGE_RUN)),)
$(error ARGS='$(ARGS)': --dry-run is an option of train alone, and `make $(filter-out train dry-run,$(STAGE_RUN))` \
has none; check the recipe with `make dry-run RECIPE=$(RECIPE)` (or `make train ARGS=--dry-run`) and take --dry-run out \
of ARGS for the other targets)
endif
endif
DEPS_MK := $(STAMPS)/deps.mk
ifneq ($(DEPS_NOW),)
ifneq ($(shell test -f $(STAMPS)/deps.mk -a -f $(STAMPS)/scope.mk || echo none yet; find $(DEPS_INPUTS) -maxdepth 0 \
		-newer $(STAMPS)/scope.mk 2>/dev/null | head -n1),)
DEPS_DIR := $(if $(DRY_RUN),$(shell mktemp -d),$(STAMPS))
DEPS_OK := $(shell ( $(call deps_into,$(DEPS_DIR)) ) >&2 && echo done)
ifeq ($(DEPS_OK),done)
-include $(DEPS_DIR)/scope.mk $(DEPS_DIR)/deps.mk
ifneq ($(DRY_RUN),)
# deps.mk would change: what depends on it is shown as stale, as the real run finds it
DEPS_MK := $(if $(shell cmp -s $(DEPS_DIR)/deps.mk $(STAMPS)/deps.mk && echo same),$(STAMPS)/deps.mk,FORCE)
endif
endif
$(if $(DRY_RUN),$(shell rm -rf $(DEPS_DIR)))
ifneq ($(DEPS_OK),done)
# deps or validate printed the problem above: nothing runs, and make exits 2 (a user mistake) with one line of its own
$(error stopped by the message above; nothing ran)
endif
endif
# (make may have looked for it before deps wrote it, and would then hold it missing without a rule)
$(STAMPS)/deps.mk: ;
else ifneq ($(STAGE_RUN),)
$(STAMPS)/deps.mk: $(STAMPS)/scope.mk ;
$(STAMPS)/scope.mk: $(DEPS_INPUTS) $(if $(wildcard $(STAMPS)/deps.mk),,FORCE)
	@$(call deps_into,$(@D))
endif

# Overrides change results: a change of ARGS makes every stage of this recipe stale. Not those that change
# nothing a stage produces: a resume (exact: the same weights as the uninterrupted run), overwrite_output_dir,
# --dry-run. Counting them made the next plain `make eval` after troubleshooting's
# `make train ARGS='resume_from_checkpoint=latest'` (or after `ARGS=--dry-run`) retrain the whole run from scratch.
RESULT_ARGS := $(filter-out --dry-run resume_from_checkpoint=% overwrite_output_dir=%,$(ARGS))
# Written by make itself ($(file)), not echoed through the shell: a quote inside ARGS broke that line. Compared when
# the Makefile is read, so that the file is written (and its stages stale) only when they differ, and a dry run,
# which expands the recipes it would run, writes nothing. (deps, run above, has made
# $(@D) before this recipe runs.)
ifneq ($(file <$(STAMPS)/args),$(RESULT_ARGS))
$(STAMPS)/args: FORCE
endif
$(STAMPS)/args:
	$(if $(DRY_RUN),,$(file >$@,$(RESULT_ARGS)))@touch $@

# Every upstream (recipe:goal) is made by a sub-make of its goal first; its stamp is a prerequisite of this recipe's
# train (and export), so a re-run upstream makes this recipe stale, and an up-to-date one leaves it alone.
# ARGS= : the overrides are this recipe's (make hands command-line variables to sub-makes: without it a
# `max_steps=40` meant for this recipe retrained the upstream too, and a dpo key stopped the chain at its sft recipe).
# A deps.mk written before UPSTREAMS existed names one upstream (UPSTREAM, UPSTREAM_GOAL).
UPSTREAMS ?= $(if $(UPSTREAM),$(UPSTREAM):$(UPSTREAM_GOAL))
upstream_recipe = $(word 1,$(subst :, ,$(1)))
upstream_goal = $(word 2,$(subst :, ,$(1)))
upstream_stamp = $(call stamps_of,$(call upstream_recipe,$(1)))/$(call upstream_goal,$(1))
# A run's checkpoint-<step> used as it is (no upstream: deps' CHECKPOINT_FILES) counts by its files, which a run
# trained again replaces: what starts from it is stale then (a file gone since deps listed it is left out).
UPSTREAM_STAMPS := $(foreach u,$(UPSTREAMS),$(call upstream_stamp,$(u))) $(wildcard $(CHECKPOINT_FILES))
# AS_UPSTREAM: an upstream made already says nothing. Its goal had no recipe, so GNU make said "make[1]: Nothing to be
# done for 'train'." just before this recipe's own training began (a newcomer read it as this recipe's train); a goal
# with a recipe (the no-op below) is never "nothing to be done". A make typed by the user keeps make's own line, and so
# does `make -n` (which would print the no-op as a line ":"; there the line says the upstream would not run).
define upstream_rule
$(call upstream_stamp,$(1)): FORCE
	@$$(MAKE) --no-print-directory $(call upstream_goal,$(1)) RECIPE=$(call upstream_recipe,$(1)) ARGS= AS_UPSTREAM=1 \
		NPROC=$$(NPROC) HOSTFILE=$$(HOSTFILE) NNODES=$$(NNODES) NODE_RANK=$$(NODE_RANK) MASTER_ADDR=$$(MASTER_ADDR) \
		MASTER_PORT=$$(MASTER_PORT)
endef
$(foreach u,$(UPSTREAMS),$(eval $(call upstream_rule,$(u))))
ifneq ($(and $(AS_UPSTREAM),$(if $(DRY_RUN),,y)),)
train merge export: ; @:
endif

# build says the recipe's notices only where no later stage of this make does (pipeline.recipe.notices.BEFORE_VALIDATE)
$(STAMPS)/data: export PIPELINE_BEFORE_VALIDATE := $(if $(filter-out data,$(MAKECMDGOALS)),1)
$(STAMPS)/data: $(DEPS_MK) $(STAMPS)/args $(RECIPE_FILES) $(DATA_FILES) \
		$(wildcard $(DATASET_DIR)/dataset_info.json $(DATASET_DIR)/raw/*)
	$(PY) -m pipeline build $(RECIPE) $(PREP_ARGS)
	@touch $@

# A benchmark recipe (task:) has no data to build: validate checks the recipe and its task folder's files.
# The stamp takes validate's start time (touch -r): what changed while validate ran is newer than it, for make and
# for train's notices (pipeline.recipe.notices.after_validate: a model an upstream wrote under `make -j` meanwhile).
$(STAMPS)/validate: $(if $(BENCHMARK),$(DEPS_MK) $(STAMPS)/args $(RECIPE_FILES) $(BENCHMARK_FILES),$(STAMPS)/data)
	@touch $@.start
	$(PY) -m pipeline validate $(RECIPE) $(PREP_ARGS)
	@touch -r $@.start $@ && rm -f $@.start

# A stale *finished* run (all_results.json) of this recipe (resolved.yaml names it) is retrained from scratch
# (--retrain-finished: the trainer decides, in Python, not with GNU realpath); an interrupted one, or another
# recipe's run in the same output_dir (a recipe that extends one and inherits its output_dir), is not wiped:
# the trainer then asks for resume_from_checkpoint=latest, overwrite_output_dir=true or another output_dir.
# ARGS=--dry-run always runs (a dry run of a finished recipe too) and never marks train done.
# validate, which train follows, said the recipe's notices when the recipe or ARGS last changed: train says only its
# own (the warmup's, dataloader_num_workers'), so that `make all` says each once (pipeline.recipe.notices.AFTER_VALIDATE;
# the stamp tells train whether validate ran before the model it names was written, by an upstream or a download).
# So does eval of a do_train: false recipe (NO_TRAIN), which follows validate with no train between.
$(STAMPS)/train dry-run: export PIPELINE_AFTER_VALIDATE := $(STAMPS)/validate
$(STAMPS)/eval: export PIPELINE_AFTER_VALIDATE := $(if $(NO_TRAIN),$(STAMPS)/validate)
$(STAMPS)/train: $(STAMPS)/validate $(UPSTREAM_STAMPS) $(if $(TRAIN_DRY_RUN),FORCE)
	$(LAUNCH) train $(RECIPE) --retrain-finished $(ARGS)
	@$(if $(TRAIN_DRY_RUN),true,touch $@)

$(STAMPS)/merge: $(STAMPS)/train
	$(PY) -m pipeline merge $(RECIPE) $(ARGS)
	@touch $@

# A benchmark recipe (task: mmlu_test, LLaMA-Factory's eval recipe) trains nothing: eval runs the benchmark on its
# model and adapter, made first where an upstream recipe writes them; the task folder's files are inputs.
# (A deps.mk older than BENCHMARK leaves it undefined: the held-out evaluation's chain, as before.)
# A recipe with do_train: false (LLaMA-Factory's extras/nlg_eval predict recipe: a model and an adapter, such as a
# run's checkpoint-N, on held-out rows) trains nothing either: eval follows validate (and the upstreams), without the
# train stage, which would only evaluate too, and merge, which would write a merged copy of the model nobody asked for.
$(STAMPS)/eval: $(if $(BENCHMARK),$(DEPS_MK) $(STAMPS)/args $(RECIPE_FILES) $(BENCHMARK_FILES) $(UPSTREAM_STAMPS),\
		$(if $(NO_TRAIN),$(STAMPS)/validate $(UPSTREAM_STAMPS),$(STAMPS)/merge))
	$(LAUNCH) eval $(RECIPE) $(ARGS)
	@touch $@

# A LLaMA-Factory merge recipe trains nothing: its adapter (or model) is an upstream's output, made first. Without
# an export_dir, export refuses the recipe: it does so before the upstreams are made, not after training them.
# (A deps.mk older than EXPORT_DIR leaves it undefined: the upstreams are made, as before.)
EXPORT_DIR ?= unknown
$(STAMPS)/export: $(DEPS_MK) $(STAMPS)/args $(RECIPE_FILES) $(if $(EXPORT_DIR),$(UPSTREAM_STAMPS))
	$(PY) -m pipeline export $(RECIPE) $(ARGS)
	@touch $@

data: $(STAMPS)/data ## build the recipe's datasets into Alpaca-format JSON (+ manifest)
validate: $(STAMPS)/validate ## check the recipe and the built data; prints a report
inspect: $(STAMPS)/data ## show samples with trainable tokens marked and the length histogram (NUM=N samples)
	$(PY) -m pipeline inspect $(RECIPE) $(ARGS) $(if $(NUM),--num $(NUM))
# Ranks: NPROC per node, on NNODES nodes or on every host of HOSTFILE (DeepSpeed gives each host --num_gpus ranks);
# without counting the hostfile, plan showed one node's numbers for a multi-node job. The count is made by make (the
# line make echoes is `WORLD_SIZE=1 .venv/bin/python -m pipeline plan ...`): echoed as shell arithmetic, it was the
# first line `make plan` showed a newcomer, `WORLD_SIZE=$(( 1 * 1 )) \`, a line split in two.
PLAN_WORLD_SIZE = $(shell echo $$(( $(NPROC) * $(if $(HOSTFILE),$$(grep -cvE '^[[:space:]]*(\#|$$)' '$(HOSTFILE)' \
	2>/dev/null || echo 0),$(NNODES)) )))
plan: $(DEPS_MK) ## resolved recipe with provenance, derived steps, DeepSpeed JSON, memory estimate
	@$(if $(HOSTFILE),test -f '$(HOSTFILE)' || { echo "error: HOSTFILE=$(HOSTFILE): no such file" >&2; exit 2; })
	WORLD_SIZE=$(PLAN_WORLD_SIZE) $(if $(PLAN_LAUNCH),$(PLAN_LAUNCH) )$(PY) -m pipeline plan $(RECIPE) $(ARGS)
train: $(STAMPS)/train ## train (NPROC=N ranks; HOSTFILE=... or NNODES/NODE_RANK/MASTER_ADDR for several nodes)
dry-run: $(STAMPS)/validate ## one training step + checkpoint into a temp folder: step time, memory; output_dir untouched
	$(LAUNCH) train $(RECIPE) --dry-run $(ARGS)
merge: $(STAMPS)/merge ## fold the adapter into the base, verify, export the Hugging Face layout of its family
eval: $(STAMPS)/eval ## held-out metrics for base vs tuned, and the report
# The report's path, last (eval was up to date or not); the eval run for it leaves the path out of its own summary line
# (pipeline.evaluate.run.REPORT_BY_MAKE), which named it just before make did.
all: export PIPELINE_REPORT_BY_MAKE := 1
all: $(STAMPS)/eval ## data -> validate -> train -> merge -> eval (only stale stages)
	@$(if $(BENCHMARK),true,echo "report: $(OUTPUT_DIR)/eval/report.md")
export: $(STAMPS)/export ## LLaMA-Factory merge recipe: adapter_name_or_path folded into the base, written to export_dir
# The prompt reaches the shell as the environment variable make exports for a command-line PROMPT, never pasted into
# the command: pasted in quotes, a prompt with an apostrophe ("What's ...") was a shell syntax error.
chat: $(VENV)/.setup-done ## talk to the tuned model (ARGS for overrides; PROMPT='...' for one answer)
	$(PY) -m pipeline generate $(RECIPE) $(ARGS) $(if $(PROMPT),--prompt "$$PROMPT")

# ---------------------------------------------------------------- quality
# The suite in two tiers (pyproject.toml's markers): `make test` leaves out the long trials (marked slow: kill and
# resume, several ranks, whole make chains, the second and later variants of a matrix), `make test-slow` runs only
# them, `make test-all` both in one run; CI (.ci/run) runs test, then test-slow. Their measured times on 2 cores are in
# README ("Working on the code"), the one place they are kept up to date.
# TEST_WORKERS=2: two pytest-xdist workers, one test file at a time each (module fixtures stay shared within a file);
# the longest files are handed out first (tests/file_times.py), so no long file ends the run alone, and each worker
# computes on one core's share (tests/conftest.py: OMP_NUM_THREADS). PYTEST_ARGS come last: a -m there wins.
PYTEST_RUN = $(PY) -m pytest $(if $(filter-out 0 1,$(TEST_WORKERS)),-n $(TEST_WORKERS) --dist loadfile \
	--no-loadscope-reorder)
test: $(VENV)/.test-deps-done ## run the test suite without the long trials (test-slow; test-all for both)
	$(PYTEST_RUN) -m "not slow" $(TESTS) $(PYTEST_ARGS)
test-slow: $(VENV)/.test-deps-done ## run only the long trials (marked slow)
	$(PYTEST_RUN) -m slow $(TESTS) $(PYTEST_ARGS)
test-all: $(VENV)/.test-deps-done ## run every test, the long trials too
	$(PYTEST_RUN) $(TESTS) $(PYTEST_ARGS)

bench: $(VENV)/.test-deps-done ## benchmarks against the peers (see bench/README.md)
	$(PIP) install -q -r bench/requirements.txt
	$(PY) -m bench.run

clean: ## remove generated data, stamps and outputs (keeps .venv)
	rm -rf .stamps saves datasets/build

FORCE:
