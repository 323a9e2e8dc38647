"""`python -m pipeline expand --model X --output-dir Y --num-expand N`: LLaMA Pro's block expansion.

LLaMA-Factory users run its scripts/llama_pro.py before training with `use_llama_pro: true`; this is the same step
here, so no LLaMA-Factory checkout is needed. After every num_layers / N original blocks a copy of the last of them
is inserted whose attention output projection and MLP down projection are zero (weights and, for GPT-2, biases):
the new block adds nothing to the residual stream, so the expanded model computes what the original does, and
`use_llama_pro` then trains only these blocks (pipeline.model.config.llama_pro_blocks gives their indices).

Not a recipe command: the recipe that trains names the expanded model, which this writes. Works on the Hugging Face
checkpoint itself (safetensors, the family's own tensor names and dtype) without building our model, so every tensor
is written as read and the result is the layout LLaMA-Factory's script writes (same names, same order of blocks).
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

from pipeline.errors import UserError
from pipeline.model.config import llama_pro_problem
from pipeline.model.families import BY_ARCHITECTURE, Family

ZEROED = ("self_attn.o_proj", "mlp.down_proj")  # our names of the two projections that write into the residual
# each part of a block (our names) and the projection of ZEROED through which it reaches the residual stream: the
# input norms feed a branch, the output norms (sandwich_norms: Gemma 2 / 3, GLM-4-0414; OLMo 2's post_norm) take its
# projection's output, zero while that projection is (RMSNorm(0) = 0, and so is its weight's gradient). Under
# post_norm (OLMo 2) post_attention_layernorm is the attention branch's output norm, not the MLP's input (POST_NORM)
THROUGH = {"input_layernorm": ZEROED[0], "self_attn": ZEROED[0], "attn_output_norm": ZEROED[0],
           "post_attention_layernorm": ZEROED[1], "mlp": ZEROED[1], "mlp_output_norm": ZEROED[1],
           "post_feedforward_layernorm": ZEROED[1]}
POST_NORM = {**THROUGH, "post_attention_layernorm": ZEROED[0]}
SHARD_BYTES = 5 * 10**9  # LLaMA-Factory's script: max_shard_size "5GB"
WEIGHT_FILE = re.compile(r".*\.(safetensors|bin|pt|pth|ckpt|h5|msgpack)$|.*\.safetensors\.index\.json$|"
                         r".*\.bin\.index\.json$")
_BLOCK = re.compile(r"^layers\.(\d+)\.(.+)$")


def expanded_layout(num_layers: int, num_expand: int) -> list[tuple[int, bool]]:
    """For each block of the expanded model: (the original block it copies, whether it is a new zeroed copy)."""
    problem = llama_pro_problem(num_layers, num_expand)
    if problem:
        raise UserError(f"--num-expand: {problem}")
    split = num_layers // num_expand
    layout: list[tuple[int, bool]] = []
    for i in range(num_layers):
        layout.append((i, False))
        if (i + 1) % split == 0:
            layout.append((i, True))
    return layout


def checkpoint_family(config: Mapping[str, Any], where: Path) -> Family:
    """The family of a config.json, by its architecture; another one is refused (no name map to expand it by)."""
    arch = (config.get("architectures") or [None])[0]
    if arch not in BY_ARCHITECTURE:
        raise UserError(f"{where}: architectures is {config.get('architectures')!r}; expand knows "
                        f"{', '.join(sorted(BY_ARCHITECTURE))}")
    family = BY_ARCHITECTURE[arch]
    if family.moe:  # each expert's down_proj would need zeroing, and mlp_only_layers renumbering: not written
        raise UserError(f"{where}: {arch} has sparse MoE blocks, which expand (LLaMA Pro) does not copy; it expands"
                        f" {', '.join(sorted(a for a, f in BY_ARCHITECTURE.items() if not f.moe))}")
    if family.gemma:  # Gemma 3's sliding_window_pattern counts blocks: the inserted ones would shift which layers slide
        raise UserError(f"{where}: {arch} is not expanded (LLaMA Pro): copying Gemma's blocks (Gemma 3's sliding"
                        " layers by sliding_window_pattern, four norms a block) is not written; it expands "
                        f"{', '.join(sorted(a for a, f in BY_ARCHITECTURE.items() if not (f.moe or f.gemma)))}")
    return family


def layer_key(config: Mapping[str, Any]) -> str:
    """The config.json key of the block count: GPT-2's n_layer, num_hidden_layers elsewhere."""
    return "n_layer" if "n_layer" in config else "num_hidden_layers"


