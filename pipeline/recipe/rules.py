"""Cross-field rules: each a small named function with its own message, run after the schema check.

A rule declares the keys it reads; it is skipped when one of them already failed the schema (so one
mistake gives one message), and `commands` limits it to the commands where it matters.
"""
from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from pipeline.data.args import ROW_FORMS, data_form
from pipeline.errors import did_you_mean
from pipeline.names import DPO_LOSS_KEYS, PREFERENCE_STAGES, REFERENCE_FREE, uses_reference
from pipeline.recipe import lr_kwargs, spec
from pipeline.recipe.check import show
from pipeline.recipe.load import Origin

LORA_KEYS = ("lora_rank", "lora_alpha", "lora_dropout", "lora_target", "use_rslora", "use_dora",
             "additional_target", "loraplus_lr_ratio")
_RUNS_HERE = ("train", "eval", "generate", "merge", "inspect", "validate", None)  # commands that run on this machine
# Commands checked against the built row counts. Not `build`, which replaces those counts (a user told to "add
# data" must be able to rebuild), nor `deps`, which only names files for make (and runs first in `make data`).
_READS_BUILT_DATA = ("validate", "inspect", "plan", "train", "merge", "export", "eval", "generate", "chat", None)


def _rebuilt_first(ctx: "Context") -> bool:
    """train and eval with overwrite_cache: true build first (pipeline.__main__.steps), so the counts on disk may be
    those of the build about to be replaced: they are checked when the recipe is resolved again after that build
    (`built`), before the model loads."""
    return bool(ctx.values["overwrite_cache"]) and ctx.command in ("train", "eval") and not ctx.built


def cuda_available() -> bool:
    """Whether this machine has an NVIDIA GPU, without importing torch (tests monkeypatch this)."""
    if os.environ.get("CUDA_VISIBLE_DEVICES", None) in ("", "-1"):
        return False
    return os.path.exists("/proc/driver/nvidia/version") or os.path.exists("/dev/nvidia0")


@dataclass
class Context:
    values: Mapping[str, Any]
    origins: Mapping[str, Origin]
    recipe_file: str
    command: str | None
    built: bool = False  # the build that overwrite_cache asks for has run (see _rebuilt_first)

    def where(self, key: str) -> str:
        """`file:line:col: key` when the user set it, else `recipe: key`."""
        origin = self.origins.get(key)
        if origin is not None and origin.kind in ("file", "cli"):
            return f"{origin.where}: {key}"
        return f"{self.recipe_file}: {key}"

    def set_here(self, key: str) -> bool:
        """Set in the recipe itself or on the command line (not inherited through extends)."""
        origin = self.origins[key]
        return origin.kind == "cli" or (origin.kind == "file" and origin.file == self.recipe_file)

    def sort_key(self, key: str) -> tuple:
        origin = self.origins.get(key)
        if origin is not None and origin.kind == "file":
            return (0, origin.file, origin.line, origin.column)
        return (1, "", 0, 0)


@dataclass(frozen=True)
class Rule:
    func: Callable[[Context], list[tuple[str, str]]]  # -> [(key the message is about, message)]
    keys: tuple[str, ...]
    commands: tuple[str | None, ...] | None


RULES: list[Rule] = []


def rule(*keys: str, commands: tuple[str | None, ...] | None = None):
    def register(func: Callable[[Context], list[tuple[str, str]]]):
        RULES.append(Rule(func, keys, commands))
        return func
    return register


def run(values: Mapping[str, Any], origins: Mapping[str, Origin], recipe_file: str, command: str | None,
        bad: set[str], built: bool = False) -> list[tuple[tuple, str]]:
    ctx = Context(values, origins, recipe_file, command, built)
    problems = []
    for r in RULES:
        if (r.commands is not None and command not in r.commands) or bad & set(r.keys):
            continue
        for key, message in r.func(ctx):
            problems.append((ctx.sort_key(key), f"{ctx.where(key)}: {message}"))
    return problems


# --- precision -------------------------------------------------------------------------------------

@rule("fp16", "bf16")
def fp16_and_bf16(ctx: Context) -> list[tuple[str, str]]:
    if ctx.values["fp16"] and ctx.values["bf16"]:
        key = "fp16" if ctx.sort_key("fp16") >= ctx.sort_key("bf16") else "bf16"
        return [(key, "fp16 and bf16 are both true; choose one (bf16 on Ampere or newer GPUs and on CPU, "
                      "fp16 on older GPUs)")]
    return []


@rule("fp16", commands=_RUNS_HERE)
def fp16_needs_cuda(ctx: Context) -> list[tuple[str, str]]:
    if ctx.values["fp16"] and not cuda_available():
        return [("fp16", "fp16 needs a CUDA GPU and this machine has none; use bf16 on CPU "
                         "(bf16: true, fp16: false) or neither for fp32")]
    return []


# --- method ----------------------------------------------------------------------------------------

@rule("finetuning_type", *LORA_KEYS)
def lora_keys_need_lora(ctx: Context) -> list[tuple[str, str]]:
    kind = ctx.values["finetuning_type"]
    if kind == "lora":
        return []
    return [(key, f"is a LoRA setting but finetuning_type is {kind}; remove it or set finetuning_type: lora")
            for key in LORA_KEYS if ctx.set_here(key)]


@rule("finetuning_type", "pissa_init", "use_dora", "adapter_name_or_path", "stage", "pref_loss", "ref_model")
def pissa_starts_a_lora(ctx: Context) -> list[tuple[str, str]]:
    """PiSSA starts a new LoRA from the base's singular vectors and trains on the residual base: it needs a LoRA to
    start (LLaMA-Factory and PEFT refuse the rest), and a dpo reference that is not the adapters-off (residual) model."""
    v = ctx.values
    if not v["pissa_init"]:
        return []
    if v["finetuning_type"] != "lora":
        why = f"finetuning_type is {v['finetuning_type']}; PiSSA initialises LoRA matrices: set finetuning_type: lora"
    elif v["use_dora"]:
        why = "use_dora is true; PEFT does not combine PiSSA with DoRA: choose one (remove pissa_init or use_dora)"
    elif v["adapter_name_or_path"]:
        why = (f"adapter_name_or_path is set ({v['adapter_name_or_path']}); an adapter you continue starts from its own"
               " values, so there is nothing for PiSSA to initialise: remove pissa_init or adapter_name_or_path")
    elif v["ref_model"] is None and uses_reference(v["stage"], v["pref_loss"]):
        loss = f"stage dpo's pref_loss {v['pref_loss']}" if v["stage"] == "dpo" else "stage kto's loss"
        why = (f"{loss} scores against the model with its adapter off, which under PiSSA is the residual base, not the"
               " model you started from (LLaMA-Factory refuses PiSSA with a reference model too): set ref_model to the "
               "base checkpoint" + (", use pref_loss orpo or simpo," if v["stage"] == "dpo" else "") +
               " or remove pissa_init")
    else:
        return []
    return [("pissa_init", f"is true but {why}")]


@rule("finetuning_type", "use_llama_pro")
def llama_pro_needs_freeze_or_lora(ctx: Context) -> list[tuple[str, str]]:
    """LLaMA Pro trains only the expanded blocks; full trains everything (LLaMA-Factory refuses it too)."""
    kind = ctx.values["finetuning_type"]
    if ctx.values["use_llama_pro"] and kind not in ("freeze", "lora"):
        return [("use_llama_pro", f"is true but finetuning_type is {kind}; LLaMA Pro trains only the blocks `python "
                                  "-m pipeline expand` inserted: set finetuning_type: freeze (or lora), or remove "
                                  "use_llama_pro")]
    return []


