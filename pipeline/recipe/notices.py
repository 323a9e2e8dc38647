"""One-line notices for recipe keys accepted from LLaMA-Factory that change nothing here.

The schema marks such keys with `x-no-effect: <why>`; a recipe that sets one gets one line per key on
stderr (from rank 0), so a ported recipe runs and its author knows which settings did nothing and why.
`trust_remote_code: true` gets its own line: accepted, and no remote code ever runs.
"""
from __future__ import annotations

import os
import sys
from typing import Any

from pipeline.recipe import spec
from pipeline.recipe.steps import steps_word, warmup_waste
from pipeline.names import PREFERENCE_STAGES, trains_adapter
from pipeline.launched import first_rank

TRUST_REMOTE_CODE = ("accepted; no remote code ever runs here: every supported model family is implemented in "
                     "this repository and weights are read from safetensors only")


# The template that is each family's own chat format (the one its instruct checkpoints were trained in).
FAMILY_TEMPLATES = {"llama": "llama3", "qwen2": "qwen", "qwen3": "qwen3", "mistral": "mistral", "qwen3_moe": "qwen3"}
FAMILY_TEMPLATES.update(mixtral="mistral", qwen2_moe="qwen")  # Mixtral-8x7B-Instruct, Qwen1.5-MoE-A2.7B-Chat
FAMILY_TEMPLATES.update(gemma3="gemma3", gemma="gemma", gemma2="gemma2")  # Gemma 2: LLaMA-Factory 0.9.5's own
# (extras/constants.py:750-795 registers Gemma-2-*-Instruct with template gemma2)
FAMILY_TEMPLATES["granite"] = "granite3"  # Granite 3.x instruct (OLMo 2 has none: LLaMA-Factory's olmo is OLMo 1's format)
FAMILY_TEMPLATES.update(glm4="glm4", glm="glm4")  # GLM-4-0414, glm-4-9b-chat-hf (GLM-Z1's glmz1: the same markup)
FAMILY_TEMPLATES["gpt_oss"] = "gpt_oss"  # gpt-oss-20b / -120b: LLaMA-Factory's gpt_oss
# an image-text checkpoint's own, where it is not its decoder family's (LLaMA-Factory 0.9.5 extras/constants.py:3104,
# :3136, :2074: Qwen2.5-VL-*-Instruct qwen2_vl, Qwen3-VL-*-Instruct qwen3_vl_nothink, Mistral-Small-3.1 mistral_small)
WRAPPER_TEMPLATES = {"Qwen2_5_VLForConditionalGeneration": "qwen2_vl", "Qwen2VLForConditionalGeneration": "qwen2_vl",
                     "Qwen3VLForConditionalGeneration": "qwen3_vl_nothink",
                     "Mistral3ForConditionalGeneration": "mistral_small"}
FAMILY_TEMPLATES["glm4_moe"] = "glm4_moe"  # GLM-4.5(-Air) / 4.6: LLaMA-Factory 0.9.5 constants.py:943-963 registers them so
# DeepSeek-V3 / -V3-0324 chat (constants.py:480-493: deepseek3)
FAMILY_TEMPLATES["deepseek_v3"] = "deepseek3"
# a family's checkpoint whose config.json names another vocabulary, by its size: Moonlight-16B-A3B(-Instruct), a
# DeepseekV3ForCausalLM with Kimi's 163,840 rows (DeepSeek-V3's: 129,280), LLaMA-Factory's moonlight
# (constants.py:2133-2145); its tiktoken.model is read by remote code only, so vocabulary_template cannot tell it here
VOCABULARY_TEMPLATES = {("deepseek_v3", 163840): "moonlight"}


