"""Typed argument groups: a stage's run() turns the resolved recipe into these, library code takes them.

As LitGPT's args.py feeds a typed setup(), a group gathers the keys one concern reads, with their types,
so that functions below a stage take explicit values instead of the whole string-keyed recipe. The schema
stays the single source of keys and defaults: `from_recipe` fills a key a plain mapping leaves out
(unit tests pass partial dicts) from the schema's default, never from a default written here.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, NamedTuple

from pipeline.data.args import NOT_A_KEY, DataArgs
from pipeline.names import DPO_LOSS_KEYS
from pipeline.recipe import spec
from pipeline.recipe.check import DERIVED_KEYS
from pipeline.recipe.steps import batches_per_step
from pipeline.recipe.typed import typed_overrides

if TYPE_CHECKING:  # the model layer imports torch: validate and plan (which use data_args) must not
    from pipeline.model.build import FinetuneArgs, ModelArgs
    from pipeline.model.preference import KtoConfig, PrefConfig


def _value(r: Mapping[str, Any], key: str) -> Any:
    value = r.get(key)
    return spec.defaults().get(key) if value is None else value


@dataclass(frozen=True)
class GenerationArgs:
    """The recipe's decoding keys (schema group "generation") and the seed: used by chat, eval and merge."""

    max_new_tokens: int
    do_sample: bool
    temperature: float
    top_k: int
    top_p: float
    repetition_penalty: float
    num_beams: int
    length_penalty: float
    early_stopping: bool | str
    skip_special_tokens: bool
    stop_strings: tuple[str, ...]
    seed: int

    @classmethod
    def from_recipe(cls, r: Mapping[str, Any]) -> "GenerationArgs":
        stops = _value(r, "stop_strings") or []
        return cls(max_new_tokens=int(_value(r, "max_new_tokens")), do_sample=bool(_value(r, "do_sample")),
                   temperature=float(_value(r, "temperature")), top_k=int(_value(r, "top_k")),
                   top_p=float(_value(r, "top_p")),
                   repetition_penalty=float(_value(r, "repetition_penalty")), num_beams=int(_value(r, "num_beams")),
                   length_penalty=float(_value(r, "length_penalty")), early_stopping=_value(r, "early_stopping"),
                   skip_special_tokens=bool(_value(r, "skip_special_tokens")), stop_strings=tuple(dict.fromkeys(stops)),
                   seed=int(_value(r, "seed")))

    def generate_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of pipeline.model.generate.generate / generate_text."""
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "temperature": self.temperature,
                "top_k": self.top_k, "top_p": self.top_p, "repetition_penalty": self.repetition_penalty,
                "num_beams": self.num_beams, "length_penalty": self.length_penalty,
                "early_stopping": self.early_stopping, "stop_strings": list(self.stop_strings) or None,
                "seed": self.seed}

    def settings(self) -> dict[str, Any]:
        """What a report or generation_config.json records: the sampling keys only when sampling."""
        out: dict[str, Any] = {"do_sample": self.do_sample, "max_new_tokens": self.max_new_tokens}
        if self.do_sample:
            out.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p, seed=self.seed)
        if self.repetition_penalty != 1.0:
            out["repetition_penalty"] = self.repetition_penalty
        if self.num_beams > 1:
            out.update(num_beams=self.num_beams, length_penalty=self.length_penalty,
                       early_stopping=self.early_stopping)
        if not self.skip_special_tokens:
            out["skip_special_tokens"] = False
        if self.stop_strings:
            out["stop_strings"] = list(self.stop_strings)
        return out


def value(r: Mapping[str, Any], key: str) -> Any:
    """One recipe key, or the schema's default when the mapping lacks it (or holds null)."""
    return _value(r, key)


class RecipeModel(NamedTuple):
    """The model layer's view of a recipe: its base weights and overrides, and the fine-tuning type."""

    model: ModelArgs
    finetune: FinetuneArgs


