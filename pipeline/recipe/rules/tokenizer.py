"""Rules on the tokenizer and the template: the template's markup is in the vocabulary (template), the tokens a
recipe adds are well formed and given once (add_tokens, add_special_tokens, new_special_tokens,
new_special_tokens_config), and a tokenizer taken from elsewhere fits the model (tokenizer_name_or_path).
"""
from __future__ import annotations

import os

from pipeline.recipe.rules.core import Context, rule


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


@rule("tokenizer_name_or_path", "model_name_or_path", "stage", commands=(*TOKENIZING, "build"))
def tokenizer_fits_model(ctx: Context) -> list[tuple[str, str]]:
    """A Llama / Qwen preset (shapes, no vocabulary) names its tokenizer: refused up front, before any data or
    model is loaded, with the key to add; by `build` too where it counts tokens (a pt corpus:
    data.build.counts_tokens), in the words and at the file:line validate and train give (the data layer, where the
    build met it, named the bare key). A tokenizer taken from elsewhere (tokenizer_name_or_path) exists and
    its ids fit the model's embedding table; otherwise training would index past it. So do the tokenizer files
    of a model folder itself: copied from another download, they give the same IndexError mid-training."""
    from pipeline.data.args import data_form
    from pipeline.data.build import counts_tokens
    from pipeline.data.model_tokenizer import is_gpt2_preset, load_tokenizer
    from pipeline.errors import UserError
    from pipeline.model.config import PRESETS

    building = ctx.command == "build"
    if building and not counts_tokens(data_form(ctx.values["stage"])):
        return []
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
    if building:  # the counts need a tokenizer only; whether it fits the model is the commands' that load both
        return []
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


# stages whose rows an efficient_eos template (glm4) is written for here: sft's supervised rows (and pt, which reads
# no template); the pair, feedback and prompt processors' EOS handling is LLaMA-Factory's too but not written
EFFICIENT_EOS_STAGES = ("sft", "pt")


@rule("template", "train_on_prompt", "stage")
def efficient_eos_template(ctx: Context) -> list[tuple[str, str]]:
    """A template with LLaMA-Factory's efficient_eos (glm4: its answers end at an EOS the next prompt's first token
    is labelled with): train_on_prompt would label that token as itself, so LLaMA-Factory 0.9.5 refuses it
    (data/template.py:643-644, "Current template does not support `train_on_prompt`"); stages other than sft are
    refused with what runs (the pair / prompt processors' EOS is not written here)."""
    if not ctx.values.get("template"):
        return []
    from pipeline.data.templates import TEMPLATES

    template = TEMPLATES.get(ctx.values["template"])
    if template is None or not template.efficient_eos:
        return []
    name, stage = template.name, ctx.values["stage"]
    problems = []
    if ctx.values.get("train_on_prompt"):
        problems.append(("train_on_prompt", f"given true, but template {name} (LLaMA-Factory's efficient_eos: each "
                                            "answer's EOS is the label of the next prompt's first token) cannot train "
                                            "the prompt, as LLaMA-Factory refuses it; remove the key"))
    if stage not in EFFICIENT_EOS_STAGES:
        problems.append(("template", f"given '{name}' with stage: {stage}, but its efficient_eos rows are written for "
                                     f"stage sft only here ({stage}'s EOS placement is not); use stage sft, or "
                                     "another template"))
    return problems
