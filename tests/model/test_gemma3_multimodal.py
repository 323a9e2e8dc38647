"""Gemma 3 4B / 12B / 27B: Gemma3ForConditionalGeneration read as its text decoder (pipeline.model.families.Wrapper),
written back around its source (pipeline.model.wrapped). transformers 5.24's modeling_gemma3.py is the reference:

- the module tree model.language_model (Gemma3TextModel), model.vision_tower, model.multi_modal_projector, lm_head
  (:747-911); save_pretrained (and the hub's files) spell the tensors language_model.model.*, vision_tower.*,
  multi_modal_projector.* (conversion_mapping.py:812-817, reversed); transformers reads both spellings;
- the text config: the config.json's text_config over Gemma3TextConfig's defaults (configuration_gemma3.py:73-95);
  the head tied by the top-level tie_word_embeddings (Gemma3Config, default true);
- with input_ids only, Gemma3Model runs the language model on the scaled embeddings with the causal masks
  (:842-900), so the logits are the decoder's: compared here with transformers' on a tiny checkpoint.

The CLI path (LoRA sft, merge, PEFT) is tests/acceptance/test_gemma3_multimodal_cli.py.
"""
from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import UserError
from pipeline.model.config import PRESETS, count_params, read_config
from pipeline.model.weights import load_model, save_hf, save_model
from tests.acceptance.harness import random_model
from tests.acceptance.test_gemma3_multimodal_cli import tiny_gemma3_vlm

transformers = pytest.importorskip("transformers")

TOWERS = ("model.vision_tower.", "model.multi_modal_projector.")


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """(the transformers model, its save_pretrained folder)."""
    folder = tmp_path_factory.mktemp("vlm") / "gemma-3-4b-it"
    model = tiny_gemma3_vlm()
    model.save_pretrained(folder)
    return model, folder


def ids():
    return torch.randint(0, 500, (2, 12), generator=torch.Generator().manual_seed(1))


def test_either_spelling_reads_as_the_decoder_with_transformers_logits(source, tmp_path):
    """The save_pretrained names (language_model.model.*) and the module tree's (model.language_model.*, as other
    writers spell them) load the same decoder, the vision tower read past; its logits are transformers'."""
    model, folder = source
    keys = list(load_file(folder / "model.safetensors"))
    assert any(k.startswith("language_model.model.") for k in keys) and any(k.startswith("vision_tower.") for k in keys)
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    (renamed / "config.json").write_bytes((folder / "config.json").read_bytes())
    tree = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    save_file({k: v.contiguous() for k, v in tree.items()}, renamed / "model.safetensors")
    cfg = read_config(folder)
    assert (cfg.wrapper, cfg.family, cfg.n_layers, cfg.tie_weights) == ("Gemma3ForConditionalGeneration", "gemma3", 3,
                                                                         True)
    with torch.no_grad():
        want = model(input_ids=ids()).logits
        for path in (folder, renamed):
            assert torch.allclose(load_model(path).eval()(ids()), want, atol=1e-5, rtol=0)


def test_full_weights_of_our_format_export_around_the_source(source, tmp_path):
    """full / freeze: the trained decoder in our own format (output_dir/model) keeps the wrapper; merge writes it
    around the source (save_hf's source): transformers loads a Gemma3ForConditionalGeneration with our logits, its
    vision tower and projector the source's tensors, equal; without the source checkpoint it is refused."""
    model, folder = source
    ours = load_model(folder)
    with torch.no_grad():
        ours.layers[1].mlp.up_proj.weight.add_(0.5)
    own = save_model(ours, tmp_path / "model")
    assert json.loads((own / "config.json").read_text())["wrapper"] == "Gemma3ForConditionalGeneration"
    again = load_model(own).eval()
    save_hf(again, tmp_path / "merged", source=folder)
    theirs = transformers.Gemma3ForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(theirs(input_ids=ids()).logits, again(ids()), atol=1e-5, rtol=0)
    before, after = model.state_dict(), theirs.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith(TOWERS))
    assert not torch.equal(before["model.language_model.layers.1.mlp.up_proj.weight"],
                           after["model.language_model.layers.1.mlp.up_proj.weight"])
    for where in (None, own):
        with pytest.raises(UserError, match="no Gemma3ForConditionalGeneration checkpoint.*; set model_name_or_path"):
            save_hf(again, tmp_path / "nowhere", source=where)


# the text_config of google/gemma-3-4b-it's, -12b-it's and -27b-it's config.json (the rest: Gemma3TextConfig's defaults)
SCALED = {"rope_scaling": {"factor": 8.0, "rope_type": "linear"}, "sliding_window": 1024, "model_type": "gemma3_text"}
HUB_TEXT = {
    "4b": {"hidden_size": 2560, "intermediate_size": 10240, "num_hidden_layers": 34, **SCALED},
    "12b": {"hidden_size": 3840, "intermediate_size": 15360, "num_hidden_layers": 48, "num_attention_heads": 16,
            "num_key_value_heads": 8, **SCALED},
    "27b": {"hidden_size": 5376, "intermediate_size": 21504, "num_hidden_layers": 62, "num_attention_heads": 32,
            "num_key_value_heads": 16, "head_dim": 128, "query_pre_attn_scalar": 168, **SCALED},
}
VISION = {"hidden_size": 1152, "image_size": 896, "intermediate_size": 4304, "model_type": "siglip_vision_model",
          "num_attention_heads": 16, "num_hidden_layers": 27, "patch_size": 14, "vision_use_head": False}