@dataclass(frozen=True)
class TrainArgs:
    """What the training loop, its optimizer, schedule and checkpoints read: batch and step counts (the derived
    ones as resolve computed them), the optimizer and schedule, the logging / saving / evaluation cadence, the
    numeric guards and where checkpoints go."""

    stage: str
    seed: int
    output_dir: str
    per_device_train_batch_size: int
    gradient_accumulation_steps: int
    ppo_buffer_size: int  # stage ppo: a step draws this many accumulations (batches_per_step)
    total_train_batch_size: int | None
    steps_per_epoch: int | None
    total_steps: int | None
    num_warmup_steps: int | None
    learning_rate: float
    loraplus_lr_ratio: float | None  # LoRA+: B's learning rate is learning_rate x this (pipeline.train.optim)
    weight_decay: float
    adam_beta1: float
    adam_beta2: float
    adam_epsilon: float
    optim: str  # transformers' optimizer name: AdamW's, sgd, adagrad, rmsprop or adafactor (pipeline.train.optim)
    optim_args: str | None  # transformers' "momentum=0.9,nesterov=True" for sgd / adagrad / rmsprop
    use_muon: bool  # LLaMA-Factory's Muon + AdamW instead of torch's AdamW (pipeline.train.muon)
    use_galore: bool  # galore_torch's GaLoreAdamW as LLaMA-Factory builds it (pipeline.train.galore)
    galore_target: str
    galore_rank: int
    galore_update_interval: int
    galore_scale: float
    galore_proj_type: str
    use_apollo: bool  # apollo_torch's APOLLOAdamW as LLaMA-Factory builds it (pipeline.train.apollo)
    apollo_target: str
    apollo_rank: int
    apollo_update_interval: int
    apollo_scale: float
    apollo_proj: str
    apollo_proj_type: str
    apollo_scale_type: str
    apollo_layerwise: bool  # the random projections' first seeds: 1 for every parameter, as LF's per-parameter optimizers
    use_adam_mini: bool  # adam-mini's Adam_mini as LLaMA-Factory builds it (pipeline.train.adam_mini)
    use_badam: bool  # badam's BlockOptimizer (layer mode) as LLaMA-Factory builds it (pipeline.train.badam)
    badam_start_block: int | None
    badam_switch_mode: str
    badam_switch_interval: int
    badam_mode: str  # layer: BlockOptimizer; ratio: BlockOptimizerRatio (pipeline.train.badam.RatioAdam)
    badam_update_ratio: float
    badam_mask_mode: str
    lr_scheduler_type: str
    min_lr_ratio: float
    l1_lambda: float
    moe_aux_loss_coef: float | None  # sparse MoE models: the router's load-balancing loss (pipeline.model.moe)
    logging_strategy: str
    logging_steps: int
    save_strategy: str
    save_steps: int
    save_total_limit: int | None
    save_only_model: bool
    eval_strategy: str | None
    eval_steps: int | None
    do_eval: bool | None
    compute_accuracy: bool  # eval_accuracy beside eval_loss (pipeline.train.accuracy)
    label_smoothing_factor: float  # pt / sft: transformers' LabelSmoother loss (pipeline.model.head_loss)
    use_dft_loss: bool  # sft: LLaMA-Factory's DFT loss (pipeline.model.head_loss.TokenWeight)
    use_eaft_loss: bool  # sft: LLaMA-Factory's EAFT loss, weights (H / 3) ** eaft_alpha
    eaft_alpha: float
    nan_policy: str
    fp16: bool
    bf16: bool
    min_loss_scale: float

    @property
    def batches_per_step(self) -> int:
        """The micro-batches one step draws on a rank, by the recipe's one rule (pipeline.recipe.steps): the
        loop's BatchStream and the dry run's report read it here, so no caller can pass (or forget) another count."""
        return batches_per_step({"stage": self.stage, "gradient_accumulation_steps": self.gradient_accumulation_steps,
                                 "ppo_buffer_size": self.ppo_buffer_size})