def template_notice(r: Any) -> str | None:
    """A Llama or Qwen recipe that does not set `template` gets ours by default: the book's Alpaca prompt, a
    format that model never saw. LLaMA-Factory would read the tokenizer's chat template instead; so that a ported
    recipe does not train in a foreign format without a word, say so (once set, even to alpaca, it is quiet)."""
    if r.origin("template").kind in ("file", "cli") or r["stage"] == "pt":  # pt formats no prompt
        return None
    from pipeline.recipe.modelinfo import model_info

    info = model_info(r["model_name_or_path"])
    own = (WRAPPER_TEMPLATES.get(info.config.wrapper) or VOCABULARY_TEMPLATES.get((info.config.family, info.vocab_size))
           or FAMILY_TEMPLATES.get(info.config.family)) if info else None
    if own is None:
        return None
    own = vocabulary_template(r["model_name_or_path"], own)
    return (f"notice: template: not set, so the default '{r['template']}' (the book's Alpaca prompt) formats the "
            f"data for this {info.config.family} model, whose own chat format is template: {own} (LLaMA-Factory "
            f"would read the tokenizer's chat template); set template: {own}, or template: {r['template']} to "
            "keep the default and silence this notice")


def vocabulary_template(model: str, own: str) -> str:
    """The template a checkpoint's vocabulary was made for: its family's own (`own`), unless the vocabulary has
    another template's markup and none of `own`'s, as a DeepSeek-R1 distill (Qwen2 or Llama weights, DeepSeek's
    <｜User｜> / <｜Assistant｜>) has deepseekr1's. Only a local or cached tokenizer is read; else `own`."""
    from pipeline.data.templates import TEMPLATES
    from pipeline.data.tokenizer_files import read_tokenizer
    from pipeline.model.hub import is_hub_id, resolve_model_path

    try:
        tokenizer = read_tokenizer(resolve_model_path(model, download=False) if is_hub_id(model) else model)
    except Exception:  # noqa: BLE001 - no tokenizer here yet: the family's template
        return own
    shared = set(TEMPLATES[own].special_tokens)
    other = [name for name, t in TEMPLATES.items()
             if t.special_tokens and not shared & set(t.special_tokens) and not t.missing_tokens(tokenizer)]
    return other[0] if other else own


def epochs_notice(r: Any) -> str | None:
    """num_train_epochs set while max_steps is set too (typically inherited through `extends`, as from the demo
    recipe): max_steps wins, as in transformers, so the epochs asked for would be ignored without a word."""
    epochs, steps = r.origin("num_train_epochs"), r.origin("max_steps")
    if r["num_train_epochs"] is None or r["max_steps"] is None or epochs.kind not in ("file", "cli"):
        return None  # num_train_epochs' default (3) is no request: max_steps alone is the usual way
    return (f"notice: {epochs.where}: num_train_epochs: {r['num_train_epochs']:g} has no effect: max_steps "
            f"{r['max_steps']} ({steps.where}) sets the length of the run; set max_steps: null (or the override "
            "max_steps=) to train by epochs")


def warmup_notice(r: Any) -> str | None:
    """A warmup that wastes the run's steps at learning rate 0 (steps.warmup_waste: it covers every step, or is one
    step long): warmup_ratio 0.03 of a 1-step run is 1 warmup step, whose only step then trains at lr 0 and leaves an
    adapter merge refuses as untrained. transformers' linear warmup starts at 0 (HF Trainer's: kept here), so this
    is a notice, said before any step runs, not a refusal."""
    total, warmup = r["total_steps"], r["num_warmup_steps"]
    waste = warmup_waste(total, warmup)
    if waste is None:
        return None
    key = "warmup_steps" if r["warmup_steps"] is not None else "warmup_ratio"
    given = (f"warmup_steps {warmup} of {steps_word(total)}" if key == "warmup_steps" else
             f"warmup_ratio {r['warmup_ratio']:g} of {steps_word(total)} = {warmup} warmup step{'s' * (warmup > 1)}")
    return (f"notice: {r.origin(key).where}: {given}: {waste} (a linear warmup starts at lr 0, as transformers' "
            f"does); set {key}: 0 or more steps")


def dpo_dropout_notices(r: Any) -> list[str]:
    """stage dpo trains the policy without dropout (pipeline.train.preference.disable_dropout), so a dropout or
    lora_dropout the recipe sets does nothing: say so rather than ignore it silently."""
    if r["stage"] not in PREFERENCE_STAGES:
        return []
    return [f"notice: {r.origin(key).where}: {key}: {r[key]:g} has no effect under stage {r['stage']}: the policy is scored "
            "without dropout, as the reference is (TRL's and LLaMA-Factory's disable_dropout)"
            for key in ("dropout", "lora_dropout") if r[key] and r.origin(key).kind in ("file", "cli")]