@pytest.mark.parametrize("size", HUB_TEXT)
def test_the_hub_configs_read_as_transformers_reads_them(tmp_path, size):
    """A config.json as the hub has it (a sparse text_config) reads as Gemma3Config reads it (Gemma3TextConfig's
    defaults for the rest), the decoder counting what transformers builds on the meta device; 4B's is the preset
    gemma-3-4b's decoder (hand count in test_gemma_3_4b_preset_counts_the_decoder)."""
    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "model_type": "gemma3", "eos_token_id": [1, 106],
           "mm_tokens_per_image": 256, "text_config": HUB_TEXT[size], "vision_config": VISION}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    cfg = read_config(tmp_path)
    theirs = transformers.Gemma3Config(**{k: v for k, v in raw.items() if k != "architectures"}).text_config
    assert (cfg.vocab_size, cfg.n_heads, cfg.kv_heads, cfg.head_dim, cfg.context_length, cfg.attention_scale) == (
        theirs.vocab_size, theirs.num_attention_heads, theirs.num_key_value_heads, theirs.head_dim,
        theirs.max_position_embeddings, theirs.query_pre_attn_scalar ** -0.5)
    assert [w is None for w in cfg.layer_windows] == [t == "full_attention" for t in theirs.layer_types]
    with torch.device("meta"):
        decoder = transformers.Gemma3TextModel(theirs)
    assert count_params(cfg) == sum(p.numel() for p in decoder.parameters())
    if size == "4b":
        assert cfg.replace(wrapper=None) == PRESETS["gemma-3-4b"]


def test_a_text_config_of_another_model_is_refused(tmp_path):
    raw = {"architectures": ["Gemma3ForConditionalGeneration"], "text_config": {**HUB_TEXT["4b"], "model_type": "x"}}
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(UserError, match="text_config.model_type is 'x'"):
        read_config(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(UserError, match="text_config is None; a Gemma3ForConditionalGeneration config.json holds"):
        read_config(tmp_path)


def test_gemma_3_4b_preset_counts_the_decoder():
    """Hand count: embeddings 262,208 x 2,560 = 671,252,480; per layer q / o 2,560 x 2,048 each, k / v 2,560 x 1,024
    each, q / k norms 256 each, MLP 3 x 2,560 x 10,240, four norms of 2,560: 94,382,592, x 34 = 3,209,008,128; final
    norm 2,560: 3,880,263,168. The card's "4B" is the whole image-text model, 4,300,079,472 with the SigLIP tower
    (416,866,032) and the projector (2,950,272): transformers' count on the meta device."""
    with torch.device("meta"):
        ref = transformers.Gemma3ForConditionalGeneration(transformers.Gemma3Config(text_config=HUB_TEXT["4b"],
                                                                                  vision_config=VISION))
    decoder = sum(p.numel() for p in ref.model.language_model.parameters())
    assert count_params(PRESETS["gemma-3-4b"]) == decoder == 3_880_263_168
    assert sum(p.numel() for p in ref.parameters()) == 4_300_079_472


def test_mistral3_is_a_second_row_logits_adapter_and_merge(tmp_path):
    """Mistral Small 3.1's class (Mistral3ForConditionalGeneration: a Pixtral tower and a projector around a Mistral
    decoder, here untied, its head saved as language_model.lm_head.weight) is the table's second row, no code of its
    own: our logits are transformers' (input_ids only); a LoRA adapter (every decoder Linear) loads in PEFT with our
    logits; merged and written around the source, transformers loads a Mistral3ForConditionalGeneration computing
    them, its tower and projector the source's tensors."""
    import peft

    from pipeline.model import lora

    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                head_dim=16, vocab_size=300, max_position_embeddings=128, sliding_window=None, rope_theta=10000.0)
    vision = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, head_dim=8,
                  image_size=28, patch_size=14)
    config = transformers.Mistral3Config(text_config=text, vision_config=vision, image_token_index=299,
                                         tie_word_embeddings=False)
    source = random_model(transformers.Mistral3ForConditionalGeneration, config)
    source.save_pretrained(tmp_path / "small")
    ours = load_model(tmp_path / "small").eval()
    assert (ours.cfg.wrapper, ours.cfg.family, ours.cfg.tie_weights) == ("Mistral3ForConditionalGeneration", "mistral",
                                                                         False)
    x = torch.randint(0, 290, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(ours(x), source(input_ids=x).logits, atol=1e-5, rtol=0)
        lora.apply_lora(ours, "all", rank=4, alpha=8)
        for name, p in ours.named_parameters():
            if "lora" in name:
                p.add_(torch.randn_like(p) * 0.1)
        want = ours(x)
    lora.save_adapter(ours, tmp_path / "adapter", {"base_model_name_or_path": str(tmp_path / "small")})
    adapted = peft.PeftModel.from_pretrained(
        transformers.Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "small"), tmp_path / "adapter").eval()
    lora.merge_lora(ours)
    save_hf(ours, tmp_path / "merged", source=tmp_path / "small")
    theirs = transformers.Mistral3ForConditionalGeneration.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        assert torch.allclose(adapted(input_ids=x).logits, want, atol=1e-5, rtol=0)
        assert torch.allclose(theirs(input_ids=x).logits, want, atol=1e-5, rtol=0)
    before, after = source.state_dict(), theirs.state_dict()
    towers = [k for k in before if k.startswith(TOWERS)]
    assert towers and all(torch.equal(before[k], after[k]) for k in towers)