@dataclass(frozen=True)
class EvalArgs:
    """What eval reads besides the data, model and decoding groups: which models, how many rows, the batch size and
    the precision of its forward passes."""

    stage: str
    eval_base: bool
    max_eval_samples: int | None
    per_device_eval_batch_size: int
    bf16: bool
    fp16: bool


@dataclass(frozen=True)
class BenchmarkArgs:
    """eval with `task`: LLaMA-Factory's multiple-choice benchmarks (its EvaluationArguments, the same names and
    defaults; seed is the recipe's one seed, 42 by default as there)."""

    task: str
    task_dir: str
    n_shot: int
    lang: str
    batch_size: int
    seed: int
    save_dir: str | None


@dataclass(frozen=True)
class PreferenceArgs:
    """stage dpo / kto: the preference loss and its coefficients, and the reference model (null: the starting model)."""

    pref_loss: str
    pref_beta: float
    pref_ftx: float
    dpo_label_smoothing: float
    simpo_gamma: float
    ref_model: str | None
    ref_model_adapters: str | None = None
    kto_chosen_weight: float = 1.0
    kto_rejected_weight: float = 1.0
    pref_bco_weight: float = 0.0
    ld_alpha: float | None = None

    def kto_config(self) -> KtoConfig:
        """stage kto's loss settings (pipeline.model.preference.kto_loss)."""
        from pipeline.model.preference import KtoConfig

        return KtoConfig(beta=float(self.pref_beta), desirable_weight=float(self.kto_chosen_weight),
                         undesirable_weight=float(self.kto_rejected_weight), ftx=float(self.pref_ftx))

    def loss_config(self) -> PrefConfig:
        """The model layer's loss settings (pipeline.model.preference.preference_loss)."""
        from pipeline.model.preference import PrefConfig

        return PrefConfig(loss=self.pref_loss, beta=float(self.pref_beta), ftx=float(self.pref_ftx),
                          label_smoothing=float(self.dpo_label_smoothing), gamma=float(self.simpo_gamma),
                          ld_alpha=None if self.ld_alpha is None else float(self.ld_alpha),
                          bco_weight=float(self.pref_bco_weight))


@dataclass(frozen=True)
class PPOArgs:
    """stage ppo: the reward model, LLaMA-Factory's RLHF keys (pipeline.train.ppo) and the decoding keys the policy
    generates its responses with (generation group)."""

    reward_model: str
    reward_model_type: str
    ppo_epochs: int
    ppo_target: float
    ppo_whiten_rewards: bool
    ppo_score_norm: bool


@dataclass(frozen=True)
class ExportArgs:
    """How merge and export write the Hugging Face model: where (export_dir, null: output_dir/merged), in which
    dtype, in shards of what size, merged on which device."""

    export_dir: str | None
    export_dtype: str
    export_size: float
    export_device: str


def from_recipe(cls: type, r: Mapping[str, Any]) -> Any:
    """Fill dataclass `cls` from the recipe's keys of the same names (schema defaults for keys a mapping lacks;
    a null the recipe states is kept: for these groups null means "keep the checkpoint's value"). A derived key
    (total_steps, ...) a plain mapping lacks is None: resolve computes it, the schema has no default for it."""
    fallback = spec.defaults()
    return cls(**{f.name: r[f.name] if f.name in r else None if f.name in DERIVED_KEYS else fallback[f.name]
                  for f in dataclasses.fields(cls) if not f.metadata.get(NOT_A_KEY)})


def eval_args(r: Mapping[str, Any]) -> EvalArgs:
    """Resolved recipe (or a plain dict in tests) -> EvalArgs for pipeline.evaluate."""
    return from_recipe(EvalArgs, r)


def benchmark_args(r: Mapping[str, Any]) -> BenchmarkArgs:
    """Resolved recipe (or a plain dict in tests) -> BenchmarkArgs for pipeline.evaluate.choice."""
    return from_recipe(BenchmarkArgs, r)