def run_name_notice(r: Any) -> str | None:
    """run_name names the wandb run (transformers uses it for its trackers); with no wandb in report_to it
    names nothing, which a ported recipe (LLaMA-Factory's users set it out of habit) should hear once."""
    from pipeline.names import wanted_reporters

    origin = r.origin("run_name")
    if r["run_name"] is None or origin.kind not in ("file", "cli") or "wandb" in wanted_reporters(r["report_to"]):
        return None
    return (f"notice: {origin.where}: run_name: accepted without effect: it names the run in wandb, and report_to "
            f"({r['report_to']}) sends nothing there")


def pissa_iter_notice(r: Any) -> str | None:
    """pissa_iter chooses PiSSA's SVD; without pissa_init (LLaMA-Factory's recipes carry it either way) it does
    nothing, which the recipe should hear once."""
    origin = r.origin("pissa_iter")
    if r["pissa_init"] or origin.kind not in ("file", "cli"):
        return None
    return f"notice: {origin.where}: pissa_iter: accepted without effect: it only matters with pissa_init: true (PiSSA)"


def quantization_notices(r: Any) -> list[str]:
    """quantization_method / quantization_type / double_quantization (LLaMA-Factory's recipes carry them) do nothing
    without quantization_bit, and the 4-bit pair nothing at 8 bits (Linear8bitLt): said once each, as for pissa_iter."""
    bits = r["quantization_bit"]
    keys = ("quantization_method", "quantization_type", "double_quantization") if bits is None else \
        ("quantization_type", "double_quantization") if bits == 8 else ()
    why = "it only matters with quantization_bit (QLoRA)" if bits is None else "it only matters with quantization_bit: 4"
    return [f"notice: {r.origin(k).where}: {k}: accepted without effect: {why}" for k in keys
            if r.origin(k).kind in ("file", "cli")]


OPTIMIZER_KEYS = {"galore": ("GaLore", ("galore_target", "galore_rank", "galore_update_interval", "galore_scale",
                                         "galore_proj_type", "galore_layerwise")),
                 "apollo": ("APOLLO", ("apollo_target", "apollo_rank", "apollo_update_interval", "apollo_scale",
                                       "apollo_proj", "apollo_proj_type", "apollo_scale_type", "apollo_layerwise")),
                 "badam": ("BAdam", ("badam_mode", "badam_start_block", "badam_switch_mode", "badam_switch_interval",
                                     "badam_update_ratio", "badam_mask_mode"))}
BADAM_MODE_KEYS = {"layer": ("badam_start_block", "badam_switch_mode", "badam_switch_interval"),
                   "ratio": ("badam_update_ratio", "badam_mask_mode")}  # each mode's own keys, which the other ignores
LAYERWISE = ("the update is LLaMA-Factory's layer-wise one (each weight's own step, and no gradient clipping: there "
             "the hooks clear each gradient before transformers clips, so max_grad_norm does nothing), taken after "
             "the backward pass rather than inside it: the gradient memory it saves there is not saved here")


def optimizer_key_notices(r: Any) -> list[str]:
    """The galore_* / apollo_* / badam_* keys (LLaMA-Factory's recipes carry them) do nothing without use_galore /
    use_apollo / use_badam:
    said once each, as for pissa_iter; with use_badam, the other badam_mode's keys, likewise. With it, *_layerwise: true trains LLaMA-Factory's layer-wise update without
    its memory saving (DeepSpeed steps the optimizer after the backward pass): said too."""
    out = []
    for key, (name, keys) in OPTIMIZER_KEYS.items():
        if not r[f"use_{key}"]:
            out += [f"notice: {r.origin(k).where}: {k}: accepted without effect: it only matters with use_{key}: true "
                    f"({name})" for k in keys if r.origin(k).kind in ("file", "cli")]
        elif f"{key}_layerwise" in keys and r[f"{key}_layerwise"]:
            out.append(f"notice: {r.origin(f'{key}_layerwise').where}: {key}_layerwise: true: {LAYERWISE}")
    if r["use_badam"]:
        other = "layer" if r["badam_mode"] == "ratio" else "ratio"
        out += [f"notice: {r.origin(k).where}: {k}: accepted without effect: it only matters with badam_mode: {other}"
                for k in BADAM_MODE_KEYS[other] if r.origin(k).kind in ("file", "cli")]
    return out