@rule("finetuning_type", "use_llama_pro", "lora_target", "pissa_init", "use_dora", "adapter_name_or_path",
      "model_name_or_path", "freeze_trainable_layers")
def llama_pro_lora_can_train(ctx: Context) -> list[tuple[str, str]]:
    """LoRA on LLaMA Pro's blocks moves only through their output projections: `expand` zeroes o_proj and down_proj
    (GPT-2's c_proj), so the block adds nothing to the residual and every LoRA before them gets a zero gradient until
    theirs move. Without them in lora_target, under PiSSA (the singular vectors of a zero weight: A = B = 0) or
    under DoRA (its magnitude divides by the zero weight's norm: NaN) nothing would train; LLaMA-Factory and PEFT
    run such a recipe all the same (grad_norm 0, or a NaN loss), so it is refused here, saying why."""
    v = ctx.values
    if not (v["use_llama_pro"] and v["finetuning_type"] == "lora") or v["adapter_name_or_path"]:
        return []
    zeroed = "the expanded blocks' o_proj and down_proj (GPT-2's c_proj) are zero, as `python -m pipeline expand` " \
             "writes them"
    if v["pissa_init"]:
        return [("pissa_init", f"is true with use_llama_pro, but {zeroed}: PiSSA starts their LoRA from the singular "
                               "vectors of a zero weight (A = B = 0), and no LoRA in those blocks would ever get a "
                               "gradient; remove pissa_init")]
    if v["use_dora"]:
        return [("use_dora", f"is true with use_llama_pro, but {zeroed}: DoRA divides by each weight's norm, so with "
                             "them the loss is NaN from the first step (PEFT's too), and without them nothing "
                             "trains; remove use_dora")]
    from pipeline.errors import UserError
    from pipeline.model.config import llama_pro_blocks, lora_target_modules
    from pipeline.model.expand import ZEROED
    from pipeline.recipe.modelinfo import model_info

    info = model_info(v["model_name_or_path"])
    if info is None:
        return []
    try:
        names = [m.name for m in lora_target_modules(info.config, v["lora_target"],
                                                     llama_pro_blocks(info.n_layer, v["freeze_trainable_layers"]))]
    except UserError:  # an unknown target, a count that does not divide the blocks: their own rules say so
        return []
    if names and not any(name.endswith(ZEROED) for name in names):
        return [("lora_target", f"given {v['lora_target']!r}, which leaves out the output projections, but {zeroed}: the blocks "
                                "add nothing to the residual until those move, so LoRA on the other modules gets no "
                                "gradient and nothing trains; add o_proj and down_proj (GPT-2: c_proj), or use all")]
    return []


def counts_blocks(values: Mapping[str, Any]) -> bool:
    """Whether freeze_trainable_layers means something: under freeze, and under lora with use_llama_pro (the number
    of expanded blocks, as LLaMA-Factory reads it there)."""
    kind = values["finetuning_type"]
    return kind == "freeze" or (kind == "lora" and bool(values["use_llama_pro"]))


@rule("finetuning_type", "freeze_trainable_layers", "use_llama_pro")
def freeze_key_needs_freeze(ctx: Context) -> list[tuple[str, str]]:
    kind = ctx.values["finetuning_type"]
    if not counts_blocks(ctx.values) and ctx.set_here("freeze_trainable_layers"):
        return [("freeze_trainable_layers", f"only applies to finetuning_type: freeze (or lora with use_llama_pro), "
                                            f"but finetuning_type is {kind}; remove it or set finetuning_type: "
                                            "freeze")]
    return []


@rule("finetuning_type", "freeze_trainable_layers", "model_name_or_path", "use_llama_pro")
def freeze_layers_within_model(ctx: Context) -> list[tuple[str, str]]:
    if not counts_blocks(ctx.values):
        return []
    from pipeline.recipe.modelinfo import model_info

    model = ctx.values["model_name_or_path"]
    info = model_info(model)
    n = ctx.values["freeze_trainable_layers"]
    if info is None:
        return []
    if ctx.values["use_llama_pro"]:
        from pipeline.model.config import llama_pro_problem

        problem = llama_pro_problem(info.n_layer, n)
        return [("freeze_trainable_layers", f"{problem}; with use_llama_pro it is the --num-expand that `python -m "
                                            f"pipeline expand` added to {model} (is it the expanded checkpoint?)")
                ] if problem else []
    if n > info.n_layer:
        return [("freeze_trainable_layers", f"given {n}, expected at most {info.n_layer} (the number of "
                                            f"transformer blocks of {model})")]
    return []


FREEZE_MODULE_KEYS = ("freeze_trainable_modules", "freeze_extra_modules")


def _freeze_modules_given(values: Mapping[str, Any]) -> list[str]:
    """The freeze module keys set to something else than their defaults (all / null)."""
    return [key for key, default in zip(FREEZE_MODULE_KEYS, ("all", None)) if values[key] != default]


@rule("finetuning_type", *FREEZE_MODULE_KEYS)
def freeze_modules_need_freeze(ctx: Context) -> list[tuple[str, str]]:
    """LLaMA-Factory reads these keys under freeze only; elsewhere a value would silently mean nothing."""
    kind = ctx.values["finetuning_type"]
    if kind == "freeze":
        return []
    return [(key, f"given {show(ctx.values[key])}, but it only applies to finetuning_type: freeze (here {kind}); "
                  "remove it" + (" (lora: lora_target / additional_target pick modules)" if kind == "lora" else ""))
            for key in _freeze_modules_given(ctx.values)]


@rule("finetuning_type", "model_name_or_path", "stage", *FREEZE_MODULE_KEYS)
def freeze_modules_in_model(ctx: Context) -> list[tuple[str, str]]:
    """Each name must be one of the model's modules, as LLaMA-Factory's ValueError demands: checked here, before
    the model loads, with the valid names listed (in transformers' names for the checkpoint's family)."""
    if ctx.values["finetuning_type"] != "freeze" or not _freeze_modules_given(ctx.values):
        return []
    from pipeline.model.config import freeze_module_problems
    from pipeline.recipe.modelinfo import model_info

    info = model_info(ctx.values["model_name_or_path"])
    if info is None:
        return []
    cfg = info.config.replace(num_labels=1) if ctx.values["stage"] == "rm" else info.config
    return freeze_module_problems(cfg, *(ctx.values[key] for key in FREEZE_MODULE_KEYS))


@rule("model_name_or_path")
def model_exists(ctx: Context) -> list[tuple[str, str]]:
    """A bare name must be a preset; a missing path may be produced by an upstream recipe, so it is an error
    only for the commands that load the model now."""
    from pipeline.recipe.modelinfo import looks_like_path

    name = ctx.values["model_name_or_path"]
    try:
        from pipeline.model.config import read_config
    except ImportError:
        return []
    from pipeline.errors import UserError
    from pipeline.model.hub import is_hub_id, resolve_model_path

    if is_hub_id(name):  # fetched (or found in the HF cache) by the commands that load the model now
        if ctx.command in ("train", "merge", "eval", "generate"):
            try:
                name = str(resolve_model_path(name))
            except UserError as err:
                return [("model_name_or_path", m.removeprefix("model_name_or_path: ")) for m in err.messages]
        else:
            return []
    if looks_like_path(name) and not os.path.exists(name):
        if ctx.command in ("train", "merge", "eval", "generate"):
            return [("model_name_or_path", f"directory {name!r} not found; if another recipe produces it, "
                                           "run that one first")]
        return []
    try:
        read_config(name)
    except UserError as err:
        return [("model_name_or_path", m.removeprefix("model_name_or_path: ")) for m in err.messages]
    return []


