"""freeze_trainable_modules / freeze_extra_modules as LLaMA-Factory reads them: a user's transformers checkpoint, a
LLaMA-Factory-format freeze recipe naming modules by transformers' names, trained, merged and compared in transformers.

Golden: LLaMA-Factory's rule (model/adapter.py _setup_freeze_tuning), re-written below and applied to the transformers
model's named_parameters: hidden modules are the first name below block 0, non-hidden ones the module owning a
parameter outside the blocks, and a parameter trains when ".{block}.{module}" (".{block}." for all) or an extra
module's name is in its name.
"""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.acceptance.harness import pipeline, write_hf_checkpoint
from tests.reliability.rel_helpers import run_main

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

LF_DATA = Path(__file__).parent / "lf_data"


def lf_modules(named: list[str]) -> tuple[set[str], set[str]]:
    """LLaMA-Factory's hidden_modules and non_hidden_modules of these parameter names."""
    hidden, outside = set(), set()
    for name in named:
        if ".0." in name:
            hidden.add(name.split(".0.")[-1].split(".")[0])
        elif ".1." in name:
            hidden.add(name.split(".1.")[-1].split(".")[0])
        if re.search(r"\.\d+\.", name) is None:
            outside.add(name.split(".")[-2])
    return hidden, outside


def lf_trainable(named: list[str], n_layers: int, layers: int, modules: str, extra: str | None) -> set[str]:
    """The parameter names LLaMA-Factory leaves trainable: the last `layers` blocks (negative: the first -layers;
    model/adapter.py:89-92 re-typed), then the substring rule."""
    blocks = range(max(0, n_layers - layers), n_layers) if layers > 0 else range(min(-layers, n_layers))
    patterns = [f".{i}.{m if m != 'all' else ''}" for m in modules.split(",") for i in blocks]
    patterns += extra.split(",") if extra else []
    return {name for name in named if any(p in name for p in patterns)}


def hf_names(model) -> list[str]:
    return [name for name, _ in model.named_parameters()]


def ours(model, checkpoint: Path, layers: int, modules: str, extra: str | None) -> set[str]:
    """Our trainable leaf modules for the same keys, as the transformers model's parameter names."""
    from pipeline.model.config import freeze_trainable_names, read_config
    from pipeline.model.families import FAMILIES

    cfg = read_config(checkpoint)
    fam = FAMILIES[cfg.family]
    prefixes = [fam.to_hf(n) for n in freeze_trainable_names(cfg, layers, False, modules, extra)]
    return {name for name in hf_names(model) if any(name.startswith(p + ".") for p in prefixes)}


@pytest.mark.parametrize("family, modules, extra, layers", [
    ("gpt2", "attn,ln_2", "wpe,ln_f", 2), ("gpt2", "all", "wte", -2), ("llama", "mlp,input_layernorm", "embed_tokens", 2),
    ("qwen3", "self_attn", "lm_head,embed_tokens", -1), ("qwen3", "post_attention_layernorm,mlp", None, 2)])
def test_choices_and_trainable_set_are_llama_factorys_on_the_transformers_model(tmp_path, family, modules, extra,
                                                                                layers):
    """layers < 0: the first -layers blocks, as LLaMA-Factory (failed before: our rule took the last ones)."""
    model = write_hf_checkpoint(tmp_path, family, **({"n_layer": 3} if family == "gpt2" else
                                                     {"num_hidden_layers": 3}))
    from pipeline.model.config import freeze_module_choices, read_config

    hidden, outside = lf_modules(hf_names(model))
    assert tuple(map(set, freeze_module_choices(read_config(tmp_path)))) == (hidden, outside)
    assert ours(model, tmp_path, layers, modules, extra) == lf_trainable(hf_names(model), 3, layers, modules, extra)


def recipe(tmp_path: Path, model: Path, **keys) -> Path:
    """A LLaMA-Factory-format freeze sft recipe on its identity data (a copy: build writes beside it)."""
    if not (tmp_path / "data").exists():
        shutil.copytree(LF_DATA, tmp_path / "data")
    lines = {"model_name_or_path": str(model), "stage": "sft", "do_train": True, "finetuning_type": "freeze",
             "freeze_trainable_layers": 1, "dataset": "identity", "template": "qwen3_nothink",
             "dataset_dir": str(tmp_path / "data"), "cutoff_len": 256, "max_samples": 4, "output_dir": str(tmp_path / "run"),
             "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "learning_rate": 1.0e-2,
             "max_steps": 2, "report_to": "none", **keys}
    path = tmp_path / "freeze_sft.yaml"
    path.write_text("".join(f"{k}: {json.dumps(v)}\n" for k, v in lines.items()))
    return path


