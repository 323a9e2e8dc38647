"""Mistral Small 3.1 and Qwen2.5-VL users through the CLI, on text data: a Mistral3ForConditionalGeneration (a tiny
Pixtral tower and projector around a 2-layer Mistral decoder, untied) with a Tekken-like tokenizer, and a
Qwen2_5_VLForConditionalGeneration (a tiny vision transformer around a 2-layer Qwen2 decoder) with Qwen's markup, as
transformers' save_pretrained writes them (the hub's spellings: language_model.model.* / model.*, visual.*) ->
an LLaMA-Factory-format LoRA sft recipe with template mistral_small / qwen2_vl -> build (in this process), train and
merge as typed. merged/ loads in transformers as the same class with our trained model's text logits (input_ids only), every tower
tensor the source's, the processor file its bytes, the tensor names the source's; PEFT loads adapter/ (the decoder's
modules by full path) onto the source with our logits; the chat template merge wrote renders training's prompt
ids. Failed before: template mistral_small and Qwen2_5_VLForConditionalGeneration were unknown (refused at validate).
"""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from tests.acceptance.harness import (assert_image_text_outputs, exported_prompt, pipeline, random_model, refused,
                                      write_recipe)

PROCESSOR = {"image_processor_type": "PixtralImageProcessor", "patch_size": {"height": 14, "width": 14}}
CASES = {  # template, transformers class, the tokenizer's markup (tests/helpers/hf_vocab.py), the towers' prefix
    "mistral3": ("mistral_small", "Mistral3ForConditionalGeneration", "mistral_tekken",
                 ("model.vision_tower.", "model.multi_modal_projector.")),
    "qwen2_5_vl": ("qwen2_vl", "Qwen2_5_VLForConditionalGeneration", "qwen2", ("model.visual.",)),
}


def tiny_checkpoint(name: str, folder):
    """The random tiny image-text model saved with its small tokenizer (generation_config.json kept as the tokenizer
    wrote it) and an image processor file; returns the model."""
    import transformers

    from tests.helpers.hf_vocab import write_small_tokenizer_dir

    size = write_small_tokenizer_dir(folder, CASES[name][2])
    generation = json.loads((folder / "generation_config.json").read_text())
    eos = generation["eos_token_id"]
    text = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, head_dim=8, vocab_size=size, max_position_embeddings=256,
                eos_token_id=eos[0] if isinstance(eos, list) else eos, bos_token_id=generation.get("bos_token_id"))
    if name == "mistral3":
        config = transformers.Mistral3Config(
            text_config={**text, "sliding_window": None, "rope_theta": 1000000000.0},
            vision_config=dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2,
                               head_dim=8, image_size=28, patch_size=14),
            image_token_index=5, tie_word_embeddings=False)
    else:
        config = transformers.Qwen2_5_VLConfig(
            text_config={**text, "rope_scaling": {"type": "mrope", "mrope_section": [2, 1, 1]}},
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=24, num_heads=2, out_hidden_size=32,
                               patch_size=2, spatial_merge_size=2, temporal_patch_size=2, window_size=8,
                               fullatt_block_indexes=[0]),
            image_token_id=5, video_token_id=6, vision_start_token_id=7, vision_end_token_id=8)
    model = random_model(getattr(transformers, CASES[name][1]), config)
    model.save_pretrained(folder)
    (folder / "generation_config.json").write_text(json.dumps(generation))
    (folder / "preprocessor_config.json").write_text(json.dumps(PROCESSOR), encoding="utf-8")
    return model


@pytest.mark.parametrize("name", list(CASES))
def test_lora_sft_on_text_merges_back_to_the_image_text_class(workdir, name):
    import torch

    template, cls, _, towers = CASES[name]
    base = workdir / cls
    source = tiny_checkpoint(name, base)
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(base), dataset_dir="data", template=template,
                          output_dir="saves/r", learning_rate=0.05, cutoff_len=128)
    message = refused("validate", recipe, "stage=rm", cwd=workdir, as_typed=False)  # no reward class to write
    assert (f"this {cls} is an image-text checkpoint (transformers has no sequence-classification class for {cls}"
            in message), message
    pipeline("build", recipe, cwd=workdir, as_typed=False)  # in this process (as typed in the other CLI tests)
    for stage in ("train", "merge"):
        pipeline(stage, recipe, cwd=workdir)
    merged = workdir / "saves/r/merged"
    merged_config = json.loads((merged / "config.json").read_text())
    adapter = json.loads((workdir / "saves/r/adapter/adapter_config.json").read_text())
    assert merged_config["architectures"] == [cls]
    assert (merged / "preprocessor_config.json").read_bytes() == (base / "preprocessor_config.json").read_bytes()
    assert set(load_file(merged / "model.safetensors")) == set(load_file(base / "model.safetensors"))
    assert adapter["base_model_name_or_path"] == str(base)
    assert adapter["target_modules"] and all(t.startswith("model.language_model.layers.")
                                             for t in adapter["target_modules"]), adapter
    prompt = exported_prompt(merged, base, template)
    assert prompt.startswith("<s>[SYSTEM_PROMPT]Be brief.[/SYSTEM_PROMPT][INST]" if name == "mistral3"
                             else "<|im_start|>system\nBe brief.<|im_end|>\n"), prompt

    x = torch.randint(10, source.config.text_config.vocab_size - 30, (2, 20), generator=torch.Generator().manual_seed(0))
    assert_image_text_outputs(recipe, workdir, base, source, towers, x)
    if name == "qwen2_5_vl":  # the multimodal rope kept for images; the notice names the checkpoint's own template
        assert merged_config["text_config"]["rope_parameters"]["mrope_section"] == [2, 1, 1]
        plain = write_recipe(workdir / "plain.yaml", model_name_or_path=str(base), dataset_dir="data", template=None,
                             cutoff_len=256)
        notice = pipeline("validate", plain, cwd=workdir, as_typed=False).stderr  # no template: the notice
        assert "whose own chat format is template: qwen2_vl" in notice, notice
