"""The Gemma 3 4B / 12B / 27B user path through the CLI: a Gemma3ForConditionalGeneration (a tiny SigLIP vision tower
and projector around a 3-layer Gemma 3 decoder) as transformers' save_pretrained writes it, with a tokenizer of
Gemma's form (tests/helpers/gemma_vocab.py) and an image processor file, an LLaMA-Factory-format LoRA sft recipe with
template gemma3 -> build / train / merge as typed. merged/ loads in transformers as Gemma3ForConditionalGeneration and
computes our trained model's text logits (input_ids only); its vision tower and projector are the source's tensors,
equal, and its image processor file the source's bytes; PEFT loads adapter/ onto the source with our logits (its
target_modules the language model's full module names, none of the vision tower's). A dataset with an images column
is refused at validate (exit 2). Failed before: Gemma3ForConditionalGeneration was refused at validate."""
from __future__ import annotations

import json

from tests.acceptance.harness import assert_image_text_outputs, pipeline, random_model, refused, write_recipe
from tests.helpers.gemma_vocab import VOCAB_SIZE, write_gemma_tokenizer_dir

TEXT = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=3, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, query_pre_attn_scalar=12, sliding_window=6, sliding_window_pattern=3, rope_theta=10000.0,
            rope_local_base_freq=100.0, max_position_embeddings=256, vocab_size=VOCAB_SIZE)
VISION = dict(hidden_size=16, intermediate_size=24, num_hidden_layers=1, num_attention_heads=2, image_size=28,
              patch_size=14)
PROCESSOR = {"image_processor_type": "Gemma3ImageProcessor", "size": {"height": 28, "width": 28}}


def tiny_gemma3_vlm():
    """A random Gemma3ForConditionalGeneration of tiny shapes (4 image tokens; the image ids inside the vocabulary)."""
    import transformers

    config = transformers.Gemma3Config(text_config=TEXT, vision_config=VISION, mm_tokens_per_image=4,
                                       boi_token_index=VOCAB_SIZE - 3, eoi_token_index=VOCAB_SIZE - 2,
                                       image_token_index=VOCAB_SIZE - 1)
    return random_model(transformers.Gemma3ForConditionalGeneration, config)


def test_lora_sft_of_a_gemma3_image_text_checkpoint_merges_to_one(workdir):
    import torch

    base = workdir / "gemma-3-4b-it"
    write_gemma_tokenizer_dir(base)
    source = tiny_gemma3_vlm()
    source.save_pretrained(base)
    (base / "preprocessor_config.json").write_text(json.dumps(PROCESSOR), encoding="utf-8")
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(base), dataset_dir="data", template="gemma3",
                          output_dir="saves/r", learning_rate=0.05, cutoff_len=256)
    info = json.loads((workdir / "data/dataset_info.json").read_text())
    info["pictures"] = {"file_name": "raw/sft.jsonl", "columns": {"images": "images"}}
    (workdir / "data/dataset_info.json").write_text(json.dumps(info))
    message = refused("validate", recipe, "dataset=pictures", cwd=workdir)
    assert "multimodal data (images) is not supported" in message and "vision tower" in message, message
    # stage rm: transformers' Gemma3ForSequenceClassification exists (modeling_gemma3.py:1069), scoring with the whole
    # image-text model; stage rm writes a text decoder's reward class: refused saying so, and what to start from
    message = refused("validate", recipe, "stage=rm", cwd=workdir, as_typed=False)
    assert ("stage: given 'rm', but stage rm writes a text decoder's reward model and this "
            "Gemma3ForConditionalGeneration is an image-text checkpoint (transformers' Gemma3ForSequenceClassification "
            "scores with the whole image-text model, which is not written here), so the reward model could not be "
            "written or read back; train the reward model on a text-only Gemma3ForCausalLM checkpoint (its reward "
            "model is a Gemma3TextForSequenceClassification)") in message, message
    for stage in ("build", "train", "merge"):
        pipeline(stage, recipe, cwd=workdir)

    merged = workdir / "saves/r/merged"
    config = json.loads((merged / "config.json").read_text())
    assert (config["architectures"], config["model_type"], config["vision_config"]["hidden_size"],
            config["text_config"]["layer_types"]) == (["Gemma3ForConditionalGeneration"], "gemma3", 16,
                                                     ["sliding_attention", "sliding_attention", "full_attention"])
    assert (merged / "preprocessor_config.json").read_bytes() == (base / "preprocessor_config.json").read_bytes()
    adapter = json.loads((workdir / "saves/r/adapter/adapter_config.json").read_text())
    assert adapter["base_model_name_or_path"] == str(base)
    assert all(t.startswith("model.language_model.layers.") for t in adapter["target_modules"]), adapter

    x = torch.randint(0, VOCAB_SIZE - 3, (2, 20), generator=torch.Generator().manual_seed(0))
    assert_image_text_outputs(recipe, workdir, base, source, ("model.vision_tower.", "model.multi_modal_projector."), x)