def optim_args_notices(r: Any) -> list[str]:
    """optim_args keys transformers' Trainer does not read for the recipe's optim (all of them under AdamW's names and
    adafactor; weight_decay, which its decay groups override): ignored here too, as there, and said once each."""
    from pipeline.model.optimizer_state import OPTIM_ARGS_READ, ignored_optim_args

    try:
        ignored = ignored_optim_args(r["optim"], r["optim_args"])
    except ValueError:  # refused by the rules (optim_args_parse)
        return []
    where, optim = r.origin("optim_args").where, r["optim"]
    return [f"notice: {where}: optim_args: {key}: ignored, as transformers' Trainer ignores it "
            + ("(its weight decay groups set weight_decay; use the weight_decay key)" if key == "weight_decay"
               else f"(it reads {', '.join(k for k in OPTIM_ARGS_READ[optim] if k != 'weight_decay')} for optim {optim})" if optim in OPTIM_ARGS_READ
               else f"(it reads no optim_args for optim {optim})") for key in ignored]


def split_special_tokens_notice(r: Any) -> str | None:
    """Written in a recipe: a value other than the tokenizer_config.json of the checkpoint says (the recipe's wins,
    as transformers' from_pretrained(..., split_special_tokens=...) wins over the file: said, since the checkpoint
    was trained the other way); else false, LLaMA-Factory's default with one difference here (markup typed in data
    stays text): said when the recipe writes the key, not on every run (validate and inspect warn about rows that
    type markup, which is when the difference matters)."""
    from pipeline.data.model_tokenizer import checkpoint_split_special_tokens
    from pipeline.data.tokenizer_files import MARKUP_WORDS

    origin = r.origin("split_special_tokens")
    if origin.kind not in ("file", "cli"):
        return None
    value, saved = r["split_special_tokens"], checkpoint_split_special_tokens(r)
    if saved is not None and saved[1] != value:
        typed = "literal text" if value else "one token each (but the markup)"
        return (f"notice: {origin.where}: split_special_tokens: {str(value).lower()} overrides "
                f"{saved[0] / 'tokenizer_config.json'}'s split_special_tokens: {str(saved[1]).lower()}, as "
                f"transformers' from_pretrained(split_special_tokens={value}) does: the special tokens typed in the "
                f"data are {typed} here, where the checkpoint's tokenizer reads them the other way; the exports say "
                f"{str(value).lower()}")
    if value:
        return None
    return (f"notice: {origin.where}: split_special_tokens: false: the special tokens typed in the data are one token "
            f"as in LLaMA-Factory, except the markup ({MARKUP_WORDS}), which stays literal text here so that data "
            "cannot forge a turn; LLaMA-Factory makes it one token")


def rope_scaling_notice(r: Any) -> str | None:
    """rope_scaling changes the model's positions (or, within the window, nothing): say which, as LLaMA-Factory
    logs "Using yarn scaling strategy and setting scaling factor to 4.0" or "Disabling rope scaling"."""
    if r["rope_scaling"] is None:
        return None
    from pipeline.model.rope_recipe import recipe_rope, rope_notice
    from pipeline.recipe.modelinfo import model_info

    info = model_info(r["model_name_or_path"])
    if info is None:
        return None
    plan = recipe_rope(info.config, r["rope_scaling"], r["cutoff_len"])
    return rope_notice(plan, r["rope_scaling"], r["cutoff_len"], r.origin("rope_scaling").where)


