"""The Gemma 2 user path through the CLI: a Gemma2ForCausalLM as transformers' save_pretrained writes it (final logit
and attention softcaps small enough to bind, a window in every other layer: tests/model/test_gemma.py) with a
tokenizer in Gemma's form (tests/helpers/gemma_vocab.py), a LoRA sft recipe with template gemma -> build / train /
merge as typed. LoRA freezes the softcapped head, so the training loss is the chunked one, each row block capped
(pipeline.model.head_loss; tests/model/test_softcap_chunked.py checks its value and gradients against
transformers'); merged/ loads in transformers as Gemma2ForCausalLM with the caps kept, and it and PEFT's reading of
adapter/ compute what our trained model computes. Passed before the chunked cap too (the plain path trained the same
model): this guards the user path."""
from __future__ import annotations

import json

from tests.acceptance.harness import assert_outputs_compute_ours, pipeline, random_model, write_recipe
from tests.helpers.gemma_vocab import VOCAB_SIZE, write_gemma_tokenizer_dir

TINY = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
            head_dim=16, query_pre_attn_scalar=12, sliding_window=6, attn_logit_softcapping=5.0,
            final_logit_softcapping=3.0, max_position_embeddings=256, vocab_size=VOCAB_SIZE)


def saved_gemma2(folder):
    """save_pretrained of a random tiny Gemma2ForCausalLM beside a Gemma-form tokenizer in `folder`; the model."""
    import transformers

    write_gemma_tokenizer_dir(folder)
    model = random_model(transformers.Gemma2ForCausalLM, transformers.Gemma2Config(**TINY))
    model.save_pretrained(folder)
    return model


def test_lora_sft_from_a_save_pretrained_gemma2_merges_to_gemma2(workdir):
    import torch
    import transformers

    model = saved_gemma2(base := workdir / "gemma-2-2b-it")
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path=str(base), dataset_dir="data", template="gemma",
                          output_dir="saves/r", learning_rate=0.05, cutoff_len=256)  # a small vocabulary: long rows
    for command in ("build", "train", "merge"):
        pipeline(command, recipe, cwd=workdir)
    config = json.loads((workdir / "saves/r/merged/config.json").read_text())
    assert (config["architectures"], config["final_logit_softcapping"], config["attn_logit_softcapping"]) == (
        ["Gemma2ForCausalLM"], 3.0, 5.0)
    theirs = transformers.AutoModelForCausalLM.from_pretrained(workdir / "saves/r/merged").eval()
    x, want = assert_outputs_compute_ours(recipe, workdir, base, theirs, VOCAB_SIZE)
    with torch.no_grad():  # and the run trained: not the base's logits
        assert (want - model(x).logits).abs().max() > 1e-3