@rule("cutoff_len", "context_length", "model_name_or_path")
def cutoff_within_context(ctx: Context) -> list[tuple[str, str]]:
    context = ctx.values["context_length"]
    if context is None:
        from pipeline.recipe.modelinfo import model_info

        info = model_info(ctx.values["model_name_or_path"])
        context = info.context_length if info else None
    if context is not None and ctx.values["cutoff_len"] > context:
        return [("cutoff_len", f"given {ctx.values['cutoff_len']}, expected at most {context} (the model's "
                               "context length); lower cutoff_len or raise context_length")]
    return []


@rule("rope_scaling", "context_length", "cutoff_len", "model_name_or_path")
def rope_scaling_applies(ctx: Context) -> list[tuple[str, str]]:
    """rope_scaling sets the context length itself (window x factor), so an explicit one contradicts it; dynamic
    NTK and a model without rotary positions are refused with the reason (pipeline.model.rope_recipe)."""
    kind = ctx.values["rope_scaling"]
    if kind is None:
        return []
    if ctx.origins["context_length"].kind in ("file", "cli"):
        where = ctx.origins["context_length"].where
        return [("rope_scaling", f"given {kind!r} together with context_length {ctx.values['context_length']} (at "
                                 f"{where}): rope_scaling derives the context length from cutoff_len (window x "
                                 "ceil(cutoff_len / window)); remove context_length, or rope_scaling")]
    from pipeline.errors import UserError
    from pipeline.model.rope_recipe import recipe_rope
    from pipeline.recipe.modelinfo import model_info

    info = model_info(ctx.values["model_name_or_path"])
    try:
        recipe_rope(info.config, kind, ctx.values["cutoff_len"]) if info else None
    except UserError as err:
        return [("rope_scaling", m.removeprefix("rope_scaling: ")) for m in err.messages]
    return []


# Keys that mean something in some stages only, and why each other stage cannot honour them: set there, they
# would be ignored without a word (LLaMA-Factory refuses train_on_prompt and mask_history outside sft too).
STAGE_ONLY: dict[str, dict[str, str]] = {
    "neat_packing": {"pt": "pt always concatenates documents into windows of cutoff_len, see "
                           "docs/packing-and-scale.md",
                     "dpo": "a dpo row is a chosen/rejected pair, never packed",
                     "kto": "a kto row is scored with its own KL sequence, never packed",
                     "rm": "an rm row is a chosen/rejected pair, never packed"},
    "packing": {"dpo": "a dpo row is a chosen/rejected pair, never packed",
                "kto": "a kto row is scored with its own KL sequence, never packed",
                "rm": "an rm row is a chosen/rejected pair, never packed"},
    "train_on_prompt": {"pt": "pt has no prompt: every token is trained",
                        "dpo": "dpo scores the responses only; the prompt is never part of the loss",
                        "kto": "kto scores the responses only; the prompt is never part of the loss",
                        "rm": "rm scores each whole sequence at its last token; no token is a label"},
    "mask_history": {"pt": "pt has no conversation turns",
                     "dpo": "dpo always scores the last response only, the history being the prompt",
                     "kto": "kto always scores the last response only, the history being the prompt",
                     "rm": "rm scores each whole sequence at its last token; no token is a label"},
    # LLaMA-Factory wires its ComputeAccuracy into the sft workflow only, and ignores the key elsewhere
    "compute_accuracy": {"pt": "token accuracy is computed for stage sft only, as in LLaMA-Factory; pt's evaluation "
                               "reports eval_loss and eval_perplexity",
                         "dpo": "token accuracy is computed for stage sft only, as in LLaMA-Factory; dpo's evaluation "
                                "reports eval_rewards/accuracies, how often the chosen response out-scores the "
                                "rejected one",
                         "kto": "token accuracy is computed for stage sft only, as in LLaMA-Factory; kto's evaluation "
                                "reports eval_loss, eval_rewards/chosen, eval_rewards/rejected and eval_kl",
                         "rm": "stage rm always reports eval_accuracy, how often the chosen response out-scores "
                               "the rejected one (LLaMA-Factory's ComputeAccuracy); the key is for sft's token "
                               "accuracy"},
    # LLaMA-Factory hands it to transformers' Trainer, whose DPO / KTO / pairwise losses never read it
    "label_smoothing_factor": {"dpo": "LLaMA-Factory's dpo ignores it too; use dpo_label_smoothing, dpo's own "
                                      "label smoothing (conservative DPO, pref_loss: sigmoid)",
                               "kto": "LLaMA-Factory's kto ignores it too; KTO's loss has no label smoothing",
                               "rm": "LLaMA-Factory's rm ignores it too; the pairwise loss has no label smoothing"},
    # LLaMA-Factory installs them as compute_loss_func in its sft trainer only (train/sft/trainer.py)
    "use_dft_loss": {stage: "LLaMA-Factory's DFT loss is an sft loss: its other trainers ignore the key"
                     for stage in ("pt", "dpo", "kto", "rm")},
    "use_eaft_loss": {stage: "LLaMA-Factory's EAFT loss is an sft loss: its other trainers ignore the key"
                      for stage in ("pt", "dpo", "kto", "rm")},
}


@rule(*STAGE_ONLY, "stage")
def stage_only_keys(ctx: Context) -> list[tuple[str, str]]:
    stage = ctx.values["stage"]
    return [(key, f"given {json.dumps(ctx.values[key])}, but it has no meaning for stage: {stage} ({why[stage]}); "
                  "remove it")
            for key, why in STAGE_ONLY.items() if ctx.values[key] and stage in why]


@rule("model_name_or_path", "finetuning_type", "lora_target", "additional_target", "context_length")
def lora_targets_exist(ctx: Context) -> list[tuple[str, str]]:
    if ctx.values["finetuning_type"] != "lora":
        return []
    from pipeline.recipe.modelinfo import model_info

    info = model_info(ctx.values["model_name_or_path"])
    if info is None:
        return []
    from pipeline.errors import UserError
    from pipeline.model.config import additional_target_modules, lora_target_modules

    problems = []
    for key, check in (("lora_target", lora_target_modules), ("additional_target", additional_target_modules)):
        try:
            check(info.config, ctx.values[key])
        except UserError as err:
            problems += [(key, m.removeprefix(f"{key}: ")) for m in err.messages]
    return problems


@rule("template", "model_name_or_path", "stage", "add_tokens", "add_special_tokens", "new_special_tokens",
      "new_special_tokens_config", commands=("train", "eval", "generate", "inspect", "validate", None))
