"""A LLaMA-Factory merge recipe (`python -m pipeline export`, as tests/compat/lf_examples/merge_lora/) and the
recipes that load an adapter, refused at the recipe key's line before anything loads: an adapter not trained yet,
a model folder that does not exist, and an adapter trained on another model size (adapter_name_or_path, or a dpo
reference's ref_model_adapters). Each: exit 2, one message `recipe.yaml:LINE:COL: key: ...`, no traceback.

The base is a transformers-written Qwen3 (hidden size 32); the other adapter is PEFT's, trained on the same
family at hidden size 48 (also kept as a run's output_dir/adapter/), so the shapes the message names are PEFT's own:
lora_A is rank x in_features.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from tests.acceptance.harness import hf_model, refused, write_hf_checkpoint

peft = pytest.importorskip("peft")

RANK = 2
# LLaMA-Factory's merge_lora/qwen3_lora_sft.yaml with this test's model and adapter
MERGE = """### model
model_name_or_path: {model}
adapter_name_or_path: {adapter}
template: qwen3_nothink
trust_remote_code: true

### export
export_dir: saves/qwen3_sft_merged
export_size: 5
export_device: cpu
export_legacy_format: false
"""


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    """base/: a transformers Qwen3 of hidden size 32; other/: a PEFT LoRA adapter (q_proj, v_proj) of a Qwen3 of
    hidden size 48; other-oft/: a PEFT OFT one (blocks of 8) of that model."""
    root = tmp_path_factory.mktemp("adapter_refusals")
    base = write_hf_checkpoint(root / "base", "qwen3", small_vocab=True)
    config = peft.LoraConfig(r=RANK, lora_alpha=4, target_modules=["q_proj", "v_proj"])
    other = hf_model("qwen3", vocab_size=base.config.vocab_size, hidden_size=48)
    peft.get_peft_model(other, config).save_pretrained(root / "other")
    shutil.copytree(root / "other", root / "saves/big/adapter")  # as a run of ours keeps it in output_dir/adapter/
    oft = peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"])
    peft.get_peft_model(hf_model("qwen3", vocab_size=base.config.vocab_size, hidden_size=48), oft).save_pretrained(
        root / "other-oft")
    return root


def export_refusal(workdir: Path, **keys: str) -> str:
    (workdir / "merge.yaml").write_text(MERGE.format(**{"model": "base", "adapter": "other", **keys}))
    return refused("export", "merge.yaml", cwd=workdir)


def test_export_of_a_run_not_trained_yet_is_refused_at_adapter_name_or_path(workdir):
    err = export_refusal(workdir, adapter="saves/qwen3-4b/lora/sft")
    assert "merge.yaml:3:23: adapter_name_or_path: directory 'saves/qwen3-4b/lora/sft' does not exist here" in err, err
    assert err.count("adapter_name_or_path") == 1, err
    assert not (workdir / "saves/qwen3_sft_merged").exists()


def test_export_of_a_missing_model_folder_is_refused_at_model_name_or_path(workdir):
    err = export_refusal(workdir, model="saves/qwen3-4b/full/sft")
    assert "merge.yaml:2:21: model_name_or_path: directory 'saves/qwen3-4b/full/sft' does not exist here" in err, err
    assert err.count("model_name_or_path: ") == 1, err


def test_an_adapter_of_another_size_is_refused_at_its_key(workdir):
    # PEFT's lora_A of q_proj is rank x in_features: 2 x 48 in the adapter, 2 x 32 on this model
    expected = (f"adapter_name_or_path: given 'other', whose tensor 'base_model.model.model.layers.0.self_attn.q_proj."
                f"lora_A.weight' has shape [{RANK}, 48] but base expects [{RANK}, 32] there: trained on a model with "
                "hidden size 48; this model has 32")
    err = export_refusal(workdir)
    assert f"merge.yaml:3:23: {expected}" in err, err
    assert err.count("adapter_name_or_path") == 1, err
    # LLaMA-Factory's merge recipes name the run's output_dir: its adapter/ is checked, at the line of the key
    err = export_refusal(workdir, adapter="saves/big")
    assert "merge.yaml:3:23: adapter_name_or_path: given 'saves/big/adapter', whose tensor" in err, err
    assert "hidden size 48; this model has 32" in err and err.count("adapter_name_or_path") == 1, err


def test_an_oft_adapter_of_another_size_is_refused_at_its_key(workdir):
    # PEFT's oft_R of q_proj is one row per block of 8 inputs, each the 8 x 7 / 2 numbers of a block's upper triangle
    (workdir / "merge.yaml").write_text(MERGE.format(model="base", adapter="other-oft"))
    err = refused("export", "merge.yaml", cwd=workdir, as_typed=False)
    assert ("merge.yaml:3:23: adapter_name_or_path: given 'other-oft', whose tensor 'base_model.model.model.layers.0."
            "self_attn.q_proj.oft_R.weight' has shape [6, 28] but base expects [4, 28] there: trained on a model "
            "with hidden size 48; this model has 32") in err, err
    assert err.count("adapter_name_or_path") == 1, err


def test_a_reference_adapter_of_another_size_is_refused_at_ref_model_adapters(workdir):
    (workdir / "eval.yaml").write_text("model_name_or_path: base\nstage: dpo\nref_model: base\n"
                                       "ref_model_adapters: other\ntemplate: qwen3_nothink\n")
    err = refused("eval", "eval.yaml", cwd=workdir, as_typed=False)
    assert "eval.yaml:4:21: ref_model_adapters: given 'other', whose tensor" in err, err
    assert "hidden size 48; this model has 32; set ref_model to the model" in err, err
    assert err.count("ref_model_adapters") == 1, err

