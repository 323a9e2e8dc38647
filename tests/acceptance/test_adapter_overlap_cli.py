"""A module named in both lora_target and additional_target, as LLaMA-Factory 0.9.5 hands them to PEFT
(src/llamafactory/model/adapter.py: target_modules=lora_target, modules_to_save=additional_target, unchanged).

PEFT 0.21 (tuners/tuners_utils.py, check_target_module_exists: "Adapters should never match on modules to save
modules") excludes every modules_to_save module from target_modules: such a module trains in full and takes no
adapter, and when nothing else is targeted get_peft_model raises "No modules were targeted for adaptation". The
golden values are PEFT's own: get_peft_model on the recipe LLaMA-Factory builds (its trainable count and adapter
file keys) and PeftModel.from_pretrained on our adapter/.
"""
from __future__ import annotations

import json

import pytest
import torch

from tests.acceptance.harness import assert_close, pipeline, refused, trained_model, write_data, \
    write_hf_checkpoint, write_recipe

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

TARGETS, SAVED = ["c_attn", "c_fc"], ["c_fc", "ln_f"]  # c_fc in both


def peft_model(base, targets=TARGETS):
    """PEFT's model for LLaMA-Factory's recipe: LoraConfig(target_modules=lora_target, modules_to_save=...)."""
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=targets, modules_to_save=SAVED,
                             task_type="CAUSAL_LM")
    return peft.get_peft_model(base, config)


def test_a_module_in_both_trains_in_full_without_an_adapter_as_in_peft(tmp_path):
    """Before: c_fc took LoRA and trained in full too (base weight, A and B), an adapter PEFT loads with LoRA
    tensors it does not expect; plan counted the c_fc A and B."""
    write_data(tmp_path / "data")
    base = write_hf_checkpoint(tmp_path / "gpt2", "gpt2")
    recipe = write_recipe(tmp_path / "overlap.yaml", model_name_or_path=str(tmp_path / "gpt2"), dataset_dir="data",
                          output_dir="saves/overlap", lora_target=TARGETS, lora_alpha=8, additional_target=SAVED,
                          learning_rate=0.05, max_steps=1)
    pipeline("build", recipe, cwd=tmp_path, as_typed=False)
    out = pipeline("train", recipe, cwd=tmp_path)

    golden = peft_model(base)
    trainable, _ = golden.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,} " in out.stderr + out.stdout  # 2 blocks' c_attn A and B, c_fc, ln_f
    plan = pipeline("plan", recipe, cwd=tmp_path, as_typed=False).stdout  # its tensor list (recipe_tensors)
    assert f"{trainable:,} trainable" in plan, plan
    adapter = tmp_path / "saves/overlap/adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["target_modules"] == ["c_attn"], config
    assert {name.rsplit(".", 1)[-1] for name in config["modules_to_save"]} == set(SAVED), config
    golden.save_pretrained(tmp_path / "peft")
    theirs = safetensors_torch.load_file(tmp_path / "peft/adapter_model.safetensors")
    ours = safetensors_torch.load_file(adapter / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)  # no c_fc lora_A / lora_B; c_fc's and ln_f's full weights

    x = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(0))
    fresh = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2").eval()
    with torch.no_grad():
        loaded = peft.PeftModel.from_pretrained(fresh, adapter).eval()
        assert not any("c_fc.lora" in name for name, _ in loaded.named_parameters())
        assert_close(loaded(x).logits, trained_model(recipe, tmp_path)(x), rel=1e-5)
    trained_fc = ours["base_model.model.transformer.h.0.mlp.c_fc.weight"]
    assert (trained_fc - base.transformer.h[0].mlp.c_fc.weight).abs().max() > 1e-3  # trained in full


def test_a_recipe_whose_lora_targets_are_all_trained_in_full_is_refused_at_lora_target(tmp_path):
    """PEFT raises NoMatchingPeftModuleError for it (checked here on LLaMA-Factory's recipe); ours refuses it before
    anything loads, at lora_target's line (validate: exit 2, one message, no traceback)."""
    base = write_hf_checkpoint(tmp_path / "gpt2", "gpt2")
    with pytest.raises(ValueError, match="No modules were targeted for adaptation"):
        peft_model(base, ["c_fc"])
    write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "overlap.yaml", model_name_or_path=str(tmp_path / "gpt2"), dataset_dir="data",
                          output_dir="saves/overlap", lora_target=["c_fc"], additional_target=SAVED)
    line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1) if text.startswith("lora_target:"))
    err = refused("validate", recipe, cwd=tmp_path)
    assert (f"overlap.yaml:{line}:14: lora_target: every module it picks (mlp.c_fc) is also in additional_target, "
            "which trains it in full") in err, err
    assert err.count("error:") == 1 and "finetuning_type: full / freeze" in err, err
    assert not (tmp_path / "saves").exists()


