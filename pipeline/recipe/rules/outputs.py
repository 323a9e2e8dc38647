"""Rules on what a run writes or reads back: resume_from_checkpoint, an adapter_name_or_path inside the run's own
checkpoints, export_dir (one recipe writes it), the upstream path a recipe starts from (one recipe writes it), the
exports not done here (export_legacy_format, export_quantization_*, export_hub_model_id), and report_to's
reporters.
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline.names import CHECKPOINT_NAME
from pipeline.recipe.rules.core import Context, rule
from pipeline.recipe.run_folders import run_adapter


# the commands that take the run's final adapter/ over adapter_name_or_path when it is there (trained_weights)
TAKE_THE_FINAL_ADAPTER = ("merge", "eval", "generate", "chat")


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
                    if CHECKPOINT_NAME.fullmatch(n) and os.path.isdir(os.path.join(output_dir, n))),
                   key=lambda n: int(n.split("-")[1]))
    if not found:
        return f" ({output_dir} holds no checkpoint)" if os.path.isdir(output_dir) else ""
    inside = os.path.join(output_dir, given)
    mean = f"; did you mean {inside!r}?" if os.path.isdir(inside) else ""
    return f" ({output_dir} holds {', '.join(found)}: paths are relative to the working directory{mean})"


@rule("adapter_name_or_path", "output_dir", commands=("train", "merge", "eval", "generate", "chat", "validate", "plan"))
def adapter_is_no_checkpoint_of_this_run(ctx: Context) -> list[tuple[str, str]]:
    """adapter_name_or_path naming a checkpoint-<step> of the recipe's own output_dir (or its adapter/), as a user
    who wants step N's adapter types it: this recipe's merge, eval and chat take the run's final adapter
    (runtime.layout.trained_weights: what the recipe trained comes first), so the step would be passed over without a
    word, and train would write into the folder it starts from. LLaMA-Factory merges step N from a merge recipe
    naming the checkpoint (examples/merge_lora: adapter_name_or_path + export_dir), and so does `export` here
    (resolve reads checkpoint-<step>/adapter/ for checkpoint-<step>), as do this recipe's merge, eval and chat under
    another output_dir (nothing trained there: trained_weights takes adapter_name_or_path); the message says both.
    A run stopped before its end has no adapter/: there merge, eval and chat take step N as asked, and only train
    (and validate and plan, which check the recipe make trains) refuse it."""
    given, out = ctx.values["adapter_name_or_path"], ctx.values["output_dir"]
    if not isinstance(given, str) or not isinstance(out, str):
        return []
    parts = Path(os.path.relpath(os.path.realpath(given), os.path.realpath(out))).parts
    step = CHECKPOINT_NAME.fullmatch(parts[0]) if parts else None
    if step is None or parts[1:] not in ((), ("adapter",)):
        return []
    if ctx.command in TAKE_THE_FINAL_ADAPTER and run_adapter(out) == out:
        return []  # no adapter/ there (a run stopped before its end): they take adapter_name_or_path, step N itself
    folder = os.path.join(out, parts[0])
    other = f"{out.rstrip(os.sep)}-step{step[1]}"
    return [("adapter_name_or_path", f"{given} is step {step[1]}'s adapter of this recipe's own run (output_dir "
                                     f"{out}), but this recipe's merge, eval and chat use that run's final adapter "
                                     f"({os.path.join(out, 'adapter')}) and its train writes into {out}. For step "
                                     f"{step[1]}'s adapter, give it with another output_dir (adapter_name_or_path="
                                     f"{folder} output_dir={other}: merge writes {os.path.join(other, 'merged')}, "
                                     f"eval {os.path.join(other, 'eval')}), or name it in a merge recipe as "
                                     "LLaMA-Factory's examples/merge_lora do (model_name_or_path, adapter_name_or_path: "
                                     f"{folder}, template, export_dir) and run `python -m pipeline export` on it; or "
                                     "remove adapter_name_or_path to use the final adapter")]


@rule("export_dir", commands=("deps", "validate"))
def export_dir_has_one_owner(ctx: Context) -> list[tuple[str, str]]:
    """Two recipes writing one export_dir (or one inside the other) replace each other's model, and make, which keeps
    a stamp per recipe, would take one's export as current after the other rewrote it: a recipe that starts from the
    folder could train on the wrong model. The recipes make chains are compared (pipeline.recipe.siblings: this
    recipe's folder and the working tree). Checked where make reads a recipe (deps) and by validate;
    `python -m pipeline export` itself keeps LLaMA-Factory's behaviour (its merge_lora examples share one
    export_dir)."""
    from pipeline.recipe.siblings import export_dir_sharers, recipe_value

    mine = ctx.values["export_dir"]
    others = export_dir_sharers(Path(ctx.recipe_file), mine) if mine else []
    if not others:
        return []
    theirs = "; ".join(f"{p} has export_dir: {recipe_value(p, 'export_dir')}" for p in others)
    return [("export_dir", f"{mine} is also written by another recipe ({theirs}): each export "
                           "replaces the whole folder, so one deletes the other's model, and make could hand a "
                           "recipe that starts from it the other recipe's export; give each recipe its own "
                           f"export_dir, e.g. export_dir: saves/{Path(ctx.recipe_file).stem}_export")]


@rule("model_name_or_path", "adapter_name_or_path", "ref_model", "ref_model_adapters", "reward_model", "stage",
      commands=("deps", "validate"))
def upstream_has_one_producer(ctx: Context) -> list[tuple[str, str]]:
    """A path this recipe starts from that several recipes write (LLaMA-Factory's train_lora and train_qlora examples
    share output_dirs): make would have to guess which one to run first, and the chain's tokenizer is that recipe's.
    Refused while the path is still to be made; once it is there nothing needs deciding, and make uses it as it is
    (pipeline.recipe.deps.upstreams), as it did before it searched past the recipe's folder: LLaMA-Factory's
    extras/nlg_eval example, which starts from an output_dir six examples write, stays usable after training one."""
    from pipeline.recipe.siblings import producers, upstream_items

    problems = []
    for key, path in upstream_items(ctx.values):
        if os.path.exists(path):
            continue
        found = producers(Path(ctx.recipe_file), path)
        if len(found) > 1:
            names = ", ".join(str(recipe) for recipe, _ in found)
            problems.append((key, f"{path} is written by {len(found)} recipes ({names}), so make cannot tell which "
                                  "one to run first; give the one you mean an output_dir (or export_dir) of its own "
                                  f"and start from that, or {_by_name(Path(ctx.recipe_file), found)}"))
    return problems


def _by_name(recipe: Path, found: list[tuple[Path, str]]) -> str:
    """The second way out of several producers: the one named as `recipe` is taken (pipeline.recipe.siblings.producers)
    -- unless two or more already are (LLaMA-Factory's examples/train_lora/qwen3_lora_sft.yaml and a copy of it in
    recipes/), where "name it so" would name what is already the case."""
    same = [str(other) for other, _ in found if other.stem == recipe.stem]
    if len(same) < 2:
        return f"name it {recipe.name} as this recipe is named (make then takes it)"
    return (f"leave one of them named {recipe.name} as this recipe is (make then takes it): {len(same)} are now "
            f"({', '.join(same)}), so rename the other{'s' if len(same) > 2 else ''}")


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