@pytest.mark.parametrize("modules, extra", [("self_attn,post_attention_layernorm", "embed_tokens,lm_head")])
def test_freeze_modules_train_through_the_cli_exactly_llama_factorys_tensors(tmp_path, modules, extra):
    """Qwen3 (untied head; q_norm / k_norm sit inside self_attn): plan names them, the merge changes exactly the
    tensors LLaMA-Factory's rule trains (the final norm too stays: the recipe spelled out what trains).
    freeze_trainable_layers: -1, LLaMA-Factory's first block (failed before: refused, "expected an integer >= 1")."""
    ckpt = tmp_path / "qwen3"
    write_hf_checkpoint(ckpt, "qwen3", small_vocab=True, num_hidden_layers=3)
    path = recipe(tmp_path, ckpt, freeze_trainable_modules=modules, freeze_extra_modules=extra,
                  freeze_trainable_layers=-1)
    plan = run_main(["plan", str(path)], tmp_path).out  # in this process: no interpreter start-up
    assert ("trainable blocks: 0 of 0..2 (their self_attn, post_attention_layernorm: freeze_trainable_modules); "
            "outside the blocks: embed_tokens, lm_head (freeze_extra_modules)") in plan
    assert run_main(["build", str(path)], tmp_path).code == 0
    for command in ("train", "merge"):
        pipeline(command, path, cwd=tmp_path, timeout=600)
    before = transformers.AutoModelForCausalLM.from_pretrained(ckpt).state_dict()
    after = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "run/merged").state_dict()
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed == lf_trainable(list(before), 3, -1, modules, extra)
    assert "model.norm.weight" not in changed and "model.layers.0.self_attn.q_norm.weight" in changed


def test_unknown_module_names_the_recipe_line_and_the_valid_names(tmp_path):
    write_hf_checkpoint(tmp_path / "m", "gpt2")
    done = run_main(["validate", str(recipe(tmp_path, tmp_path / "m", freeze_trainable_modules="mlp,self_attn",
                                            freeze_extra_modules="lm_head", template="default",
                                            cutoff_len=64))], tmp_path)
    assert done.code == 2 and "Traceback" not in done.err
    assert ("freeze_sft.yaml:17:27: freeze_trainable_modules: given 'self_attn', expected a comma list of all, ln_1, "
            "attn, ln_2, mlp (the modules of each block of this gpt2 model, by transformers' names)") in done.err
    assert ("freeze_sft.yaml:18:23: freeze_extra_modules: given 'lm_head', expected a comma list of wte, wpe, ln_f "
            "(the modules outside the blocks") in done.err
    done = run_main(["validate", str(recipe(tmp_path, tmp_path / "m", finetuning_type="lora", template="default", cutoff_len=64,
                                            freeze_extra_modules="wte"))], tmp_path)
    assert done.code == 2 and ("freeze_extra_modules: given 'wte', but it only applies to finetuning_type: freeze "
                               "(here lora); remove it") in done.err


def test_resume_refuses_changed_freeze_modules():
    from pipeline.train.checkpoint import REFUSE

    assert {"freeze_trainable_modules", "freeze_extra_modules"} <= set(REFUSE)



def test_yaml_lists_read_as_the_comma_strings(tmp_path):
    """LLaMA-Factory's split_arg takes a YAML list as well as a comma string for both keys (its recipes use either);
    the schema refused a list. The list means what the comma string means: same plan line, same resolved value."""
    from pipeline.recipe import resolve

    write_hf_checkpoint(tmp_path / "m", "gpt2", n_layer=3)
    said = {}
    for form in ("list", "comma"):
        modules, extra = (["attn", "ln_2"], ["wpe", "ln_f"]) if form == "list" else ("attn,ln_2", "wpe,ln_f")
        path = recipe(tmp_path, tmp_path / "m", freeze_trainable_modules=modules, freeze_extra_modules=extra,
                      template="default", cutoff_len=64)
        done = run_main(["plan", str(path)], tmp_path)
        assert done.code == 0, done.err
        said[form] = [line for line in done.out.splitlines() if "trainable blocks" in line]
        r = resolve(path)
        assert (r["freeze_trainable_modules"], r["freeze_extra_modules"]) == ("attn,ln_2", "wpe,ln_f")
    assert said["list"] == said["comma"] and "their attn, ln_2: freeze_trainable_modules" in said["list"][0]