def expanded_config(config: Mapping[str, Any], layout: list[tuple[int, bool]], family: Family) -> dict[str, Any]:
    """config.json with the new block count; a per-block list (Qwen's layer_types) gets each copy's source entry, and
    max_window_layers (Qwen2Config: the layers from it on slide, where layer_types is absent) becomes the new index of
    the block it named (the config class's default where config.json has none), so that each original block keeps its
    attention (copies follow their source, so the sliding blocks stay a suffix)."""
    out = dict(config)
    out[layer_key(config)] = len(layout)
    first = {**dict(family.config_defaults), **config}.get("max_window_layers")
    if type(first) is int and family.sliding_window == "layers":
        out["max_window_layers"] = next((i for i, (source, _) in enumerate(layout) if source >= first), len(layout))
    types = config.get("layer_types")
    if isinstance(types, list) and len(types) == len(layout) - sum(new for _, new in layout):
        out["layer_types"] = [types[source] for source, _ in layout]
    return out


def renamed(family: Family, key: str, block: int, rest: str) -> str:
    """The HF tensor name of `rest` in `block`, with or without the family prefix as the source name had it."""
    name = family.to_hf(f"layers.{block}.{rest}")
    return name if key.startswith(family.prefix) else family.strip(name)


def expanded_tensors(family: Family, tensors: Mapping[str, Any],
                     layout: list[tuple[int, bool]]) -> Iterator[tuple[str, Any]]:
    """(name, tensor) of the expanded checkpoint: the blocks in their new order, then every other tensor."""
    import torch

    blocks: dict[int, list[tuple[str, str]]] = {}
    others = []
    for key in tensors:
        match = _BLOCK.match(family.from_hf(key))
        if match:
            blocks.setdefault(int(match[1]), []).append((key, match[2]))
        else:
            others.append(key)
    for new_index, (source, is_new) in enumerate(layout):
        for key, rest in blocks.get(source, []):
            tensor = tensors[key]
            if is_new:
                module = rest.rsplit(".", 1)[0]
                tensor = torch.zeros_like(tensor) if module in ZEROED else tensor.clone()
            yield renamed(family, key, new_index, rest), tensor
    for key in others:
        yield key, tensors[key]


def output_projection(module: str, post_norm: bool = False) -> str | None:
    """The projection (ZEROED's, with its block: layers.1.self_attn.o_proj) through which `module`, a module of a
    block, reaches the residual stream: in an expanded block it gets a gradient only once that projection is
    non-zero (the projection itself gets one whenever it is trained in full). `post_norm`: the model's
    ModelConfig.post_norm (OLMo 2's block). None outside a block, or for a part of a block THROUGH does not know."""
    parts, table = module.split("."), POST_NORM if post_norm else THROUGH
    if len(parts) < 3 or parts[0] != "layers" or parts[2] not in table:
        return None
    return f"layers.{parts[1]}.{table[parts[2]]}"


def nonzero_outputs(folder: Path, projections: Iterable[str]) -> set[str] | None:
    """Which of `projections` (our module names, e.g. layers.1.self_attn.o_proj: ZEROED of expanded blocks) hold a
    non-zero weight in the checkpoint at `folder`; None when the folder cannot be read here (the model stage says
    why). What OFT on LLaMA Pro's blocks can train depends on it: a checkpoint `expand` just wrote has them all zero,
    one whose expanded blocks were trained has not. Read as bytes, each tensor up to its first non-zero byte, without
    torch: validate and plan run this rule."""
    from pipeline.model.safetensors_header import nonzero_tensors
    from pipeline.model.safetensors_header import shard_files

    wanted = {f"{name}.weight": name for name in projections}
    try:
        family = checkpoint_family(json.loads((folder / "config.json").read_text(encoding="utf-8")), folder)
        keys = {family.to_hf(key): name for key, name in wanted.items()}
        return {keys[key] for file in shard_files(folder) for key in nonzero_tensors(file, keys)}
    except (UserError, OSError, ValueError, KeyError, TypeError):
        return None