# PEFT 0.21 (utils/other.py:1088, _set_trainable) picks the modules_to_save modules by
# `any(key.endswith(target_key) for target_key in module_names)` on the full transformers names: plain text, no dot
# (LoRA's target_modules need one). So 'norm' is Llama's model.norm and every input_layernorm / post_attention_layernorm.
AT_STRINGS = ("norm", "layernorm", "embed_tokens", "lm_head", "o_proj", "ln_f", "wte", "attn", "c_proj")


def peft_saved(base, saved, target):
    """The modules PEFT trains in full for modules_to_save=saved (outermost wrappers), or None when it wraps none."""
    from peft.utils.other import ModulesToSaveWrapper
    config = peft.LoraConfig(r=2, target_modules=[target], modules_to_save=[saved], task_type="CAUSAL_LM")
    wrapped = [n.removeprefix("base_model.model.") for n, m in peft.get_peft_model(base, config).named_modules()
               if isinstance(m, ModulesToSaveWrapper)]
    return sorted(n for n in wrapped if not any(n.startswith(w + ".") for w in wrapped)) or None


@pytest.mark.parametrize("family,target", [("gpt2", "c_fc"), ("llama", "q_proj"), ("qwen2", "q_proj"),
                                           ("qwen3", "q_proj")])
def test_additional_target_picks_what_peft_modules_to_save_picks(family, target):
    """Before: our dotted-suffix rule gave 'norm' model.norm alone on Llama / Qwen2 (PEFT: every norm too), and
    'attn' / 'layernorm' other sets."""
    from pipeline.model.config import additional_target_modules, from_hf_config, module_tensors
    from pipeline.model.families import FAMILIES
    from pipeline.errors import UserError
    from tests.acceptance.harness import hf_model

    base = hf_model(family, noise=0)
    cfg, fam = from_hf_config(base.config.to_dict()), FAMILIES[family]
    for saved in AT_STRINGS:
        golden = peft_saved(hf_model(family, noise=0), saved, target)
        try:
            ours = additional_target_modules(cfg, saved)
        except UserError as e:
            assert golden is None and "matches no module" in str(e), (saved, golden)
            continue
        tensors = {fam.to_hf(t.name) for m in ours for t in module_tensors(m)}
        theirs = {n for n, _ in base.named_parameters(remove_duplicate=False) if any(n.startswith(g + ".")
                                                                                    for g in golden or ())}
        assert tensors == theirs, (saved, golden)