def preference_args(r: Mapping[str, Any]) -> PreferenceArgs:
    """Resolved recipe (or a plain dict in tests) -> PreferenceArgs for stage dpo's and kto's training and evaluation.

    Under stage kto, dpo's loss keys (names.DPO_LOSS_KEYS) are their defaults whatever the recipe inherits: set in
    the kto recipe itself they are refused (rules.preference.pref_keys_need_dpo), but through extends a dpo recipe's
    reference-free pref_loss (orpo) took kto's reference away."""
    pref = from_recipe(PreferenceArgs, r)
    if _value(r, "stage") != "kto":
        return pref
    return dataclasses.replace(pref, **{key: spec.defaults()[key] for key in DPO_LOSS_KEYS})


def ppo_args(r: Mapping[str, Any]) -> PPOArgs:
    """Resolved recipe (or a plain dict in tests) -> PPOArgs for stage ppo's training."""
    return from_recipe(PPOArgs, r)


def export_args(r: Mapping[str, Any]) -> ExportArgs:
    """Resolved recipe (or a plain dict in tests) -> ExportArgs for merge and export."""
    return from_recipe(ExportArgs, r)


def train_args(r: Mapping[str, Any]) -> TrainArgs:
    """Resolved recipe (or a plain dict in tests) -> TrainArgs for the loop, optimizer, schedule, checkpoints."""
    return from_recipe(TrainArgs, r)


def key_at(r: Mapping[str, Any], key: str) -> str:
    """`recipes/x.yaml:12: key` when the value came from a file, `command line override key=value: key` from the
    command line (the wording of every rule's message, Origin.cited), else `key`: how a message names a recipe key."""
    try:
        return r.origin(key).names(key)  # type: ignore[attr-defined]
    except (AttributeError, KeyError):  # a plain dict in tests, a key without provenance
        return key


def data_args(r: Mapping[str, Any]) -> DataArgs:
    """Resolved recipe (or a plain dict in tests) -> DataArgs for pipeline.data (datasets, build, tokens, batches);
    tokenizer_name_or_path is where the tokenizer comes from (pipeline.data.model_tokenizer.tokenizer_source)."""
    from pipeline.recipe.deps import tokenizer_source

    source = tokenizer_source(r)
    named = {key: key_at(r, key) for key in ("dataset", "eval_dataset")}  # the registry's messages name them
    recipe = getattr(r, "recipe_path", None)
    return dataclasses.replace(from_recipe(DataArgs, r), named=named, recipe=None if recipe is None else str(recipe),
                               overrides=typed_overrides(r),
                               tokenizer_name_or_path=None if source == r.get("model_name_or_path") else source)


def recipe_args(r: Mapping[str, Any]) -> RecipeModel:
    """Resolved recipe (or a plain dict in tests) -> (ModelArgs, FinetuneArgs) for pipeline.model.build."""
    from pipeline.model.build import FinetuneArgs, ModelArgs

    model, finetune = from_recipe(ModelArgs, r), from_recipe(FinetuneArgs, r)
    from pipeline.data.added_tokens import TokenNames

    if not TokenNames.of(r):
        return RecipeModel(model, finetune)
    data = data_args(r)  # the tokenizer the data is encoded with gives the new ids: the model's must be the same
    model = dataclasses.replace(model, tokenizer_name_or_path=data.tokenizer_name_or_path)
    return RecipeModel(model, dataclasses.replace(finetune, resize_vocab=finetune.resize_vocab or adds_tokens(data)))


def adds_tokens(data: DataArgs) -> bool:
    """Whether the recipe gives the tokenizer a token it did not have (add_tokens, new_special_tokens, ...:
    LLaMA-Factory then sets resize_vocab)."""
    from pipeline.data.model_tokenizer import recipe_tokenizer

    return bool(recipe_tokenizer(data).new_tokens)