def refuse_quantized(config: Mapping[str, Any], model: str) -> None:
    """A pre-quantized bitsandbytes checkpoint (config.json quantization_config, the hub's unsloth/*-bnb-4bit) is not
    expanded: its projections are packed 4/8-bit codes with a quant state beside them, and the zero projection a new
    block needs is no code to copy (nf4's code 0 is -1 x absmax). LLaMA-Factory's scripts/llama_pro.py loads such a
    model quantized and zeroes every state_dict tensor named o_proj / down_proj, its packed quant-state JSON included:
    what it writes does not load as the original model computes. Said before anything is written."""
    from pipeline.model.quant_layout import stored_quantization

    stored = stored_quantization(config.get("quantization_config"))
    if stored is not None:
        raise UserError(f"--model: {model} is a pre-quantized bitsandbytes checkpoint (quantization_config:"
                        f" {stored.describe()}), whose projections are packed codes with no zero weight to write into"
                        " the new blocks; expand the unquantized checkpoint it was made from (a recipe's"
                        " quantization_bit then quantizes the expanded model at load for QLoRA)")


def refuse_output(output: Path) -> None:
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        what = "an existing file" if not output.is_dir() else "not an empty folder"
        raise UserError(f"--output-dir: {output} is {what}; expand never overwrites: give a new or empty folder")


def copy_other_files(source: Path, target: Path) -> list[str]:
    """The tokenizer files, generation_config.json and anything else beside the weights (not config.json)."""
    copied = []
    for path in sorted(source.iterdir()):
        if path.is_file() and path.name != "config.json" and not WEIGHT_FILE.fullmatch(path.name):
            shutil.copy2(path, target / path.name)
            copied.append(path.name)
    return copied


def expand(model: str, output_dir: str | Path, num_expand: int) -> Path:
    """Write the expanded checkpoint of `model` (a folder or hub id) to `output_dir`; returns the folder."""
    from pipeline.io import atomic_dir, write_json
    from pipeline.model.hub import resolve_model_path
    from pipeline.model.weights import note, read_tensors, shard_files, write_safetensors

    output = Path(output_dir)
    refuse_output(output)
    source = resolve_model_path(model, key="--model")
    config_file = source / "config.json"
    if not source.is_dir():
        raise UserError(f"--model: {model}: no such folder; expected a Hugging Face checkpoint folder or a hub id "
                        "ORG/NAME (a pipeline preset such as gpt2-small has no weights to expand)")
    if not config_file.is_file():
        raise UserError(f"--model: {model}: no config.json there; expected a Hugging Face checkpoint folder")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    refuse_quantized(config, model)
    family = checkpoint_family(config, config_file)
    num_layers = int(config[layer_key(config)])
    layout = expanded_layout(num_layers, num_expand)
    note(f"expanding {model} ({family.architecture}) from {num_layers} to {len(layout)} blocks")
    for index, (origin, is_new) in enumerate(layout):
        if is_new:
            note(f"  block {index}: a copy of block {origin} whose attention and MLP output projections are zero (trains)")
    tensors = {key: tensor for _, key, tensor in read_tensors(shard_files(source))}
    state = dict(expanded_tensors(family, tensors, layout))
    with atomic_dir(output) as tmp:
        write_json(tmp / "config.json", expanded_config(config, layout, family))
        copy_other_files(source, tmp)
        write_safetensors(state, tmp, SHARD_BYTES, progress=True)
    note(f"wrote {output}; train it with:\n  model_name_or_path: {output}\n  finetuning_type: freeze\n"
         f"  freeze_trainable_layers: {num_expand}\n  use_llama_pro: true")
    return output


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline expand",
        description="LLaMA Pro block expansion (LLaMA-Factory's scripts/llama_pro.py): insert num_expand zeroed "
                    "copies of blocks into a Hugging Face checkpoint; then train with use_llama_pro: true.")
    parser.add_argument("--model", "--model_name_or_path", required=True,
                        help="the checkpoint to expand: a folder (config.json + safetensors) or a hub id")
    parser.add_argument("--output-dir", "--output_dir", required=True, help="a new or empty folder")
    parser.add_argument("--num-expand", "--num_expand", type=int, required=True,
                        help="blocks to add: a divisor of the model's block count")
    return parser


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    expand(args.model, args.output_dir, args.num_expand)
    return 0
