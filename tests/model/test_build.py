"""build_model / load_for_inference from recipe values (plain dicts stand in for the Resolved recipe)."""
from __future__ import annotations

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.build import build_model, load_for_inference
from pipeline.recipe.args import recipe_args
from pipeline.model.config import PRESETS, count_params, trainable_params
from pipeline.model.lora import LinearWithLoRA, merge_lora, save_adapter, trainable_report
from pipeline.model.weights import save_hf, save_model


def recipe(tmp_path, **kw):
    base = {"model_name_or_path": "tiny", "finetuning_type": "lora", "lora_rank": 4, "lora_alpha": None,
            "lora_dropout": 0.0, "lora_target": ["all"], "use_rslora": False, "freeze_trainable_layers": 1,
            "additional_target": None, "adapter_name_or_path": None, "context_length": None, "dropout": 0.0,
            "qkv_bias": None, "tie_word_embeddings": None, "seed": 42, "output_dir": str(tmp_path / "out")}
    return {**base, **kw}


def build(r):
    """build_model from a recipe dict, through the typed arguments train passes."""
    return build_model(*recipe_args(r))


def trainable_names(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_lora_build(tmp_path, capsys):
    model = build(recipe(tmp_path, lora_target=["c_attn", "c_fc"], additional_target=["ln_f"]))
    assert "random weights (seed 42)" in capsys.readouterr().err
    wrapper = model.layers[0].self_attn.qkv_proj
    assert isinstance(wrapper, LinearWithLoRA) and wrapper.lora.alpha == 8 and wrapper.lora.scaling == 2.0
    assert trainable_report(model)[0] == trainable_params(PRESETS["tiny"], "lora", 4, ["c_attn", "c_fc"],
                                                          additional_target=["ln_f"])
    assert {"norm.weight", "norm.bias"} <= trainable_names(model)
    again = build(recipe(tmp_path, lora_target=["c_attn", "c_fc"], additional_target=["ln_f"]))
    assert torch.equal(again.layers[1].mlp.up_proj.lora.A, model.layers[1].mlp.up_proj.lora.A)  # seeded


def test_freeze_and_full_build(tmp_path):
    frozen = build(recipe(tmp_path, finetuning_type="freeze", freeze_trainable_layers=1))
    names = trainable_names(frozen)
    assert names and all(n.startswith(("layers.1.", "norm.")) for n in names)
    assert sum(p.numel() for p in frozen.parameters() if p.requires_grad) == \
        trainable_params(PRESETS["tiny"], "freeze", freeze_trainable_layers=1)
    full = build(recipe(tmp_path, finetuning_type="full"))
    assert trainable_report(full)[0] == count_params(PRESETS["tiny"])
    with pytest.raises(UserError, match=r"freeze_trainable_layers: given 5, expected 1\.\.2 "):
        build(recipe(tmp_path, finetuning_type="freeze", freeze_trainable_layers=5))


def test_overrides(tmp_path):
    model = build(recipe(tmp_path, context_length=32, qkv_bias=False, tie_word_embeddings=False, dropout=0.1,
                               finetuning_type="full"))
    assert model.pos_embed.weight.shape[0] == 32 and model.layers[0].self_attn.qkv_proj.bias is None
    assert model.lm_head.weight is not model.embed_tokens.weight and model.cfg.drop_rate == 0.1


def test_hf_checkpoint_with_context_override(tmp_path, hf_dir):
    path, ref = hf_dir
    model = build(recipe(tmp_path, model_name_or_path=str(path), context_length=32)).eval()
    assert model.pos_embed.weight.shape[0] == 32
    x = torch.randint(0, 50257, (1, 20))
    with torch.no_grad():
        assert torch.allclose(model(x), ref(x).logits, atol=1e-4)
    with pytest.raises(UserError, match="the recipe changed the checkpoint's config .*qkv_bias True -> False"):
        build(recipe(tmp_path, model_name_or_path=str(path), qkv_bias=False))


def test_adapter_continues_and_full_merges_it(tmp_path):
    trained = build(recipe(tmp_path))
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if ".lora." in n:
                p.normal_(0, 0.05)
    save_adapter(trained, tmp_path / "ad")
    x = torch.randint(0, 50257, (1, 10))
    cont = build(recipe(tmp_path, adapter_name_or_path=str(tmp_path / "ad"))).eval()
    assert torch.equal(cont(x), trained.eval()(x))
    full = build(recipe(tmp_path, adapter_name_or_path=str(tmp_path / "ad"), finetuning_type="full")).eval()
    assert not any(isinstance(m, LinearWithLoRA) for m in full.modules())
    assert torch.allclose(full(x), trained(x), atol=1e-5)
    with pytest.raises(UserError, match="r is 4 but the model's LoRA uses 2"):
        build(recipe(tmp_path, adapter_name_or_path=str(tmp_path / "ad"), lora_rank=2))


@pytest.mark.parametrize("finetuning_type, with_adapter", [("lora", False), ("lora", True), ("full", True)])
def test_reading_straight_into_bf16_equals_casting_the_fp32_model(tmp_path, finetuning_type, with_adapter):
    """train reads the base weights straight into its compute dtype, one tensor at a time: the same bits as
    building in fp32 and casting the model, as DeepSpeed did (HF layout: Conv1D weights transposed; new LoRA
    weights drawn in fp32; an adapter folded into a full base merged in fp32 first). LoRA's own weights stay fp32, as
    PEFT upcasts them: new ones drawn in fp32 and rounded through bf16 (PEFT draws them in the base's dtype), a loaded
    adapter's exactly as written."""
    base = build(recipe(tmp_path, finetuning_type="full"))
    save_hf(base, tmp_path / "hf")
    trained = build(recipe(tmp_path, model_name_or_path=str(tmp_path / "hf")))
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if ".lora." in n:
                p.normal_(0, 0.05)
    save_adapter(trained, tmp_path / "ad")
    r = recipe(tmp_path, model_name_or_path=str(tmp_path / "hf"), finetuning_type=finetuning_type,
               adapter_name_or_path=str(tmp_path / "ad") if with_adapter else None)
    fp32 = build(r).state_dict()
    cast = {k: v.to(torch.bfloat16) for k, v in fp32.items()}
    direct = build_model(*recipe_args(r), dtype=torch.bfloat16).state_dict()
    assert cast.keys() == direct.keys()
    adapter = {k for k in cast if ".lora." in k}
    assert bool(adapter) == (finetuning_type == "lora")
    assert all(direct[k].dtype == torch.bfloat16 and torch.equal(direct[k], cast[k]) for k in cast if k not in adapter)
    assert all(direct[k].dtype == torch.float32 and torch.equal(direct[k], fp32[k] if with_adapter else cast[k].float())
               for k in adapter)
    assert direct["layers.0.self_attn.qkv_proj.linear.weight" if finetuning_type == "lora"
                  else "layers.0.self_attn.qkv_proj.weight"].is_contiguous()


def test_load_for_inference_base_adapter_merged(tmp_path):
    r = recipe(tmp_path)
    out = tmp_path / "out"
    trained = build(r)
    with torch.no_grad():
        for n, p in trained.named_parameters():
            if ".lora.B" in n:
                p.normal_(0, 0.05)
    save_adapter(trained, out / "adapter")
    x = torch.randint(0, 50257, (1, 10))
    adapter = load_for_inference(recipe_args(r).model, "adapter", out / "adapter", device="cpu")
    assert not adapter.training
    assert torch.equal(adapter(x), trained.eval()(x))
    base = load_for_inference(recipe_args(r).model, "base", device="cpu")
    assert not torch.equal(base(x), adapter(x))
    merge_lora(trained)
    save_hf(trained, out / "merged")
    assert torch.allclose(load_for_inference(recipe_args(r).model, "merged", out / "merged", device="cpu")(x), adapter(x), atol=1e-5)
    with pytest.raises(ValueError, match="kind must be one of"):
        load_for_inference(recipe_args(r).model, "newest")


def test_load_for_inference_full_model_dir(tmp_path):
    r = recipe(tmp_path, finetuning_type="full")
    tuned = build(r)
    with torch.no_grad():
        tuned.norm.bias.add_(1.0)
    save_model(tuned, tmp_path / "out" / "model")
    x = torch.randint(0, 50257, (1, 10))
    assert torch.equal(load_for_inference(recipe_args(r).model, "model", tmp_path / "out" / "model", device="cpu")(x), tuned.eval()(x))


def test_trainable_report_counts_zero3_partitioned_parameters_whole(tmp_path):
    """ZeRO-3 leaves each rank an empty `param.data` and the full size in DeepSpeed's `ds_numel` (its partition():
    param.data = torch.empty(0) after recording ds_numel): train printed "trainable params: 0 || all params: 0" for
    every ZeRO-3 run, a freeze_trainable_modules one included. The counts are the unpartitioned model's."""
    frozen = build(recipe(tmp_path, finetuning_type="freeze", freeze_trainable_layers=1))
    before = trainable_report(frozen)[:2]
    for param in frozen.parameters():  # as DeepSpeed's zero.Init partitions them on one rank
        param.ds_numel = param.numel()
        param.data = torch.empty(0)
    assert trainable_report(frozen)[:2] == before == (trainable_params(PRESETS["tiny"], "freeze",
                                                                      freeze_trainable_layers=1),
                                                     count_params(PRESETS["tiny"]))