def template_fits_vocabulary(ctx: Context) -> list[tuple[str, str]]:
    """The template's markup tokens are in the model's vocabulary (chatml's <|im_start|> is not in GPT-2's) once
    the recipe's tokens are added (add_special_tokens: "<|im_start|>,<|im_end|>" gives a base model ChatML's).
    Checked here when the model is already on disk; otherwise when the data is tokenized."""
    if ctx.values["stage"] == "pt" or not ctx.values.get("template"):
        return []
    from pipeline.data.templates import get_template
    from pipeline.data.model_tokenizer import is_gpt2_preset, load_tokenizer, with_new_tokens
    from pipeline.errors import UserError

    key = "tokenizer_name_or_path" if ctx.values.get("tokenizer_name_or_path") else "model_name_or_path"
    name = str(ctx.values[key])
    if not (is_gpt2_preset(name) or os.path.isdir(name)):
        return []
    try:
        tokenizer = with_new_tokens(load_tokenizer(name, key), ctx.values)
        problem = get_template(ctx.values["template"]).vocabulary_problem(tokenizer)
    except UserError:  # an unreadable tokenizer, model or token file is reported by the command itself
        return []
    return [("template", problem)] if problem else []


@rule("add_tokens", "add_special_tokens", "new_special_tokens")
def new_token_names_given(ctx: Context) -> list[tuple[str, str]]:
    """Every name in add_tokens / add_special_tokens / new_special_tokens is a token: an empty one
    ("<think>,,</think>", a trailing comma) would add the empty string, which transformers refuses mid-run; said up
    front instead."""
    from pipeline.data.tokenizer import new_token_names

    return [(key, f"given {value!r}, which holds an empty token name; expected token names separated by commas "
                  "(\"<think>,</think>\") or a list of them; remove the extra comma or empty entry")
            for key in ("add_tokens", "add_special_tokens", "new_special_tokens")
            if "" in new_token_names(value := ctx.values.get(key))]


@rule("add_special_tokens", "new_special_tokens")
def one_special_tokens_key(ctx: Context) -> list[tuple[str, str]]:
    """add_special_tokens (LLaMA-Factory 0.9.3+) and new_special_tokens (its name up to 0.9.2) are one key: given
    both, which list to add would be a guess."""
    from pipeline.data.added_tokens import SPECIAL_KEYS

    if any(ctx.values.get(key) is None for key in SPECIAL_KEYS):
        return []
    later = max(SPECIAL_KEYS, key=ctx.sort_key)
    other = next(key for key in SPECIAL_KEYS if key != later)
    return [(later, f"given {ctx.values[later]!r} beside {other} ({ctx.values[other]!r}, {ctx.where(other)}): one key "
                    "under two names (new_special_tokens is LLaMA-Factory's name up to 0.9.2, add_special_tokens "
                    "from 0.9.3); keep one")]


@rule("new_special_tokens_config")
def token_config_readable(ctx: Context) -> list[tuple[str, str]]:
    """new_special_tokens_config is a readable YAML file of token: description lines (pipeline.data.added_tokens
    reads it again wherever the tokens are added)."""
    from pipeline.data.added_tokens import read_descriptions
    from pipeline.errors import UserError

    path = ctx.values.get("new_special_tokens_config")
    if path is None:
        return []
    try:
        read_descriptions(path)
    except UserError as err:
        return [("new_special_tokens_config", message) for message in err.messages]
    return []


TOKENIZING = ("train", "eval", "generate", "inspect", "validate", "merge")  # the commands that need token ids


@rule("tokenizer_name_or_path", "model_name_or_path", commands=TOKENIZING)
def tokenizer_fits_model(ctx: Context) -> list[tuple[str, str]]:
    """A Llama / Qwen preset (shapes, no vocabulary) names its tokenizer: refused up front, before any data or
    model is loaded, with the key to add. A tokenizer taken from elsewhere (tokenizer_name_or_path) exists and
    its ids fit the model's embedding table; otherwise training would index past it. So do the tokenizer files
    of a model folder itself: copied from another download, they give the same IndexError mid-training."""
    from pipeline.data.model_tokenizer import is_gpt2_preset, load_tokenizer
    from pipeline.errors import UserError
    from pipeline.model.config import PRESETS

    name, key = ctx.values.get("tokenizer_name_or_path"), "tokenizer_name_or_path"
    if not name:
        model = str(ctx.values["model_name_or_path"])
        if model in PRESETS and not is_gpt2_preset(model):
            try:
                load_tokenizer(model)
            except UserError as err:  # the one message that says what to add
                return [("model_name_or_path", m.removeprefix("model_name_or_path: ")) for m in err.messages]
        if model in PRESETS or not os.path.isdir(model):
            return []
        name, key = model, "model_name_or_path"
    from pipeline.model.hub import is_hub_id
    from pipeline.recipe.modelinfo import model_info

    if is_hub_id(name) and ctx.command not in ("train", "merge", "eval", "generate"):
        return []  # fetched (or found in the HF cache) by the commands that load the model
    try:
        tokenizer = load_tokenizer(name, key)
    except UserError as err:
        if key == "model_name_or_path":  # a folder without tokenizer files: the command that needs them says so
            return []
        return [(key, m.removeprefix(f"{key}: ")) for m in err.messages]
    model = ctx.values["model_name_or_path"]
    info = model_info(model)
    if info is not None and tokenizer.n_vocab > info.vocab_size:
        if key == "model_name_or_path":
            return [(key, f"its tokenizer files have {tokenizer.n_vocab:,} token ids, more than the "
                          f"{info.vocab_size:,} rows of its embedding table (vocab_size in config.json), so they "
                          "belong to another model; copy the tokenizer files of the checkpoint's own download into "
                          f"{model}, or set tokenizer_name_or_path to a tokenizer of the model's family")]
        return [(key, f"'{name}' has {tokenizer.n_vocab:,} token ids, more than the {info.vocab_size:,} rows of "
                      f"{model}'s embedding table; use a tokenizer of the model's family")]
    return []


@rule("adapter_name_or_path", commands=("train", "merge", "eval", "generate"))
def adapter_exists(ctx: Context) -> list[tuple[str, str]]:
    path = ctx.values["adapter_name_or_path"]
    if path is not None:
        from pipeline.errors import UserError
        from pipeline.model.hub import resolve_model_path

        try:
            path = str(resolve_model_path(path, key="adapter_name_or_path"))
        except UserError as err:
            return [("adapter_name_or_path", m.removeprefix("adapter_name_or_path: ")) for m in err.messages]
    if path is not None and not os.path.isfile(os.path.join(path, "adapter_config.json")):
        return [("adapter_name_or_path", f"{path!r} holds no adapter_config.json; expected a LoRA adapter "
                                         "directory (e.g. saves/<recipe>/adapter)")]
    return []


# --- training length, warmup, resume ---------------------------------------------------------------

@rule("max_steps", "num_train_epochs", commands=("train", "plan", "validate", None))
def training_length(ctx: Context) -> list[tuple[str, str]]:
    if ctx.values["max_steps"] is None and ctx.values["num_train_epochs"] is None:
        return [("num_train_epochs", "given null and max_steps is unset, so the run has no length; "
                                     "set one (e.g. num_train_epochs: 3, the default)")]
    return []


@rule("warmup_ratio", "warmup_steps")
def warmup_once(ctx: Context) -> list[tuple[str, str]]:
    if ctx.values["warmup_ratio"] is not None and ctx.values["warmup_steps"] is not None:
        key = "warmup_steps" if ctx.sort_key("warmup_steps") >= ctx.sort_key("warmup_ratio") else "warmup_ratio"
        return [(key, f"warmup_ratio ({ctx.values['warmup_ratio']}) and warmup_steps "
                      f"({ctx.values['warmup_steps']}) are both set; keep one")]
    return []


