"""The Granite 3.x and OLMo 2 user paths through the CLI: a GraniteForCausalLM (tied, as every Granite 3 checkpoint, its
four multipliers far from 1) / an Olmo2ForCausalLM (post-branch norms, whole-projection q/k norms, GQA) as
transformers' save_pretrained writes it, with a small byte-level tokenizer holding the family's special tokens, an
LLaMA-Factory-format LoRA sft recipe with template granite3 / olmo and lora_target all -> build / train / merge;
merged/ loads in transformers as the family's class and PEFT reads adapter/, both computing what our trained model
computes; the exported chat template renders the training prompt."""
from __future__ import annotations

import json

import pytest

from tests.acceptance.harness import (assert_outputs_compute_ours, exported_prompt, pipeline, refused,
                                     save_pretrained_small, write_recipe)

SHAPE = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
CASES = {  # template -> (vocabulary, class, config class, config keys, the prompt's text as the export renders it)
    "granite3": ("granite3", "GraniteForCausalLM", "GraniteConfig",
                 dict(tie_word_embeddings=True, embedding_multiplier=6.0, attention_multiplier=0.05,
                      residual_multiplier=0.3, logits_scaling=4.0),
                 "<|start_of_role|>system<|end_of_role|>Be brief.<|end_of_text|>\n<|start_of_role|>user<|end_of_role|>"
                 "Name a colour.<|end_of_text|>\n<|start_of_role|>assistant<|end_of_role|>"),
    "olmo": ("olmo2", "Olmo2ForCausalLM", "Olmo2Config", dict(tie_word_embeddings=False),
             "<|endoftext|>Be brief.<|user|>\nName a colour.<|assistant|>\n"),
}


@pytest.mark.parametrize("template", list(CASES))
def test_lora_sft_from_a_save_pretrained_checkpoint_merges_to_its_class(workdir, template):
    import torch
    import transformers

    vocab, architecture, config_class, keys, rendered = CASES[template]
    base = workdir / vocab
    save_pretrained_small(base, vocab, architecture, config_class, ("bos_token_id", "eos_token_id", "pad_token_id"),
                          **SHAPE, **keys)
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(base), dataset_dir="data", template=template,
                          lora_target="all", output_dir="saves/r", learning_rate=0.05)
    # Granite's path as typed; OLMo 2's build and merge in this process (the same commands; its training as typed)
    typed = template == "granite3"
    if typed:  # transformers has no GraniteForSequenceClassification: a Granite reward model is refused up front
        message = refused("validate", recipe, "stage=rm", cwd=workdir, as_typed=False)
        assert "stage: given 'rm', but transformers has no sequence-classification class for this GraniteForCausalLM" \
            in message, message
        # a recipe without template gets the notice naming Granite's own (FAMILY_TEMPLATES; its data is not built:
        # validate's refusal of that follows the notice)
        told = pipeline("validate", write_recipe(workdir / "n.yaml", model_name_or_path=str(base), dataset_dir="data",
                                                 template=None), cwd=workdir, as_typed=False, expect=None).stderr
        assert "this granite model, whose own chat format is template: granite3" in told, told
    pipeline("build", recipe, cwd=workdir, as_typed=typed)
    pipeline("train", recipe, cwd=workdir)
    pipeline("merge", recipe, cwd=workdir, as_typed=typed)
    merged = workdir / "saves/r/merged"
    config = json.loads((merged / "config.json").read_text())
    assert config["architectures"] == [architecture]
    if template == "granite3":  # the multipliers written back as GraniteConfig reads them
        assert {k: config[k] for k in keys} == keys
    adapter = json.loads((workdir / "saves/r/adapter/adapter_config.json").read_text())
    assert adapter["target_modules"] == sorted(["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                                "down_proj"])
    theirs = transformers.AutoModelForCausalLM.from_pretrained(merged).eval()
    assert type(theirs).__name__ == architecture
    x, want = assert_outputs_compute_ours(recipe, workdir, base, theirs, config["vocab_size"])
    with torch.no_grad():  # and the run trained: not the base's logits
        assert (want - transformers.AutoModelForCausalLM.from_pretrained(base)(x).logits).abs().max() > 1e-3
    # the export's chat template renders the prompt training builds
    assert exported_prompt(merged, base, template) == rendered
