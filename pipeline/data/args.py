"""DataArgs: the recipe keys the data library reads, as one typed, frozen group.

A stage's command turns the resolved recipe into this group (pipeline.recipe.args.data_args) and the data
library (registry, build, checks, tokenization, loaders, inspect) takes it instead of the string-keyed
recipe, so a function's signature says what it depends on. The fields are schema keys, named as in the
schema (tests/recipe/test_args.py ties them): the schema stays the one source of their types, defaults and
documentation, and nothing here declares a default. Defined in the data layer, filled one layer up,
because the schema's defaults live in pipeline.recipe.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping, Sequence

LLAMAFACTORY_DATASET_DIR = "data"  # LLaMA-Factory's default dataset_dir, used when ours (datasets/) has no registry

if TYPE_CHECKING:
    from pipeline.data.templates import Template

NOT_A_KEY = "not_a_key"  # metadata marking a field that is no schema key (provenance for messages)

# Stages trained on chosen/rejected pairs: dpo (a policy) and rm (a reward model) build, check, tokenize and batch
# the same pairs (pipeline.data.pairs); the data library knows them as one form, "dpo". Stage kto's unpaired
# feedback rows (pipeline.data.feedback) are a form of their own, "kto".
PAIRWISE_STAGES = ("dpo", "rm")


ROW_FORMS = ("sft", "dpo", "kto")  # forms built as rows that training counts one by one (pt cuts text into windows)
# forms whose every row is two sequences scored in one forward: dpo's chosen and rejected (stages dpo and rm), kto's
# example and its KL sequence; both are tokenized as pairs (loaders.tokenized_pair_split) and batched by pair_loader
PAIRED_FORMS = ("dpo", "kto")


def data_form(stage: str) -> str:
    """The form of a stage's data: pt (text), sft (instructions; stage ppo reads their prompts), dpo (preference
    pairs, stages dpo and rm) or kto (rows with a kto_tag)."""
    return "dpo" if stage in PAIRWISE_STAGES else "sft" if stage == "ppo" else stage


@dataclass(frozen=True)
class DataArgs:
    """Where the data is, how it is built, tokenized and batched."""

    model_name_or_path: str  # whose tokenizer encodes the data, unless:
    # where the tokenizer comes from when not model_name_or_path's: the recipe's tokenizer_name_or_path, or for a
    # chained recipe whose model an upstream recipe has still to produce, the chain's root (data_args fills it)
    tokenizer_name_or_path: str | None
    stage: str
    dataset_dir: str
    dataset: str | Sequence[str] | None
    eval_dataset: str | Sequence[str] | None
    # how the training rows of several `dataset` are mixed (pipeline.data.mix): concat, or an interleave strategy
    mix_strategy: str
    interleave_probs: str | Sequence[float] | None
    template: str
    default_system: str | None  # LLaMA-Factory's key: replaces the template's default system prompt
    cutoff_len: int
    overlength_policy: str
    train_on_prompt: bool
    mask_history: bool
    enable_thinking: bool
    packing: bool
    neat_packing: bool
    pt_stride: int | None
    max_samples: int | None
    val_size: float  # or an int: a number of rows per dataset (pipeline.data.build.held_out)
    seed: int
    preprocessing_num_workers: int | None
    per_device_train_batch_size: int
    per_device_eval_batch_size: int
    group_by_length: bool
    disable_shuffling: bool
    dataloader_num_workers: int
    new_special_tokens: str | Sequence[str] | None  # added to the tokenizer (model_tokenizer.recipe_tokenizer)
    # the other keys that add tokens (pipeline.data.added_tokens)
    add_tokens: str | Sequence[str] | None = None
    add_special_tokens: str | Sequence[str] | None = None
    new_special_tokens_config: str | None = None
    split_special_tokens: bool = False  # every special token literal in user text (Tokenizer.split_special)
    # How a message names `dataset` / `eval_dataset` where they were set (recipe.args.key_at: "recipes/x.yaml:5:10:
    # dataset", "command line override eval_dataset=x: eval_dataset"), as every message names a recipe key.
    named: Mapping[str, str] = field(default_factory=dict, compare=False, metadata={NOT_A_KEY: True})
    # The recipe file as the user named it (None: a plain mapping, in tests) and the command line's key=value overrides
    # as typed, so that a message can give the command that fixes a missing or stale build as the user types it
    # (pipeline.data.load.make_data): without the overrides it rebuilds another dataset than the run reads
    recipe: str | None = field(default=None, compare=False, metadata={NOT_A_KEY: True})
    overrides: tuple[str, ...] = field(default=(), compare=False, metadata={NOT_A_KEY: True})

    @property
    def form(self) -> str:
        """data_form(stage): what the rows are (a dpo or rm recipe reads preference pairs)."""
        return data_form(self.stage)

    @property
    def paired(self) -> bool:
        """Whether each row is two sequences (PAIRED_FORMS): counted, batched and sampled as pairs."""
        return self.form in PAIRED_FORMS

    def chat_template(self) -> "Template":
        """The recipe's template, its default system prompt replaced when default_system is set: what every
        encoding of this recipe's rows and prompts uses (train, checks, eval, chat)."""
        from pipeline.data.templates import recipe_template

        return recipe_template(self.template, self.default_system)

    def names(self, key: str) -> str:
        """How a message names recipe key `key`: `recipes/x.yaml:5:10: dataset`, or the bare key when it is not known
        where it was set (DataArgs made without data_args)."""
        return self.named.get(key, key)


def rebuild(data: DataArgs | None = None, env: Sequence[str] = ()) -> str:
    """The command that rebuilds the data, the recipe named as the user named it and the run's command-line overrides
    (DataArgs.recipe / overrides; None: RECIPE, for messages that have no recipe at hand): a bare `make data` builds
    the Makefile's default recipe, not theirs, and one without the overrides (val_size=0.2) another dataset than the
    run reads. make hands ARGS to the build as it hands them to train. env: VAR=value settings the command needs
    (rerun.run_this: HF_HUB_OFFLINE=0 for a hub download)."""
    from pipeline.rerun import run_this

    recipe, overrides = (data.recipe, data.overrides) if data is not None else (None, ())
    return run_this("data", recipe, overrides, env=env)