@rule("per_device_train_batch_size", "gradient_accumulation_steps", "dataset", "dataset_dir", "stage",
      "overwrite_cache", "do_train", commands=_READS_BUILT_DATA)
def enough_batches(ctx: Context) -> list[tuple[str, str]]:
    """The training split fills an optimizer step; not asked when nothing trains (do_train: false evaluates only,
    as LLaMA-Factory's examples/extras/nlg_eval recipe does, whatever the size of the train split)."""
    n = ctx.values["num_train_examples"]
    if n is None or not ctx.values["do_train"] or _rebuilt_first(ctx):
        return []
    if n == 0:
        return [("dataset", "the built training split is empty; add data or lower val_size")]
    if ctx.values["steps_per_epoch"] == 0:
        micro, world = ctx.values["per_device_train_batch_size"], ctx.values["world_size"]
        batches = n // (micro * world)  # the train loader drops the last incomplete batch
        if batches == 0:
            return [("per_device_train_batch_size",
                     f"given {micro}, but the {n} training examples do not fill one batch per rank (world size "
                     f"{world}; incomplete batches are dropped): lower per_device_train_batch_size or add data")]
        return [("gradient_accumulation_steps",
                 f"given {ctx.values['gradient_accumulation_steps']}, but the {n} training examples make only "
                 f"{batches} micro-batches per rank (per_device_train_batch_size {micro} x world size {world}): "
                 "no optimizer step would happen; lower gradient_accumulation_steps or the batch size")]
    return []


@rule("resume_from_checkpoint", commands=("train",))
def checkpoint_exists(ctx: Context) -> list[tuple[str, str]]:
    path = ctx.values["resume_from_checkpoint"]
    if path is not None and path != "latest" and not os.path.isdir(path):
        return [("resume_from_checkpoint", f"directory {path!r} not found; give a checkpoint-<step> directory "
                                           f"or 'latest'{_checkpoints_hint(str(ctx.values['output_dir']), path)}")]
    return []


def _checkpoints_hint(output_dir: str, given: str) -> str:
    """What output_dir holds, for a resume_from_checkpoint that is not there: `checkpoint-4` typed as in the
    listing is output_dir/checkpoint-4 (paths are relative to the working directory)."""
    found = sorted((n for n in (os.listdir(output_dir) if os.path.isdir(output_dir) else [])
                    if re.fullmatch(r"checkpoint-\d+", n) and os.path.isdir(os.path.join(output_dir, n))),
                   key=lambda n: int(n.split("-")[1]))
    if not found:
        return f" ({output_dir} holds no checkpoint)" if os.path.isdir(output_dir) else ""
    inside = os.path.join(output_dir, given)
    mean = f"; did you mean {inside!r}?" if os.path.isdir(inside) else ""
    return f" ({output_dir} holds {', '.join(found)}: paths are relative to the working directory{mean})"


# --- data ------------------------------------------------------------------------------------------

def _registry(ctx: Context) -> dict[str, Any] | None:
    path = Path(ctx.values["dataset_dir"]) / "dataset_info.json"
    try:
        with open(path, encoding="utf-8") as handle:
            data = json.load(handle)
    except (OSError, ValueError):
        return None  # missing or broken: `build` and `validate` report the registry itself
    return data if isinstance(data, dict) else None


@rule("dataset_dir")
def hub_dataset_dir(ctx: Context) -> list[tuple[str, str]]:
    """LLaMA-Factory's two dataset_dir forms that are not folders (its train_lora/qwen3_lora_sft_ray.yaml uses
    REMOTE:): said here, at the recipe's line, rather than "not a folder" once the registry is read."""
    given = ctx.values["dataset_dir"]
    if given.startswith("REMOTE:"):
        repo, local = given[len("REMOTE:"):], "data_remote"
        return [("dataset_dir", f"given {given!r}: LLaMA-Factory's REMOTE:<repo> reads dataset_info.json from a "
                                "hub dataset repository; here dataset_dir is a local folder. Download the repository "
                                f"(`hf download --repo-type dataset {repo} --local-dir {local}`) and set "
                                f"dataset_dir: {local}")]
    if given == "ONLINE":
        return [("dataset_dir", "given 'ONLINE': LLaMA-Factory's ONLINE (every dataset name is a hub repository) "
                                "is not supported; register each one with hf_hub_url in a dataset_info.json "
                                "(docs/datasets.md) and set dataset_dir to its folder")]
    return []


@rule("dataset", "eval_dataset", "dataset_dir")
def datasets_registered(ctx: Context) -> list[tuple[str, str]]:
    registry = _registry(ctx)
    if registry is None:
        return []
    problems = []
    where = os.path.join(ctx.values["dataset_dir"], "dataset_info.json")
    for key in ("dataset", "eval_dataset"):
        for name in ctx.values[key] or []:
            if name not in registry:
                problems.append((key, f"dataset {name!r} is not in {where}{did_you_mean(name, registry)}; "
                                      f"known: {', '.join(sorted(registry)) or 'none'}"))
    return problems


@rule("dataset", "eval_dataset")
def datasets_listed_once(ctx: Context) -> list[tuple[str, str]]:
    """A name twice in `dataset` (or `eval_dataset`): LLaMA-Factory keys the loaded datasets by name, so it reads
    the dataset once (and mixes nothing), while the built splits here would be read twice, and an interleave
    mix_strategy would count two datasets in plan and interleave_probs but read one. Said rather than guessed."""
    problems = []
    for key in ("dataset", "eval_dataset"):
        names = ctx.values[key] or []
        repeated = [name for name in dict.fromkeys(names) if names.count(name) > 1]
        hint = (" To weight a dataset, set mix_strategy interleave_under / interleave_over with interleave_probs, "
                "or register a copy under a second name in dataset_info.json") if key == "dataset" else ""
        if repeated:
            problems.append((key, f"given {', '.join(names)}: {', '.join(map(repr, repeated))} listed more than "
                                  f"once; expected each dataset once (LLaMA-Factory reads a repeated name once).{hint}"))
    return problems


@rule("val_size", "dataset", "dataset_dir", "stage", "overwrite_cache", commands=_READS_BUILT_DATA)
def val_size_fits_data(ctx: Context) -> list[tuple[str, str]]:
    """Against the built row counts: a val_size that holds out none (a fraction too small) or all of a dataset."""
    if data_form(ctx.values["stage"]) not in ROW_FORMS or _rebuilt_first(ctx):
        return []
    from pipeline.data.built import built_dir, held_out, read_manifest, row_count

    problems = []
    size = ctx.values["val_size"]
    count = row_count(size) is not None
    for name in ctx.values["dataset"] or []:
        manifest = read_manifest(built_dir(ctx.values["dataset_dir"], name))
        rows = manifest.get("rows_kept") if manifest else None
        if not isinstance(rows, int) or rows <= 0 or size == 0:  # 0: no validation split, by request
            continue
        n_val = held_out(size, rows)  # as the build splits (pipeline.data.build.split_rows)
        if n_val < 1:
            problems.append(("val_size", f"given {size}, but dataset {name!r} has {rows} rows: the validation "
                                         f"split would be empty (needs val_size >= {1 / rows:.3g}, or a number "
                                         "of rows such as 1; 0 for no validation split)"))
        elif rows - n_val < 1:
            problems.append(("val_size", f"given {size}, but dataset {name!r} has {rows} rows: nothing would "
                                         "be left to train on; lower val_size"
                                         + (f" (at most {rows - 1} rows)" if count and rows > 1 else "")))
    return problems