def moe_aux_loss_notice(r: Any) -> str | None:
    """moe_aux_loss_coef on a model without sparse MoE blocks changes nothing, as LLaMA-Factory's configure_moe sets
    nothing for a dense model type; nor under stage rm on a MoE model: transformers' Qwen3MoeForSequenceClassification
    (GenericForSequenceClassification) computes no router loss, and LLaMA-Factory's rm trainer calls its value-head
    model without labels, so Qwen3MoeForCausalLM adds its aux_loss to no loss, and takes the pairwise loss alone
    (train/rm/trainer.py compute_loss). Said once, where the key was set."""
    if not r["moe_aux_loss_coef"] or r.origin("moe_aux_loss_coef").kind not in ("file", "cli"):
        return None
    from pipeline.recipe.modelinfo import model_info

    info = model_info(r["model_name_or_path"])
    where = f"notice: {r.origin('moe_aux_loss_coef').where}: moe_aux_loss_coef: accepted without effect: "
    if info is not None and info.config.n_experts and r["stage"] == "rm":
        return (where + "stage rm's pairwise loss has no router term, as in LLaMA-Factory (its reward model's forward "
                "gets no labels, so the aux loss is added to nothing) and in transformers' "
                f"{info.config.hf.reward_architecture} (which computes none)")
    if info is not None and info.config.n_experts and not info.config.hf.moe.router_loss:
        if info.config.hf.moe.deepseek:
            return (where + f"this {info.config.hf.architecture} balances its experts by the router's correction bias"
                    " and computes no load-balancing loss, as in transformers and LLaMA-Factory (whose configure_moe"
                    f" sets nothing for model type {info.config.hf.model_type})")
        return (where + f"LLaMA-Factory 0.9.5 sets output_router_logits for no {info.config.family} model"
                " (configure_moe), so it trains without the router's load-balancing loss, as here")
    if info is None or info.config.n_experts:
        return None
    return where + f"this {info.config.family} model has no sparse MoE blocks (no router to balance), as in LLaMA-Factory"


def dynamic_context_notice(r: Any) -> str | None:
    """cutoff_len past the context of a dynamic NTK model is allowed (rule cutoff_within_context), as transformers
    allows it; the rows longer than the context then train with rescaled frequencies, which the user should know."""
    from pipeline.recipe.modelinfo import model_info, scales_past_context

    info = model_info(r["model_name_or_path"])
    if info is None:
        return None
    context = r["context_length"] or info.context_length
    if r["cutoff_len"] <= context or not scales_past_context(info, r["rope_scaling"], r["cutoff_len"]):
        return None
    return (f"notice: {r.origin('cutoff_len').where}: cutoff_len {r['cutoff_len']} runs past the model's {context} "
            "positions (max_position_embeddings): its config.json's rope_scaling is dynamic NTK, which transformers "
            f"rescales past them with no limit; a row longer than {context} tokens trains and evaluates with the "
            "frequencies for its own length, recomputed per forward (docs/models.md, Dynamic NTK)")


def new_tokens_notices(r: Any) -> list[str]:
    """Tokens the tokenizer already has keep their ids (LLaMA-Factory's add_tokens skips them with a warning), and
    with LoRA a grown vocabulary makes the embedding and the head train in full (its warning "Vocab has been
    resized, add embed_tokens,lm_head to trainable params"): both said once, where the key was set. As
    LLaMA-Factory warns: new_special_tokens_config's tokens win over add_special_tokens, and init_special_tokens
    desc_init without that config falls back to noise_init."""
    from pipeline.data.added_tokens import DESCRIBED, SPECIAL_KEYS, TokenNames
    from pipeline.data.model_tokenizer import available_tokenizer
    from pipeline.recipe.args import data_args

    method = "OFT" if r["finetuning_type"] == "oft" else "LoRA"
    trains = (f"{method} trains {_vocab_modules_words(r['stage'])} in full (saved as modules_to_save), as "
              "LLaMA-Factory does; set additional_target to choose other modules")
    lora_alone = trains_adapter(r["finetuning_type"]) and r["additional_target"] is None
    out = _token_source_notices(r, DESCRIBED, SPECIAL_KEYS)
    if r["resize_vocab"] and lora_alone and r.origin("resize_vocab").kind in ("file", "cli"):
        lora_alone = False  # said here, once
        out.append(f"notice: {r.origin('resize_vocab').where}: resize_vocab: {trains}")
    names = TokenNames.of(r)
    if not names:
        return out
    tokenizer = available_tokenizer(data_args(r))
    if tokenizer is None:
        return out
    special_key = next((k for k in ("new_special_tokens_config", *SPECIAL_KEYS) if r[k] is not None), SPECIAL_KEYS[0])
    named = {**{n: "add_tokens" for n in names.plain if n}, **{n: special_key for n in names.special if n}}
    out += [f"notice: {r.origin(key).where}: {key}: {name!r} is already a token of the tokenizer (id "
            f"{tokenizer.encode_special(name)[0]}); it keeps that id, as LLaMA-Factory skips it"
            for name, key in named.items() if name not in tokenizer.new_tokens]
    if tokenizer.new_tokens and lora_alone:
        key = special_key if any(n in tokenizer.new_tokens for n in names.special) else "add_tokens"
        out.append(f"notice: {r.origin(key).where}: {key}: tokens are added, so resize_vocab is on and {trains}")
    return out


