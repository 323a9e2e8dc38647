"""Qwen2-VL / Qwen2.5-VL and Qwen3-VL read as their text decoders (pipeline.model.families.Wrapper rows
Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration, Qwen3VLForConditionalGeneration) and written back
around their source (pipeline.model.wrapped). transformers 5.24 is the reference:

- modeling_qwen2_5_vl.py:866-876 / :1260-1269 (and Qwen2-VL's): model.visual, model.language_model (Qwen2's blocks),
  lm_head; save_pretrained and the hub spell the decoder model.* and the tower visual.* (conversion_mapping.py:1074-1080
  reversed on save; :142-143 send Qwen2.5-VL there); the hub's config.json holds the text keys at its top level
  (Qwen2_5_VLConfig.__post_init__ reads them there), rope_scaling {"type": "mrope", "mrope_section": [...]};
- modeling_qwen3_vl.py: the same tree around Qwen3's blocks, files spelled as the module tree, a text_config with
  rope_parameters {"mrope_section": [...], "mrope_interleaved": true};
- on text (input_ids, an attention mask, no pixel values) the three position streams are one position
  (Qwen2_5_VLTextModel.forward: `position_ids.view(1, 1, -1).expand(3, ...)`), so the multimodal rotation is the
  plain 1-D RoPE, and Qwen3-VL's deepstack adds nothing (visual_pos_masks is None): the logits below, on padded
  batches and through greedy generation with and without the cache, are transformers' from our Qwen2 / Qwen3
  decoder.

The CLI path (LoRA sft, merge, PEFT) is tests/acceptance/test_vl_text_cli.py.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from pipeline.model import lora
from pipeline.model.config import count_params, read_config
from pipeline.model.weights import load_model, save_hf, save_model
from tests.acceptance.harness import random_model
from tests.model import test_families as families
from tests.model.test_families import (test_greedy_generation_equals_transformers_with_and_without_cache,  # noqa: F401
                                       test_padded_batch_logits_equal_transformers)

transformers = pytest.importorskip("transformers")

VOCAB = families.VOCAB
TEXT = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            vocab_size=VOCAB, max_position_embeddings=256, bos_token_id=1, eos_token_id=2)
MROPE = [4, 2, 2]  # 8 rotary pairs of a 16-wide head: time, height, width
SPECIAL = dict(image_token_id=VOCAB - 3, video_token_id=VOCAB - 4, vision_start_token_id=VOCAB - 2,
               vision_end_token_id=VOCAB - 1)


def qwen_vl(name: str, seed: int = 0):
    """A random tiny image-text Qwen of the variant (a one-block vision tower and merger)."""
    if name == "qwen2_5_vl":  # the 7B's features: GQA, q / k / v biases, untied
        config = transformers.Qwen2_5_VLConfig(
            text_config={**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": MROPE}, "rope_theta": 500.0},
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=64,
                               patch_size=2, spatial_merge_size=2, temporal_patch_size=2, window_size=8,
                               fullatt_block_indexes=[0]), tie_word_embeddings=False, **SPECIAL)
        return random_model(transformers.Qwen2_5_VLForConditionalGeneration, config, seed=seed)
    if name == "qwen2_vl-tied":  # Qwen2-VL-2B's: tied
        config = transformers.Qwen2VLConfig(
            text_config={**TEXT, "rope_scaling": {"type": "mrope", "mrope_section": MROPE}},
            vision_config=dict(depth=1, embed_dim=16, hidden_size=64, mlp_ratio=2, num_heads=2, patch_size=2,
                               spatial_merge_size=2, temporal_patch_size=2), tie_word_embeddings=True, **SPECIAL)
        return random_model(transformers.Qwen2VLForConditionalGeneration, config, seed=seed + 1)  # a varied greedy
    # qwen3_vl: Qwen3's q / k norms, an explicit head_dim, the interleaved multimodal rope, deepstack in the tower
    config = transformers.Qwen3VLConfig(
        text_config={**TEXT, "head_dim": 16, "rope_parameters": {
            "rope_type": "default", "rope_theta": 5000.0, "mrope_section": MROPE, "mrope_interleaved": True}},
        vision_config=dict(depth=2, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=64, patch_size=2,
                           spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                           deepstack_visual_indexes=[0, 1]), tie_word_embeddings=False, **SPECIAL)
    return random_model(transformers.Qwen3VLForConditionalGeneration, config, seed=seed)


VARIANTS = ("qwen2_5_vl", "qwen2_vl-tied", "qwen3_vl")
checkpoint = families.variant_checkpoints(qwen_vl, VARIANTS)  # the family tests imported above run on it


@pytest.fixture(autouse=True)
def _one_qwen2_decoder(request):
    """Padded batches and greedy decoding run on Qwen2.5-VL's and Qwen3-VL's decoders: Qwen2.5-VL's text model is
    Qwen2-VL's, copied by the modular converter (modular_qwen2_5_vl.py:307, Qwen2_5_VLModel(Qwen2VLModel)); Qwen2-VL's
    logits and adapter are checked below."""
    shared = request.node.originalname in ("test_padded_batch_logits_equal_transformers",
                                           "test_greedy_generation_equals_transformers_with_and_without_cache")
    if shared and request.node.callspec.params.get("checkpoint") == "qwen2_vl-tied":
        pytest.skip("Qwen2-VL's text model is Qwen2.5-VL's: one of the two runs the shared family tests")
ROW = {"qwen2_5_vl": ("Qwen2_5_VLForConditionalGeneration", "qwen2", False),
       "qwen2_vl-tied": ("Qwen2VLForConditionalGeneration", "qwen2", True),
       "qwen3_vl": ("Qwen3VLForConditionalGeneration", "qwen3", False)}


def ids(seed=0, shape=(2, 12)):
    return torch.randint(0, VOCAB - 4, shape, generator=torch.Generator().manual_seed(seed))


def hub_form(folder, out):
    """The checkpoint as the hub has Qwen2.5-VL: the text keys at the top level of config.json (no text_config),
    rope_scaling {"type": "mrope", ...}; the tensors as they are."""
    raw = json.loads((folder / "config.json").read_text())
    text = raw.pop("text_config")
    text.pop("model_type")
    rope = text.pop("rope_parameters")
    out.mkdir()
    (out / "config.json").write_text(json.dumps({**raw, **text, "rope_theta": rope["rope_theta"], "rope_scaling": {
        "type": "mrope", "mrope_section": rope["mrope_section"]}}))
    (out / "model.safetensors").write_bytes((folder / "model.safetensors").read_bytes())
    return out


def test_the_decoder_is_read_with_transformers_logits(checkpoint, tmp_path):
    """The row, family and tie; the tower read past (the decoder counts what transformers' language model holds);
    logits equal transformers' from the saved files and, for Qwen2.5-VL, from the hub's flat config.json too."""
    name, path, ref = checkpoint
    keys = list(load_file(path / "model.safetensors"))
    tower = "model.visual." if name.startswith("qwen3") else "visual."
    assert any(k.startswith(tower) for k in keys)
    ours = load_model(path).eval()
    assert (ours.cfg.wrapper, ours.cfg.family, ours.cfg.tie_weights) == ROW[name]
    assert count_params(ours.cfg) == sum(p.numel() for p in ref.model.language_model.parameters()) + (
        0 if ours.cfg.tie_weights else ref.lm_head.weight.numel())
    x = ids()
    with torch.no_grad():
        want = ref(input_ids=x).logits
        assert torch.allclose(ours(x), want, atol=1e-4, rtol=0)
        if name == "qwen2_5_vl":
            flat = hub_form(path, tmp_path / "hub")
            assert read_config(flat) == ours.cfg
            theirs = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(flat).eval()
            assert torch.allclose(theirs(input_ids=x).logits, want, atol=1e-6, rtol=0)


def test_an_adapter_loads_in_peft_and_the_merge_around_the_source_is_the_same_class(checkpoint, tmp_path):
    """LoRA on every decoder Linear (full module paths in adapter_config.json, as LLaMA-Factory's patch_target_modules
    writes them: the tower's blocks have qkv / proj and gate / up / down_proj Linears of their own): PEFT on the
    source computes our logits and leaves the tower alone; merged and written around the source, transformers loads
    the same class with our logits, every tower tensor the source's, the config's multimodal rope kept."""
    import peft

    name, path, source = checkpoint
    ours = load_model(path).eval()
    lora.apply_lora(ours, "all", rank=4, alpha=8)
    families.randomise_lora(ours, seed=1)
    x = ids(3)
    with torch.no_grad():
        want = ours(x)
    lora.save_adapter(ours, tmp_path / "adapter", {"base_model_name_or_path": str(path)})
    targets = json.loads((tmp_path / "adapter/adapter_config.json").read_text())["target_modules"]
    assert targets and all(t.startswith("model.language_model.layers.") for t in targets), targets
    cls = type(source)
    adapted = peft.PeftModel.from_pretrained(cls.from_pretrained(path), tmp_path / "adapter").eval()
    assert not any("visual" in n for n, _ in adapted.named_parameters() if "lora_" in n)
    lora.merge_lora(ours)
    save_hf(ours, tmp_path / "merged", source=path)
    theirs = cls.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=x).logits, want, atol=1e-4, rtol=0)
        assert torch.allclose(theirs(input_ids=x).logits, want, atol=1e-4, rtol=0)
    before, after = source.state_dict(), theirs.state_dict()
    towers = [k for k in before if k.startswith("model.visual.")]
    assert len(towers) > 10 and all(torch.equal(before[k], after[k]) for k in towers)
    written = set(load_file(tmp_path / "merged/model.safetensors"))
    assert written == set(load_file(path / "model.safetensors"))  # the source's spelling, tensor for tensor
    config = json.loads((tmp_path / "merged/config.json").read_text())
    text = config["text_config"]
    assert (config["architectures"], text["model_type"], text["rope_parameters"]["mrope_section"]) == (
        [cls.__name__], ours.cfg.hf.model_type.replace("vl", "vl_text"), MROPE)


def test_hub_flat_config_exports_flat_and_full_weights_keep_the_wrapper(checkpoint, tmp_path):
    """Qwen2.5-VL's hub form: full fine-tuning's weights (our format) keep the row; written around the flat source
    the config stays flat (no text_config appears, rope_scaling keeps its mrope_section) and loads with our logits."""
    name, path, source = checkpoint
    if name != "qwen2_5_vl":
        pytest.skip("the hub's flat config.json is Qwen2-VL / Qwen2.5-VL's; one variant covers it")
    flat = hub_form(path, tmp_path / "hub")
    ours = load_model(flat)
    with torch.no_grad():
        ours.layers[0].mlp.up_proj.weight.add_(0.5)
    again = load_model(save_model(ours, tmp_path / "model")).eval()
    assert again.cfg.wrapper == "Qwen2_5_VLForConditionalGeneration"
    save_hf(again, tmp_path / "merged", source=flat)
    config = json.loads((tmp_path / "merged/config.json").read_text())
    assert "text_config" not in config and config["model_type"] == "qwen2_5_vl"
    assert config["rope_parameters"]["mrope_section"] == MROPE and config["hidden_size"] == 64
    theirs = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(theirs(input_ids=ids()).logits, again(ids()), atol=1e-4, rtol=0)
        assert (again(ids()) - source(input_ids=ids()).logits).abs().max() > 1e-2


# Qwen/Qwen2.5-VL-7B-Instruct's config.json (its text keys; the vision_config left out: carried) and
# Qwen/Qwen3-VL-8B-Instruct's text_config
HUB_QWEN2_5_VL_7B = {
    "architectures": ["Qwen2_5_VLForConditionalGeneration"], "model_type": "qwen2_5_vl", "hidden_size": 3584,
    "intermediate_size": 18944, "max_position_embeddings": 128000, "max_window_layers": 28, "num_attention_heads": 28,
    "num_hidden_layers": 28, "num_key_value_heads": 4, "rms_norm_eps": 1e-06, "rope_theta": 1000000.0,
    "sliding_window": 32768, "tie_word_embeddings": False, "use_sliding_window": False, "vocab_size": 152064,
    "rope_scaling": {"type": "mrope", "mrope_section": [16, 24, 24]}, "bos_token_id": 151643, "eos_token_id": 151645}
HUB_QWEN3_VL_8B = {
    "architectures": ["Qwen3VLForConditionalGeneration"], "model_type": "qwen3_vl", "tie_word_embeddings": False,
    "text_config": {"model_type": "qwen3_vl_text", "hidden_size": 4096, "intermediate_size": 12288,
                    "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
                    "max_position_embeddings": 262144, "rms_norm_eps": 1e-06, "vocab_size": 151936,
                    "rope_scaling": {"mrope_interleaved": True, "mrope_section": [24, 20, 20], "rope_type": "default"},
                    "rope_theta": 5000000, "attention_bias": False}}


@pytest.mark.parametrize("raw, cls", [(HUB_QWEN2_5_VL_7B, "Qwen2_5_VLConfig"), (HUB_QWEN3_VL_8B, "Qwen3VLConfig")])
def test_the_hub_configs_read_as_transformers_reads_them(tmp_path, raw, cls):
    """The hub's config.json reads as transformers' config class reads it (theta, heads, positions, tie), and the
    decoder counts what transformers builds on the meta device (7,615,616,512 and 8,190,735,360 without the tower: Qwen2.5-7B's and Qwen3-8B's)."""
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = read_config(tmp_path)
    theirs = getattr(transformers, cls)(**{k: v for k, v in raw.items() if k != "architectures"})
    text = theirs.text_config
    assert (cfg.vocab_size, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.context_length, cfg.rope_theta,
            cfg.rope_scaling, cfg.tie_weights, cfg.norm_eps) == (
        text.vocab_size, text.num_attention_heads, text.num_key_value_heads, 128, text.max_position_embeddings,
        text.rope_parameters["rope_theta"], None, theirs.tie_word_embeddings, text.rms_norm_eps)
    assert not any(cfg.layer_windows)
    with torch.device("meta"):
        model = getattr(transformers, cls.replace("Config", "ForConditionalGeneration"))(theirs)
    decoder = sum(p.numel() for p in model.model.language_model.parameters()) + model.lm_head.weight.numel()
    assert count_params(cfg) == decoder == {"Qwen2_5_VLConfig": 7_615_616_512, "Qwen3VLConfig": 8_190_735_360}[cls]


def test_a_tie_inside_the_text_config_ties_qwen2_vl_as_transformers_does(tmp_path):
    """Qwen2VLConfig / Qwen2_5_VLConfig tie where the text_config says tie_word_embeddings true and the top level does
    not (configuration_qwen2_vl.py:184-188, pre-v5 saves); Qwen3VLConfig reads the top level only."""
    text = {k: v for k, v in HUB_QWEN3_VL_8B["text_config"].items() if k != "model_type"}
    for arch, cls, model_type in (("Qwen2_5_VLForConditionalGeneration", "Qwen2_5_VLConfig", "qwen2_5_vl"),
                                  ("Qwen3VLForConditionalGeneration", "Qwen3VLConfig", "qwen3_vl")):
        raw = {"model_type": model_type, "text_config": {**text, "tie_word_embeddings": True}}
        (tmp_path / "config.json").write_text(json.dumps({"architectures": [arch], **raw}))
        assert read_config(tmp_path).tie_weights == getattr(transformers, cls)(**raw).tie_word_embeddings == (
            model_type == "qwen2_5_vl")