@rule("val_size", "dataset", "eval_dataset", "do_eval", "do_predict", "eval_strategy", "eval_steps",
      commands=("train", "eval", "plan", "validate", None))
def val_size_zero_evaluates_nothing(ctx: Context) -> list[tuple[str, str]]:
    """val_size 0 holds out no rows; unless eval_dataset names a dataset not trained on, a run that asks for an
    evaluation would find nothing to evaluate (LLaMA-Factory's Trainer fails there, mid-run)."""
    if ctx.values["val_size"] != 0:
        return []
    trained = set(ctx.values["dataset"] or [])
    if any(name not in trained for name in ctx.values["eval_dataset"] or []):
        return []
    asked = [key for key in ("eval_strategy", "eval_steps", "do_eval", "do_predict")
             if ctx.origins[key].kind in ("file", "cli") and ctx.values[key] not in (None, False, "no")]
    if ctx.command == "eval":
        asked = ["the eval command"]
    if not asked:
        return []
    return [("val_size", f"given 0: no validation split, and no eval_dataset names a dataset outside `dataset`, "
                         f"so {' and '.join(asked)} would have nothing to evaluate; set val_size (a fraction such "
                         "as 0.1, or a number of rows) and run `make data`, or name an eval_dataset")]


# --- DeepSpeed -------------------------------------------------------------------------------------

@rule("zero_stage", "offload_optimizer", "offload_param", "deepspeed")
def offload_needs_zero(ctx: Context) -> list[tuple[str, str]]:
    if ctx.values["deepspeed"] is not None:
        return []  # the user's JSON decides; dsconfig checks it
    stage, problems = ctx.values["zero_stage"], []
    if ctx.values["offload_param"] != "none" and stage != 3:
        problems.append(("offload_param", f"offloading parameters needs zero_stage: 3 (zero_stage is {stage})"))
    if ctx.values["offload_optimizer"] != "none" and stage == 0:
        problems.append(("offload_optimizer", "offloading optimizer states needs zero_stage 1, 2 or 3 "
                                              "(zero_stage is 0)"))
    for key in ("offload_optimizer", "offload_param"):
        if ctx.values[key] == "nvme":
            problems.append((key, "nvme offload needs an nvme_path: give a deepspeed JSON with "
                                  f"zero_optimization.{key}.nvme_path, or use cpu"))
    return problems


MUON_ZERO = ("Muon needs zero_stage 0: it orthogonalizes each weight matrix's whole update, but ZeRO {stage} hands "
             "the optimizer flat slices of the parameters that cut the matrices apart (DeepSpeed's own Muon, which "
             "works on those slices, computes another update than LLaMA-Factory's: docs/training.md); {fix} (data "
             "parallel; the memory plan: `make plan`), or remove use_muon")


@rule("use_muon", "zero_stage", "deepspeed", "loraplus_lr_ratio")
def muon_fits(ctx: Context) -> list[tuple[str, str]]:
    """Muon (pipeline.train.muon) steps whole matrices: ZeRO 0 only (a deepspeed JSON's stage: train's preflight).
    With loraplus_lr_ratio, LLaMA-Factory builds LoRA+'s AdamW and silently drops use_muon; asking for both is a
    mistake either way, so it is said rather than copied."""
    if not ctx.values["use_muon"]:
        return []
    problems = []
    if ctx.values["deepspeed"] is None and ctx.values["zero_stage"] != 0:
        stage = ctx.values["zero_stage"]
        problems.append(("zero_stage", f"given {stage} with use_muon: true: "
                                       + MUON_ZERO.format(stage=stage, fix="set zero_stage: 0")))
    if ctx.values["loraplus_lr_ratio"] is not None:
        problems.append(("loraplus_lr_ratio", f"given {show(ctx.values['loraplus_lr_ratio'])} with use_muon: true: "
                                              "LoRA+ and Muon are two optimizers (LLaMA-Factory silently trains with "
                                              "LoRA+'s AdamW and ignores use_muon); keep one of the two keys"))
    return problems


# --- outputs ---------------------------------------------------------------------------------------

@rule("export_dir", commands=("deps", "validate"))
def export_dir_has_one_owner(ctx: Context) -> list[tuple[str, str]]:
    """Two recipes in one folder writing one export_dir (or one inside the other) replace each other's model, and
    make, which keeps a stamp per recipe, would take one's export as current after the other rewrote it: a recipe
    that starts from the folder could train on the wrong model. Checked where make reads a recipe (deps) and by
    validate; `python -m pipeline export` itself keeps LLaMA-Factory's behaviour (its merge_lora examples share one
    export_dir)."""
    from pipeline.recipe.siblings import export_dir_sharers, recipe_value

    mine = ctx.values["export_dir"]
    others = export_dir_sharers(Path(ctx.recipe_file), mine) if mine else []
    if not others:
        return []
    theirs = "; ".join(f"{p} has export_dir: {recipe_value(p, 'export_dir')}" for p in others)
    return [("export_dir", f"{mine} is also written by another recipe in this folder ({theirs}): each export "
                           "replaces the whole folder, so one deletes the other's model, and make could hand a "
                           "recipe that starts from it the other recipe's export; give each recipe its own "
                           f"export_dir, e.g. export_dir: saves/{Path(ctx.recipe_file).stem}_export")]


# --- LLaMA-Factory keys ----------------------------------------------------------------------------

@rule("streaming")
def refused_streaming(ctx: Context) -> list[tuple[str, str]]:
    if ctx.values["streaming"]:
        return [("streaming", "true iterates the raw data lazily during training, which is not implemented: "
                              "here `build` converts each dataset once and training reads the built JSON; "
                              "remove the key (preprocessing_num_workers speeds up a large build)")]
    return []


@rule("export_legacy_format", "export_quantization_bit", "export_quantization_dataset")
def refused_exports(ctx: Context) -> list[tuple[str, str]]:
    problems = []
    if ctx.values["export_legacy_format"]:
        problems.append(("export_legacy_format", "true asks for pickled .bin weights, which are refused here "
                                                 "(pickles can run code when loaded); merged models are written as "
                                                 "safetensors, which transformers loads: set it to false"))
    for key in ("export_quantization_bit", "export_quantization_dataset"):
        if ctx.values[key] is not None:
            problems.append((key, "quantized export (GPTQ/AWQ) is not supported; merge writes fp32/bf16/fp16 "
                                  "safetensors (export_dtype): remove the key"))
    return problems


@rule("export_hub_model_id")
def refused_hub_upload(ctx: Context) -> list[tuple[str, str]]:
    """LLaMA-Factory's push of the export to the hub: refused with the `hf upload` command for this recipe (the
    other keys whose feature is not here carry their reason in the schema: refused_when_set)."""
    hub_id = ctx.values["export_hub_model_id"]
    if hub_id is None:
        return []
    return [("export_hub_model_id", "pushing the export to the Hugging Face hub is not done here (runs work "
                                    f"offline); remove the key and upload export_dir with `hf upload {hub_id} "
                                    f"{ctx.values['export_dir'] or '<export_dir>'}`")]


_REFUSED_WHEN_SET = tuple(key for key, prop in spec.properties().items() if "x-refused-when-set" in prop)