def test_additional_target_norm_on_llama_trains_and_saves_every_norm_as_peft(tmp_path):
    """LLaMA-Factory's recipe lora_target q_proj, additional_target norm: PEFT trains model.norm and each block's
    input_layernorm / post_attention_layernorm in full. Before: ours trained model.norm alone (fewer trainable
    parameters than PEFT's count, an adapter file without the block norms)."""
    write_data(tmp_path / "data")
    base = write_hf_checkpoint(tmp_path / "llama", "llama", small_vocab=True)
    recipe = write_recipe(tmp_path / "norm.yaml", model_name_or_path=str(tmp_path / "llama"), dataset_dir="data",
                          output_dir="saves/norm", lora_target="q_proj", lora_alpha=8,
                          additional_target="norm", cutoff_len=256, max_samples=8, learning_rate=0.05, max_steps=1)
    pipeline("build", recipe, cwd=tmp_path, as_typed=False)
    out = pipeline("train", recipe, cwd=tmp_path)
    golden = peft.get_peft_model(base, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"],
                                                       modules_to_save=["norm"], task_type="CAUSAL_LM"))
    trainable, _ = golden.get_nb_trainable_parameters()
    assert f"trainable params: {trainable:,} " in out.stderr + out.stdout
    plan = pipeline("plan", recipe, cwd=tmp_path, as_typed=False).stdout
    assert f"{trainable:,} trainable" in plan, plan
    adapter = tmp_path / "saves/norm/adapter"
    golden.save_pretrained(tmp_path / "peft")
    theirs = safetensors_torch.load_file(tmp_path / "peft/adapter_model.safetensors")
    ours = safetensors_torch.load_file(adapter / "adapter_model.safetensors")
    assert sorted(ours) == sorted(theirs)  # q_proj's A and B, every norm's weight
    fresh = transformers.LlamaForCausalLM.from_pretrained(tmp_path / "llama").eval()
    loaded = peft.PeftModel.from_pretrained(fresh, adapter).eval()
    saved = {n.removeprefix("base_model.model.") for n, m in loaded.named_modules()
             if type(m).__name__ == "ModulesToSaveWrapper"}
    assert saved == {n.removeprefix("base_model.model.") for n, m in golden.named_modules()
                     if type(m).__name__ == "ModulesToSaveWrapper"}
    x = torch.randint(0, base.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(loaded(x).logits, trained_model(recipe, tmp_path)(x), rel=1e-5)
    moved = ours["base_model.model.model.layers.0.input_layernorm.weight"]
    assert (moved - base.model.layers[0].input_layernorm.weight).abs().max() > 1e-3  # trained in full

    # a text that ends no module's name is still refused at the key's line (PEFT would train nothing, silently)
    typo = write_recipe(tmp_path / "typo.yaml", model_name_or_path=str(tmp_path / "llama"), dataset_dir="data",
                        output_dir="saves/typo", lora_target="q_proj", additional_target="ln_f")
    line = next(i for i, text in enumerate(typo.read_text().splitlines(), 1) if text.startswith("additional_target:"))
    err = refused("validate", typo, cwd=tmp_path)
    assert f"typo.yaml:{line}:20: additional_target: 'ln_f' matches no module" in err and err.count("error:") == 1, err


# What PEFT 0.21 cannot build (or cannot load back) from LLaMA-Factory's recipe, each refused at validate at
# additional_target's line. PEFT keeps an adapter off a module a modules_to_save name takes as whole dotted parts
# (tuners_utils.py:2363), then wraps every module whose name merely ends with it (other.py:1088): a bare ending on an
# adapted module is get_peft_model's TypeError, one on a module holding it an adapter that does not load (KeyError),
# and `model` (the whole inner model) leaves no module to adapt. Checked on PEFT itself below.
UNBUILDABLE = [  # (family, lora_target, additional_target, PEFT's failure, our message's words)
    ("gpt2", ["c_attn", "c_fc"], "fc", "get_peft_model: TypeError",
     "'fc' ends the name of mlp.c_fc, which lora_target adapts, without being a whole part of it"),
    ("llama", ["q_proj", "gate_proj"], "attn", "from_pretrained: KeyError",
     "'attn' ends the name of self_attn, which holds self_attn.q_proj that lora_target adapts"),
    ("llama", ["q_proj"], "model", "get_peft_model: NoMatchingPeftModuleError",
     "'model' is the whole inner model (LlamaForCausalLM.model: the embedding, every block and the final norm)"),
]


def peft_failure(family, targets, saved, tmp_path):
    """Where PEFT fails on LoraConfig(target_modules=targets, modules_to_save=[saved]): get_peft_model, or the
    round trip of the adapter it writes (save_pretrained, then PeftModel.from_pretrained on a fresh base)."""
    from tests.acceptance.harness import hf_model

    config = peft.LoraConfig(r=2, target_modules=targets, modules_to_save=[saved], task_type="CAUSAL_LM")
    try:
        peft.get_peft_model(hf_model(family, noise=0), config).save_pretrained(tmp_path / f"peft-{saved}")
    except Exception as err:  # noqa: BLE001 - whichever PEFT raises is the golden value
        return f"get_peft_model: {type(err).__name__}"
    try:
        peft.PeftModel.from_pretrained(hf_model(family, noise=0), tmp_path / f"peft-{saved}")
    except Exception as err:  # noqa: BLE001
        return f"from_pretrained: {type(err).__name__}"
    return None


def test_additional_target_peft_cannot_build_is_refused_at_its_line(tmp_path):
    """Before: ours trained mlp.c_fc / self_attn in full without LoRA and wrote an adapter that loads in PEFT as
    another model than LLaMA-Factory's recipe asks (which fails there), and 'model' was 'matches no module'."""
    write_data(tmp_path / "data")
    for family in ("gpt2", "llama"):
        write_hf_checkpoint(tmp_path / family, family, small_vocab=family == "llama")
    for family, targets, saved, failure, words in UNBUILDABLE:
        assert peft_failure(family, targets, saved, tmp_path) == failure, (family, saved)
        recipe = write_recipe(tmp_path / "unbuildable.yaml", model_name_or_path=str(tmp_path / family), dataset_dir="data",
                              output_dir="saves/unbuildable", lora_target=targets, additional_target=saved)
        line = next(i for i, text in enumerate(recipe.read_text().splitlines(), 1)
                    if text.startswith("additional_target:"))
        err = refused("validate", recipe, cwd=tmp_path, as_typed=False)  # this file runs validate as typed above
        assert f"unbuildable.yaml:{line}:20: additional_target: {words}" in err and err.count("error:") == 1, err
        fix = "finetuning_type: full" if saved == "model" else "Write whole module names in additional_target"
        assert fix in err, err
    assert not (tmp_path / "saves").exists()


def old_overlap_adapter(base, directory):
    """An adapter as this pipeline's LoRA runs wrote it before a module in both lora_target and additional_target
    was kept off LoRA: c_fc's lora_A / lora_B beside its full weight and bias (modules_to_save, by full name)."""
    g = torch.Generator().manual_seed(0)
    tensors = {}
    for i, block in enumerate(base.transformer.h):
        for module, (rows, cols) in (("attn.c_attn", (32, 96)), ("mlp.c_fc", (32, 128))):  # in, out (hidden 32)
            key = f"base_model.model.transformer.h.{i}.{module}"
            tensors[f"{key}.lora_A.weight"] = torch.randn(2, rows, generator=g)
            tensors[f"{key}.lora_B.weight"] = torch.randn(cols, 2, generator=g)
        for name, param in block.mlp.c_fc.named_parameters():
            tensors[f"base_model.model.transformer.h.{i}.mlp.c_fc.{name}"] = param.detach() + 0.1
    directory.mkdir(parents=True)
    safetensors_torch.save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 2, "lora_alpha": 4, "target_modules": TARGETS,
        "modules_to_save": ["transformer.h.0.mlp.c_fc", "transformer.h.1.mlp.c_fc"], "bias": "none"}))
    return directory