def _vocab_modules_words(stage: str) -> str:
    """What LoRA trains in full once the vocabulary grows (pipeline.model.config.vocab_modules), in words: the
    input embedding and the output head; under stage rm, whose model has a score head in place of the output head,
    the embedding and that score head (which a reward model trains in full anyway)."""
    return "the input embedding and the score head" if stage == "rm" else "the input embedding and the output head"


def _token_source_notices(r: Any, described: tuple[str, ...], special_keys: tuple[str, ...]) -> list[str]:
    """What LLaMA-Factory warns about the keys that add special tokens: the config's tokens win over
    add_special_tokens; a desc_ init without the config is noise_init."""
    out = []
    config = r["new_special_tokens_config"]
    if config is not None:
        out += [f"notice: {r.origin(key).where}: {key}: new_special_tokens_config ({config}) gives the special "
                "tokens, so this list is not used (LLaMA-Factory warns and does the same)"
                for key in special_keys if r[key] is not None]
    elif r["init_special_tokens"] in described:
        out.append(f"notice: {r.origin('init_special_tokens').where}: init_special_tokens: "
                   f"{r['init_special_tokens']} reads the descriptions of new_special_tokens_config, which is not "
                   "set; the new rows are noise_init's, as LLaMA-Factory falls back")
    return out


# The warmup notice is said by the commands whose output the learning-rate schedule shapes, each of the steps it
# counts once the length policy dropped the rows over cutoff_len: train of the steps it runs (pipeline.train.run),
# plan of the steps it shows (pipeline.recipe.plan.run), both from pipeline.recipe.exact. Said here, from the built
# rows, it told of "5 steps" of a dpo run that then trained 2; said by every command, `make all` said it at build,
# validate, train, merge and eval, four times too many (merge's refusal of the untrained adapter it leaves names the
# warmup itself: merge.untrained_cause).
# The commands that say the recipe's other notices: those that check it (validate, which reads the checkpoint's
# config.json and tokenizer first in make's chain), show it (plan, inspect) or run it alone (train, and those make
# runs without validate: export, generate / chat). Not merge and eval, which follow train (a benchmark recipe's eval,
# which trains nothing and follows no validate in make, does; so does an eval recipe's, do_train: false, where no
# validate said them: AFTER_VALIDATE); build only when no validate follows it (BEFORE_VALIDATE).
RECIPE_COMMANDS = ("validate", "plan", "inspect", "train", "export", "generate", "chat")
# Set by the Makefile for build when its goal is more than `make data` (validate or inspect comes next and says the
# notices): a build typed alone, or `make data`, says them, as LLaMA-Factory's preprocessing recipes
# (examples/train_lora/qwen3_preprocess.yaml: tokenized_path) are run for their data only.
BEFORE_VALIDATE = "PIPELINE_BEFORE_VALIDATE"
# Set by the Makefile for the stages that follow its validate stage (train, dry-run; eval of a do_train: false recipe,
# which has no train), to validate's stamp: validate said the notices when the recipe or ARGS last changed (its stamp
# depends on both), so `make all` says each once, not at validate and again at train. `python -m pipeline train`
# (eval of such a recipe) typed alone still says them.
AFTER_VALIDATE = "PIPELINE_AFTER_VALIDATE"