@rule(*_REFUSED_WHEN_SET)
def refused_when_set(ctx: Context) -> list[tuple[str, str]]:
    """LLaMA-Factory keys whose feature is not here (QLoRA, GaLore, PiSSA, FP8, ...): at their
    default (LLaMA-Factory's too) they pass; set, they are refused with the schema's reason, not "unknown key"."""
    props = spec.properties()
    return [(key, f"given {show(ctx.values[key])}: {props[key]['x-refused-when-set']}") for key in _REFUSED_WHEN_SET
            if ctx.values[key] != props[key]["default"]]


@rule("model_revision", "model_name_or_path")
def main_revision_only(ctx: Context) -> list[tuple[str, str]]:
    """Every model lookup resolves refs/main; rather than load main while the recipe names another revision, point
    the user at the snapshot folder of the one they want (a directory works wherever a hub id does)."""
    revision, name = ctx.values["model_revision"], ctx.values["model_name_or_path"]
    if revision == "main":
        return []
    from pipeline.model.hub import cache_dir, download_command, is_hub_id

    if not is_hub_id(name):
        return [("model_revision", f"given {revision!r}, but model_name_or_path {name!r} is not a hub id (a "
                                   "directory or preset has no revisions): remove model_revision")]
    repo = cache_dir() / f"models--{name.replace('/', '--')}"
    ref = repo / "refs" / revision
    commit = ref.read_text(encoding="utf-8").strip() if ref.is_file() else revision
    snapshot = repo / "snapshots" / commit
    unsupported = f"given {revision!r}: revisions other than main are not supported yet; "
    if snapshot.is_dir():
        return [("model_revision", f"{unsupported}it is in the HF cache: set model_name_or_path to its snapshot "
                                   f"folder, {snapshot}, and remove model_revision")]
    return [("model_revision", f"{unsupported}download it with `{download_command(name, revision)}` and set "
                               f"model_name_or_path to its snapshot folder, {repo / 'snapshots'}/<commit> (the "
                               f"commit is in {ref} once downloaded), then remove model_revision")]


@rule("mix_strategy", "interleave_probs", "dataset", "eval_dataset")
def interleave_probs_valid(ctx: Context) -> list[tuple[str, str]]:
    """interleave_probs only with an interleave mix_strategy (LLaMA-Factory refuses it with concat), one number per
    dataset, and per eval_dataset (mixed with them too; LLaMA-Factory's data_args checks both counts), that numpy
    can sample by (pipeline.data.mix.probs_problem): what LLaMA-Factory finds only when the mix is drawn, after the
    datasets are loaded, is found here before anything runs."""
    from pipeline.data.mix import parse_probs, probs_problem

    strategy, probs = ctx.values["mix_strategy"], ctx.values["interleave_probs"]
    if probs is None:
        return []
    if strategy == "concat":
        return [("interleave_probs", f"given {show(probs)}, but it only applies to an interleave mix_strategy "
                                     "(interleave_under, interleave_over, interleave_once); remove it, or set "
                                     "mix_strategy")]
    try:
        parsed = parse_probs(probs)
    except ValueError as err:
        return [("interleave_probs", f"given {show(probs)}: {err}; expected one probability per dataset, e.g. "
                                     "0.7,0.3 (numbers of 0 or more that sum to 1)")]
    problems = [probs_problem(parsed, len(ctx.values[key]), strategy, key) if ctx.values[key] else None
                for key in ("dataset", "eval_dataset")]
    return [("interleave_probs", f"given {show(probs)}: {problem}") for problem in dict.fromkeys(problems) if problem]


@rule("mix_strategy", "dataset", "eval_dataset", "val_size")
def interleaved_eval_datasets_have_rows(ctx: Context) -> list[tuple[str, str]]:
    """Several eval_datasets under an interleave mix_strategy are interleaved (pipeline.data.load.interleaved); one
    that `dataset` trains on gives its val split alone, empty with val_size 0. HF's interleave_datasets, which
    LLaMA-Factory calls, fails or returns no row with an empty dataset: said before anything runs."""
    values = ctx.values
    evals, trained = values["eval_dataset"] or [], values["dataset"] or []
    if values["mix_strategy"] == "concat" or len(evals) < 2 or values["val_size"] != 0:
        return []
    return [("eval_dataset", f"names {name!r}, which `dataset` trains on, so only its val split is evaluated, and "
                             f"val_size 0 holds none of its rows out: mix_strategy {values['mix_strategy']} would "
                             "interleave an empty dataset into the evaluation; set val_size, or drop it from "
                             "eval_dataset") for name in evals if name in trained]


@rule("do_train", "do_eval", "do_predict", commands=("train",))
def something_to_do(ctx: Context) -> list[tuple[str, str]]:
    if not ctx.values["do_train"] and not ctx.values["do_eval"] and not ctx.values["do_predict"]:
        return [("do_train", "is false and neither do_eval nor do_predict is true: the train command would do "
                             "nothing; set do_train: true, or do_eval/do_predict to evaluate the model")]
    return []


@rule("report_to", commands=("train",))
def reporters_installed(ctx: Context) -> list[tuple[str, str]]:
    import importlib.util

    wanted = ctx.values["report_to"]
    wanted = [wanted] if isinstance(wanted, str) else list(wanted)
    problems = []
    for name, module, pip in (("tensorboard", "tensorboard", "tensorboard (pinned in requirements.txt)"),
                              ("wandb", "wandb", "wandb")):
        if name in wanted and importlib.util.find_spec(module) is None:
            problems.append(("report_to", f"{name} is not installed; pip install {pip}, or remove it from "
                                          "report_to"))
    if "none" in wanted and len(wanted) > 1:
        problems.append(("report_to", f"given {wanted}: 'none' cannot be combined with other reporters"))
    return problems


@rule("lr_scheduler_type", "lr_scheduler_kwargs", "min_lr_ratio", "learning_rate")
def scheduler_kwargs(ctx: Context) -> list[tuple[str, str]]:
    """transformers' lr_scheduler_kwargs: cosine_with_min_lr's floor (resolve derived min_lr_ratio from it), refused
    where no schedule here reads them, or where they contradict a min_lr_ratio the recipe sets too."""
    schedule, kwargs = ctx.values["lr_scheduler_type"], ctx.values["lr_scheduler_kwargs"]
    try:
        ratio = lr_kwargs.floor_ratio(schedule, kwargs, ctx.values["learning_rate"])
    except (ValueError, TypeError) as err:
        return [("lr_scheduler_kwargs", f"given {show(kwargs)}: {err}")]
    user_floor = ctx.origins["min_lr_ratio"].kind in ("file", "cli")
    if ratio is not None and user_floor and ctx.values["min_lr_ratio"] != ratio:
        return [("min_lr_ratio", (f"is {ctx.values['min_lr_ratio']:g} but lr_scheduler_kwargs give a floor of "
                                  f"{ratio:g} of learning_rate; they set the same floor: keep one"))]
    if schedule == lr_kwargs.SCHEDULE and ratio is None and not user_floor:
        return [("lr_scheduler_type", (f"{lr_kwargs.SCHEDULE} needs its floor, as in transformers: set "
                                       f"lr_scheduler_kwargs: {lr_kwargs.EXAMPLE} (or min_lr_ratio: 0.1)"))]
    return []


