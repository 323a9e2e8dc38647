"""LoRA: the book's layers, targeting, freezing, merge/unmerge, and the PEFT-layout adapter files."""
from __future__ import annotations

import json
import math

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.config import PRESETS, trainable_params
from pipeline.model.gpt import GPTModel
from pipeline.model.lora import (LinearWithLoRA, LoRALayer, apply_lora, load_adapter, lora_state_dict, merge_lora,
                                 replace_linear_with_lora, save_adapter, trainable_report, unmerge_lora)
from pipeline.model import lora as L
from pipeline.model.weights import load_model

TINY = PRESETS["tiny"].replace(context_length=32)


def ids(seed=0, shape=(2, 12)):
    return torch.randint(0, 50257, shape, generator=torch.Generator().manual_seed(seed))


def randomise_lora(model, seed=0):
    """B starts at zero; give the adapters non-trivial values so merge/export tests can fail."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora." in n:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.05)


def test_lora_layer_math_by_hand():
    layer = LoRALayer(3, 2, rank=2, alpha=4)
    assert layer.A.shape == (3, 2) and layer.B.shape == (2, 2) and torch.count_nonzero(layer.B) == 0
    bound = 1 / math.sqrt(2)  # kaiming_uniform(a=sqrt 5) on a (in x r) tensor: bound = 1/sqrt(fan_in = r)
    assert layer.A.abs().max() <= bound
    with torch.no_grad():
        layer.A.copy_(torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]]))
        layer.B.copy_(torch.tensor([[1.0, 2.0], [3.0, 4.0]]))
    x = torch.tensor([[1.0, 2.0, 3.0]])
    # x @ A = [4, 5]; @ B = [4 + 15, 8 + 20] = [19, 28]; scale alpha / r = 2
    assert torch.equal(layer(x), torch.tensor([[38.0, 56.0]]))
    rs = LoRALayer(3, 2, rank=4, alpha=4, use_rslora=True)
    assert rs.scaling == 2.0  # alpha / sqrt(r)


def test_book_replace_linear_with_lora_walks_everything():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.Sequential(torch.nn.ReLU(), torch.nn.Linear(4, 2)))
    replaced = replace_linear_with_lora(model, rank=2, alpha=4)
    assert replaced == ["0", "1.1"]
    assert isinstance(model[0], LinearWithLoRA) and isinstance(model[1][1], LinearWithLoRA)


def test_apply_lora_targets_freeze_and_report():
    model = GPTModel(TINY, seed=0)
    replaced = apply_lora(model, ["c_attn", "mlp.c_proj"], rank=4, alpha=8)
    assert replaced == ["layers.0.self_attn.qkv_proj", "layers.0.mlp.down_proj", "layers.1.self_attn.qkv_proj", "layers.1.mlp.down_proj"]
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {f"{m}.lora.{x}" for m in replaced for x in "AB"}
    count, total, pct, line = trainable_report(model)
    assert count == trainable_params(TINY, "lora", 4, ["c_attn", "mlp.c_proj"]) == 2 * 4 * (64 + 192 + 256 + 64)
    assert total == sum(p.numel() for p in model.parameters())
    assert pct == pytest.approx(100 * count / total) and f"{count:,}" in line
    everything = GPTModel(TINY, seed=0)
    assert len(apply_lora(everything, "all", rank=2)) == 8  # every Linear but lm_head
    assert not isinstance(everything.lm_head, LinearWithLoRA)


def test_empty_match_names_available_modules():
    with pytest.raises(UserError) as err:
        apply_lora(GPTModel(TINY, seed=0), ["q_proj"], rank=2)
    assert "'q_proj' matches no module" in str(err.value) and "attn.c_attn" in str(err.value)


def test_output_unchanged_at_init_and_one_step_moves_only_lora():
    model = GPTModel(TINY, seed=1)
    x = ids()
    before = model(x).detach()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, "all", rank=4, alpha=8, seed=0)
    assert torch.equal(model(x), before)  # B = 0
    labels = x.roll(-1, 1)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model(x, labels=labels).backward()
    opt.step()
    after = dict(model.named_parameters())
    for name, old in base.items():
        new = after[name] if name in after else after[name.replace(".weight", ".linear.weight")
                                                      .replace(".bias", ".linear.bias")]
        assert torch.equal(new, old), name
    moved = [n for n, p in after.items() if ".lora.B" in n and torch.count_nonzero(p) > 0]
    assert len(moved) == 8
    assert not torch.equal(model(x), before)


def test_merge_equals_adapter_and_unmerge_restores_exactly():
    model = GPTModel(TINY, seed=2).eval()
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    apply_lora(model, "all", rank=4, alpha=8, use_rslora=True)
    randomise_lora(model)
    x = ids(1)
    adapter_logits = model(x).detach()
    merged = merge_lora(model, keep_original=True)
    assert len(merged) == 8 and not any(isinstance(m, LinearWithLoRA) for m in model.modules())
    assert torch.allclose(model(x), adapter_logits, atol=1e-5, rtol=0)
    assert not torch.equal(model.layers[0].self_attn.qkv_proj.weight, base["layers.0.self_attn.qkv_proj.weight"])
    unmerge_lora(model)
    assert isinstance(model.layers[0].self_attn.qkv_proj, LinearWithLoRA)
    for name, p in model.named_parameters():
        if ".lora." not in name:
            assert torch.equal(p, base[name.replace(".linear.", ".")]), name
    assert torch.equal(model(x), adapter_logits)
    merge_lora(model)
    with pytest.raises(ValueError, match="nothing to unmerge"):
        unmerge_lora(model)


def test_adapter_round_trip_and_peft_layout(tmp_path):
    model = GPTModel(TINY, seed=3).eval()
    apply_lora(model, ["c_attn", "c_proj"], rank=4, alpha=16, dropout=0.1)
    randomise_lora(model)
    save_adapter(model, tmp_path / "adapter", {"base_model_name_or_path": "tiny"})
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["r"] == 4 and config["lora_alpha"] == 16
    assert config["target_modules"] == ["c_attn", "c_proj"] and config["fan_in_fan_out"] is True
    assert config["lora_dropout"] == 0.1 and config["base_model_name_or_path"] == "tiny"
    state = lora_state_dict(model)
    assert state["base_model.model.transformer.h.0.attn.c_attn.lora_A.weight"].shape == (4, 64)    # r x in
    assert state["base_model.model.transformer.h.0.attn.c_attn.lora_B.weight"].shape == (192, 4)   # out x r
    assert len(state) == 2 * 3 * 2  # 2 blocks x (c_attn, attn.c_proj, mlp.c_proj) x (A, B)
    fresh = GPTModel(TINY, seed=3).eval()
    load_adapter(fresh, tmp_path / "adapter")
    x = ids(2)
    assert torch.equal(fresh(x), model(x))


def test_load_adapter_rejects_other_shapes_and_bad_files(tmp_path):
    model = GPTModel(TINY, seed=0)
    apply_lora(model, "c_attn", rank=2)
    save_adapter(model, tmp_path / "a")
    other = GPTModel(PRESETS["mini"], seed=0)
    with pytest.raises(UserError) as err:
        load_adapter(other, tmp_path / "a")
    text = str(err.value)
    assert "'base_model.model.transformer.h.0.attn.c_attn.lora_A.weight' has shape [2, 64]" in text
    assert "expects [2, 128]" in text
    with pytest.raises(UserError, match="r is 2 but the model's LoRA uses 4"):
        m = GPTModel(TINY, seed=0)
        apply_lora(m, "c_attn", rank=4, alpha=4)
        load_adapter(m, tmp_path / "a")
    data = (tmp_path / "a" / "adapter_model.safetensors").read_bytes()
    (tmp_path / "a" / "adapter_model.safetensors").write_bytes(data[:-10])
    with pytest.raises(UserError, match="adapter_model.safetensors: not a readable safetensors file"):
        load_adapter(GPTModel(TINY, seed=0), tmp_path / "a")
    (tmp_path / "a" / "adapter_model.safetensors").unlink()
    with pytest.raises(UserError, match="adapter_model.safetensors: missing"):
        load_adapter(GPTModel(TINY, seed=0), tmp_path / "a")
    with pytest.raises(UserError, match="is not a directory"):
        load_adapter(GPTModel(TINY, seed=0), tmp_path / "nope")


@pytest.mark.parametrize("use_rslora,targets,extra", [(False, "all", None), (True, ["c_attn", "attn.c_proj"], ["ln_f"])])
def test_peft_loads_our_adapter(tmp_path, hf_dir, use_rslora, targets, extra):
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    path, _ = hf_dir
    ours = load_model(path).eval()
    apply_lora(ours, targets, rank=4, alpha=8, use_rslora=use_rslora, additional_targets=extra)
    randomise_lora(ours, seed=5)
    if extra:
        with torch.no_grad():
            ours.norm.weight.mul_(1.5)
    save_adapter(ours, tmp_path / "adapter", {"base_model_name_or_path": str(path)})
    base = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    tuned = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    x = ids(4)
    with torch.no_grad():
        ref = tuned(x).logits
    assert torch.allclose(ours(x), ref, atol=1e-4, rtol=0)
    assert (ours(x) - load_model(path).eval()(x)).abs().max() > 1e-2  # the adapter does change the output


@pytest.mark.parametrize("extra", ["lm_head", "wte", "wte,lm_head"])
def test_the_tied_head_trained_in_full_loads_in_peft(tmp_path, hf_dir, extra):
    """GPT-2's head is its token embedding: additional_target lm_head, wte or both (a comma string, as in
    LLaMA-Factory) train that one matrix, and the adapter says so (ensure_weight_tying, both tensors), so PEFT's
    head follows the trained embedding. adapters_disabled() (a preference loss's reference) is the base, head
    included, and the starting copy keeps the two modules on one matrix."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    path, _ = hf_dir
    ours = load_model(path).eval()
    apply_lora(ours, ["c_attn"], rank=4, alpha=8, additional_targets=extra)
    assert ours._lora_additional == ["embed_tokens", "lm_head"]
    L.keep_starting_modules(ours)
    randomise_lora(ours, seed=6)
    with torch.no_grad():
        ours.embed_tokens.weight.add_(torch.randn(ours.embed_tokens.weight.shape,
                                                  generator=torch.Generator().manual_seed(7)) * 0.1)
    save_adapter(ours, tmp_path / "adapter", {"base_model_name_or_path": str(path)})
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["modules_to_save"] == ["transformer.wte", "lm_head"] and config["ensure_weight_tying"] is True
    base = transformers.GPT2LMHeadModel.from_pretrained(path).eval()
    x = ids(5)
    with torch.no_grad():
        before = base(x).logits
        tuned = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
        assert torch.allclose(ours(x), tuned(x).logits, atol=1e-4, rtol=0)
        with tuned.disable_adapter():  # PEFT tied the pair in its copies, not by writing into the base's matrix
            assert torch.equal(tuned(x).logits, before)
        starting = L.adapters_disabled(ours)
        with starting:
            assert ours.lm_head.weight is ours.embed_tokens.weight
            assert torch.equal(ours(x), load_model(path).eval()(x))
    assert ours.lm_head.weight is ours.embed_tokens.weight  # the trained matrix is back
    again = load_model(path).eval()
    load_adapter(again, tmp_path / "adapter")
    assert torch.equal(again(x), ours(x))


@pytest.mark.parametrize("setting", [dict(alpha_pattern={"c_proj": 32}), dict(rank_pattern={"c_attn": 8}),
                                     dict(layers_to_transform=[1]), dict(bias="lora_only")])
def test_a_peft_adapter_with_settings_we_do_not_model_is_refused(tmp_path, hf_dir, setting):
    """Written by PEFT, as users bring them: per-module alpha or rank, some layers only, a bias. Read with
    one r and one alpha these would be another model than PEFT's (alpha_pattern loaded silently before)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    path, _ = hf_dir
    base = transformers.GPT2LMHeadModel.from_pretrained(path)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True, **setting)
    peft.get_peft_model(base, config).save_pretrained(tmp_path / "adapter")
    key = next(iter(setting))
    with pytest.raises(UserError) as err:
        load_adapter(load_model(path), tmp_path / "adapter")
    assert len(err.value.messages) == 1
    assert err.value.messages[0].startswith(f"{tmp_path / 'adapter' / 'adapter_config.json'}: {key} is ")
    assert "merge_and_unload()" in err.value.messages[0]
    # what would be accepted instead: bias "none" (the message said "absent, null or empty" for it too)
    assert ('expected "none"' if key == "bias" else "expected it absent, null or empty") in err.value.messages[0]


def test_seeded_lora_on_a_model_off_the_cpu_draws_the_cpu_a():
    """A seeded apply_lora on a model already on an accelerator (the meta device stands for CUDA here): A is drawn on
    the host from the seed, as on a CPU model (a generator on the model's device could not draw into it), then moved."""
    on_cpu, elsewhere = GPTModel(TINY, seed=1), GPTModel(TINY, seed=1).to("meta")
    apply_lora(on_cpu, "c_attn", rank=2, seed=3)
    apply_lora(elsewhere, "c_attn", rank=2, seed=3)
    moved = {n: p for n, p in elsewhere.named_parameters() if n.endswith("lora.A")}
    assert moved and all(p.device.type == "meta" for p in moved.values())
    expected = LoRALayer(TINY.emb_dim, 3 * TINY.emb_dim, rank=2, alpha=4, generator=torch.Generator().manual_seed(3))
    first = next(p for n, p in on_cpu.named_parameters() if n.endswith("lora.A"))
    assert torch.equal(first, expected.A)  # the first wrapped layer's A: the first draw of the seeded CPU generator
