"""PiSSA adapters and adapters on a tied head that PEFT 0.21 itself wrote, brought to the CLI as a user brings them:
LLaMA-Factory's merge recipe run with `python -m pipeline export` (in process: main(argv); the as-typed export of a
PEFT-written adapter is test_peft_written_adapters'), the export loaded in transformers, PEFT's logits the golden.

The base: a tiny save_pretrained Qwen2ForCausalLM with tie_word_embeddings (one matrix for embedding and head).
PiSSA as LLaMA-Factory 0.9.5 writes it with pissa_init + pissa_convert (train/callbacks.py PissaConvertCallback):
output_dir/pissa_init/ (the start, init_lora_weights true), output_dir/ (the adapter as trained: init_lora_weights
"pissa", its pairs on the residual base) and output_dir/pissa_converted/ (save_pretrained with
path_initial_model_for_weight_conversion: a plain LoRA of rank 2r on the original base)."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.acceptance.harness import refused, write_hf_checkpoint
from tests.acceptance.test_peft_written_adapters import RANK, ALPHA, assert_merged_is_peft_merge, logits, \
    merge_recipe, randomised

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("pissa_tied")
    write_hf_checkpoint(root / "base", "qwen2", small_vocab=True)  # tie_word_embeddings: true
    return root


def base_model(root: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(root / "base")


def test_a_pissa_adapter_peft_converted_merges_and_the_unconverted_one_is_refused(root):
    """pissa_converted/ merges to PEFT's merge of it on the original base, which is the trained PiSSA model. The
    unconverted output_dir (a merge recipe copied from LLaMA-Factory's names it) exits 2 in one message pointing at
    pissa_converted/: before, it merged as a plain LoRA on the original base, another model without an error. A
    pissa_converted/ path under a run of this pipeline (whose adapter/ is the converted one) says so."""
    tuned = peft.get_peft_model(base_model(root), peft.LoraConfig(r=RANK, lora_alpha=ALPHA, init_lora_weights="pissa",
                                                                  target_modules=["q_proj", "v_proj"]))
    run = root / "saves/pissa"
    config = tuned.peft_config["default"]
    config.init_lora_weights = True  # PissaConvertCallback.on_train_begin: the start, saved as a plain LoRA
    tuned.save_pretrained(run / "pissa_init")
    config.init_lora_weights = "pissa"
    randomised(tuned)  # trained
    trained = logits(tuned)
    tuned.save_pretrained(run)  # the adapter as trained (LLaMA-Factory's output_dir)
    tuned.save_pretrained(run / "pissa_converted", path_initial_model_for_weight_conversion=str(run / "pissa_init"))
    theirs = peft.PeftModel.from_pretrained(base_model(root), run / "pissa_converted")
    assert (logits(theirs) - trained).abs().max() <= 1e-4  # PEFT's conversion is the trained model
    assert_merged_is_peft_merge(root, "saves/pissa/pissa_converted", theirs, template="qwen")

    err = refused("export", merge_recipe(root, "saves/pissa", "qwen"), cwd=root)  # as typed: the silent merge it was
    assert err.count("error:") == 1 and 'init_lora_weights is "pissa"' in err, err
    assert "set adapter_name_or_path: saves/pissa/pissa_converted, which holds it" in err, err
    assert not (root / "saves/pissa-merged").exists()

    shutil.copytree(run / "pissa_converted", root / "saves/ours/adapter")  # where a run of this pipeline keeps it
    err = refused("export", merge_recipe(root, "saves/ours/pissa_converted", "qwen"), cwd=root, as_typed=False)
    assert "to output_dir/adapter: set adapter_name_or_path: saves/ours" in err, err


def test_adapters_on_a_tied_head_merge_as_peft_or_are_refused_in_one_message(root):
    """modules_to_save embed_tokens with ensure_weight_tying (LLaMA-Factory's additional_target on a tied model, as
    PEFT 0.21 writes it: both tensors, one matrix) merges to PEFT's merge. LoRA on the tied head (target_modules
    lm_head): PEFT's merge_and_unload folds it into the matrix the embedding shares, so its merged model is not its
    adapter model; refused in one message about the adapter's target_modules (before: the recipe's lora_target
    message, 'the output head takes no LoRA (train it in full with additional_target ...)')."""
    theirs = randomised(peft.get_peft_model(base_model(root), peft.LoraConfig(
        r=RANK, lora_alpha=ALPHA, target_modules=["q_proj"], modules_to_save=["embed_tokens"],
        ensure_weight_tying=True)))
    theirs.save_pretrained(root / "tied-saved")
    assert_merged_is_peft_merge(root, "tied-saved", theirs, template="qwen")

    with pytest.warns(UserWarning, match="tie_word_embeddings"):
        head = randomised(peft.get_peft_model(base_model(root), peft.LoraConfig(
            r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "lm_head"])))
    adapter_model = logits(head)
    head.save_pretrained(root / "tied-head")
    assert (logits(head.merge_and_unload()) - adapter_model).abs().max() > 1e-2  # PEFT's merge is another model
    err = refused("export", merge_recipe(root, "tied-head", "qwen"), cwd=root, as_typed=False)
    assert err.count("error:") == 1 and "tied-head/adapter_config.json: target_modules ['lm_head']" in err, err
    assert "tied to its token embedding" in err and not (root / "tied-head-merged").exists(), err