@rule("gradient_checkpointing", "disable_gradient_checkpointing")
def checkpointing_switches_agree(ctx: Context) -> list[tuple[str, str]]:
    on = ctx.values["gradient_checkpointing"]
    disabled = ctx.values["disable_gradient_checkpointing"]
    if on is not None and ctx.origins["disable_gradient_checkpointing"].kind in ("file", "cli") and disabled == on:
        return [("gradient_checkpointing", f"is {str(on).lower()} but disable_gradient_checkpointing is also "
                                           f"{str(on).lower()}; they are the same switch inverted: keep one")]
    return []


# --- sft's weighted losses (LLaMA-Factory's use_dft_loss, use_eaft_loss) ---------------------------------------


@rule("stage", "use_dft_loss", "use_eaft_loss", "label_smoothing_factor")
def one_sft_loss(ctx: Context) -> list[tuple[str, str]]:
    """One loss at a time: LLaMA-Factory's sft trainer installs DFT, else EAFT (an elif), as transformers'
    compute_loss_func, which Trainer.compute_loss uses instead of its label smoother. Set beside the one that
    wins, use_eaft_loss or label_smoothing_factor would be ignored without a word. (Other stages refuse
    use_*_loss already: STAGE_ONLY.)"""
    values = ctx.values
    if values["stage"] != "sft":
        return []
    winner = next((key for key in ("use_dft_loss", "use_eaft_loss") if values[key]), None)
    if winner is None:
        return []
    ignored = [key for key in ("use_eaft_loss", "label_smoothing_factor") if key != winner and values[key]]
    return [(key, f"given {show(values[key])} together with {ctx.where(winner)} true: LLaMA-Factory trains "
                  f"{winner}'s loss then and ignores {key} (its sft trainer takes use_dft_loss before "
                  "use_eaft_loss, and either replaces transformers' label smoother); set one of them")
            for key in ignored]


@rule("use_eaft_loss", "eaft_alpha")
def eaft_alpha_needs_eaft(ctx: Context) -> list[tuple[str, str]]:
    """eaft_alpha without use_eaft_loss would be ignored without a word. Written at all, its default 1.0 included,
    it is refused, as the project refuses every setting of a feature that is off (lora_rank: 8 under full,
    pref_beta / kto_*_weight outside their stages, freeze_trainable_layers outside freeze): written, it says its
    author thinks the feature is on. Only on/off switches (use_*_loss, packing, train_on_prompt: STAGE_ONLY) pass
    at their off value, which asks for nothing; LLaMA-Factory's webui writes lora / pref keys only for their
    methods and never writes eaft_alpha."""
    if ctx.set_here("eaft_alpha") and not ctx.values["use_eaft_loss"]:
        return [("eaft_alpha", f"given {show(ctx.values['eaft_alpha'])}, but it only weighs the EAFT loss and "
                               "use_eaft_loss is not true; remove it or set use_eaft_loss: true")]
    return []


# --- preference tuning (stage dpo) -----------------------------------------------------------------

PREF_KEYS = ("pref_beta", "pref_loss", "pref_ftx", "dpo_label_smoothing", "simpo_gamma", "ref_model")
KTO_KEYS = ("kto_chosen_weight", "kto_rejected_weight")


@rule("stage", *PREF_KEYS, *KTO_KEYS)
def pref_keys_need_dpo(ctx: Context) -> list[tuple[str, str]]:
    """Preference settings outside the stages that read them would be ignored without a word: pref_loss & co. under
    kto (LLaMA-Factory's KTO trainer never reads them), kto_*_weight outside kto, every one of them under pt / sft / rm
    (a reward model has no reference and no preference loss)."""
    stage = ctx.values["stage"]
    if stage == "kto":
        return [(key, "is a stage dpo setting; stage kto's loss is KTO's (its keys: pref_beta, pref_ftx, "
                      "kto_chosen_weight, kto_rejected_weight, ref_model); remove it") for key in DPO_LOSS_KEYS
                if ctx.set_here(key)]
    if stage == "dpo":
        return [(key, "is a stage kto setting; remove it or set stage: kto") for key in KTO_KEYS if ctx.set_here(key)]
    return [(key, f"is a preference-tuning setting but stage is {stage}; remove it or set stage: "
                  f"{'kto' if key in KTO_KEYS else 'dpo'}")
            for key in (*PREF_KEYS, *KTO_KEYS) if ctx.set_here(key)]


@rule("stage", "pref_loss", "ref_model")
def ref_model_needs_reference_loss(ctx: Context) -> list[tuple[str, str]]:
    loss = ctx.values["pref_loss"]
    if ctx.values["stage"] == "dpo" and ctx.values["ref_model"] is not None and loss in REFERENCE_FREE:
        return [("ref_model", f"is set but pref_loss {loss} uses no reference model; remove ref_model, or choose "
                              "pref_loss sigmoid, hinge or ipo")]
    return []


@rule("stage", "pref_loss", "dpo_label_smoothing")
def label_smoothing_needs_sigmoid(ctx: Context) -> list[tuple[str, str]]:
    """Only the sigmoid (DPO) loss has a label-smoothing term: set with another loss it would be ignored
    (LLaMA-Factory refuses it the same way)."""
    loss, eps = ctx.values["pref_loss"], ctx.values["dpo_label_smoothing"]
    if ctx.values["stage"] == "dpo" and loss != "sigmoid" and eps:
        return [("dpo_label_smoothing", f"is {eps} but pref_loss {loss} has no label smoothing (only sigmoid, "
                                        "conservative DPO, uses it); remove it, or set pref_loss: sigmoid")]
    return []


@rule("stage", "ref_model", "model_name_or_path")
def ref_model_same_vocabulary(ctx: Context) -> list[tuple[str, str]]:
    """The reference scores the policy's tokens: it must read the same vocabulary."""
    ref = ctx.values["ref_model"]
    if ctx.values["stage"] not in PREFERENCE_STAGES or ref is None:
        return []
    from pipeline.errors import UserError
    from pipeline.model.hub import is_hub_id, resolve_model_path
    from pipeline.recipe.modelinfo import looks_like_path, model_info

    loads_now = ctx.command in ("train", "eval")
    if is_hub_id(ref):  # as model_name_or_path: a snapshot in the HF cache, fetched by the commands that load it
        if loads_now:
            try:
                resolve_model_path(ref, key="ref_model")
            except UserError as err:
                return [("ref_model", m.removeprefix("ref_model: ")) for m in err.messages]
    elif looks_like_path(ref) and not os.path.exists(ref):
        if loads_now:
            return [("ref_model", f"directory {ref!r} not found; expected a model directory, a hub id (org/name) "
                                  "or preset name")]
        return []
    ref_info, info = model_info(ref), model_info(ctx.values["model_name_or_path"])
    if ref_info is None:
        if is_hub_id(ref) and not loads_now:
            return []  # not cached yet: validate and plan never download; train and eval fetch it (above)
        from pipeline.model.config import read_config

        try:
            read_config(ref)
        except UserError as err:
            return [("ref_model", m.removeprefix("model_name_or_path: ")) for m in err.messages]
        return []
    if info is not None and ref_info.vocab_size != info.vocab_size:
        return [("ref_model", f"has a vocabulary of {ref_info.vocab_size:,} tokens but the policy "
                              f"({ctx.values['model_name_or_path']}) has {info.vocab_size:,}; the reference must "
                              "score the same tokens: use a model of the same family and tokenizer")]
    return []