def test_an_adapter_that_adapts_a_module_it_trains_in_full_is_refused(tmp_path):
    """PEFT loads such an adapter without a word and drops c_fc's LoRA tensors (another model than the one trained).
    Before: export failed on 'unexpected tensor ...; the model has no such LoRA module' per tensor, naming the file;
    an adapter adapting only c_fc failed as 'lora_target: every module it picks ...', a key the recipe lacks."""
    base = write_hf_checkpoint(tmp_path / "gpt2", "gpt2")
    adapter = old_overlap_adapter(base, tmp_path / "old")
    loaded = peft.PeftModel.from_pretrained(transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "gpt2"), adapter)
    assert not any(".c_fc.lora_" in name for name, _ in loaded.named_parameters())  # PEFT: dropped, silently
    assert any(".c_attn.lora_A" in name for name, _ in loaded.named_parameters())

    (tmp_path / "merge.yaml").write_text("model_name_or_path: gpt2\nadapter_name_or_path: old\ntemplate: default\n"
                                         "export_dir: saves/merged\n")
    err = refused("export", "merge.yaml", cwd=tmp_path)
    assert ("merge.yaml:2:23: adapter_name_or_path: given 'old', which holds adapter tensors (lora_A / lora_B) for "
            "mlp.c_fc, which its modules_to_save ('transformer.h.0.mlp.c_fc', 'transformer.h.1.mlp.c_fc') also trains"
            " in full") in err and err.count("error:") == 1, err
    assert "Train it again with this version" in err and not (tmp_path / "saves").exists()

    # the load itself (merge or eval of a run's adapter/, which no recipe key names) refuses it the same way
    from pipeline.errors import UserError
    from pipeline.model.lora import load_adapter
    from pipeline.model.weights import load_model

    with pytest.raises(UserError, match=r"old/adapter_model.safetensors holds adapter tensors \(lora_A / lora_B\) "
                                        r"for mlp.c_fc, which its modules_to_save"):
        load_adapter(load_model(tmp_path / "gpt2"), adapter)