def after_validate(r: Any) -> bool:
    """Whether this command runs in the Makefile's chain after a validate that read the model `r` names (see
    AFTER_VALIDATE). make runs validate before the upstream recipe that writes the model (model_name_or_path:
    saves/sft/merged) and before a hub model is downloaded: that validate read no config.json nor tokenizer, so it
    said neither the notices that need them nor the rows the length policy drops. A model whose config.json is not
    older than validate's stamp is one validate may not have read; train says them then. A preset has no files:
    validate read what train reads. The stamp holds validate's start time (the Makefile touches it with -r from a
    file made before validate ran): under `make -j` an upstream may write the model while validate runs, after it
    read the folder, and its end time (the stamp as it was) would count that model as read. Equal times count as
    unread: a notice said twice beats one never said (file systems with coarse timestamps)."""
    from pipeline.recipe.modelinfo import model_folder

    stamp = os.environ.get(AFTER_VALIDATE)
    if not stamp:
        return False
    try:
        validated = os.stat(stamp).st_mtime_ns
    except OSError:  # no validate ran (a stamp removed by hand): nobody said them
        return False
    folder = model_folder(r["model_name_or_path"])
    try:
        written = os.stat(folder / "config.json").st_mtime_ns if folder is not None else None
    except OSError:
        return False
    return written is None or written < validated


def says_recipe_notices(r: Any, command: str | None) -> bool:
    """Whether `command` says the recipe's notices (all but the warmup's); None: every notice (the unit tests')."""
    if command is None:
        return True
    if command == "eval" and r["task"] is not None:  # a benchmark recipe: eval is its only stage
        return True
    if command == "eval" and r["do_train"] is False:  # an eval recipe: eval follows no train, in make validate
        return not after_validate(r)
    if command == "build":
        return not os.environ.get(BEFORE_VALIDATE)
    return command in RECIPE_COMMANDS and not (command == "train" and after_validate(r))


def notices(r: Any, command: str | None = None) -> list[str]:
    """`where: key: accepted without effect: why` for every no-effect key the user set; the template notice; the
    epochs that max_steps overrides; a warmup that wastes the run's steps at lr 0 (only for `command` None: every
    notice; plan and train say it of their exact counts); dropout under stage dpo; run_name without wandb; what
    rope_scaling set; pissa_iter without pissa_init; what the keys that add tokens did; split_special_tokens: false written; the
    galore_* / apollo_* / badam_* keys without use_galore / use_apollo / use_badam, and *_layerwise with it;
    moe_aux_loss_coef on a dense model; the quantization keys without quantization_bit. All but the warmup's only
    where says_recipe_notices."""
    warmup = warmup_notice(r) if command is None else None
    if not says_recipe_notices(r, command):
        return [warmup] if warmup else []
    lines = (template_notice(r), epochs_notice(r), warmup, run_name_notice(r),
             rope_scaling_notice(r),
             dynamic_context_notice(r), pissa_iter_notice(r),
             split_special_tokens_notice(r), moe_aux_loss_notice(r))
    out = [line for line in lines if line]
    out += new_tokens_notices(r)
    out += dpo_dropout_notices(r)
    out += optimizer_key_notices(r)
    out += optim_args_notices(r)
    out += quantization_notices(r)
    for key, prop in spec.properties().items():
        origin = r.origin(key)
        if origin.kind not in ("file", "cli"):
            continue
        if "x-no-effect" in prop:
            out.append(f"notice: {origin.where}: {key}: accepted without effect: {prop['x-no-effect']}")
        elif key == "trust_remote_code" and r[key]:
            out.append(f"notice: {origin.where}: {key}: {TRUST_REMOTE_CODE}")
    return out


def print_notices(r: Any, command: str) -> None:
    """The notices `command` says (notices), on rank 0's stderr."""
    if not first_rank():
        return
    for line in notices(r, command):
        print(line, file=sys.stderr)
