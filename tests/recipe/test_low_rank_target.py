"""galore_target / apollo_target that select no trained weight of an nn.Linear module: one message at the key's
file:line from validate, plan and train, before the model is built (pipeline.recipe.rules.optimizers), naming the
model's Linear modules and, under freeze, the freeze setting that leaves them frozen.

Golden: the module names are transformers' own (LlamaForCausalLM's and GPT2LMHeadModel's nn.Linear modules, listed
from the model transformers builds from the same config.json in the test), and what trains under freeze is
LLaMA-Factory's rule (the last freeze_trainable_layers blocks, their freeze_trainable_modules), written by hand.
"""
from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.recipe import resolve

transformers = pytest.importorskip("transformers")

LLAMA = "model_name_or_path: llama\ndataset: alpaca_demo\nnum_train_epochs: 3\ncutoff_len: 64\n"
IDLE = "would project nothing (LLaMA-Factory then trains its AdamW alone, without a word)"


def linear_leaves(family: str) -> list[str]:
    """The last name part of each nn.Linear module of transformers' model of that tiny config, in module order."""
    from tests.acceptance.harness import hf_model

    model = hf_model(family)
    names = [name for name, m in model.named_modules() if isinstance(m, transformers.pytorch_utils.nn.Linear)]
    return list(dict.fromkeys(name.rsplit(".", 1)[-1] for name in names))


@pytest.fixture(autouse=True)
def configs(tmp_path):
    """Tiny Llama and GPT-2 config.json files: what the rule reads of the model."""
    from tests.acceptance.harness import FAMILIES

    transformers.LlamaConfig(**FAMILIES["llama"].tiny).save_pretrained(tmp_path / "llama")
    transformers.GPT2Config(**FAMILIES["gpt2"].tiny).save_pretrained(tmp_path / "gpt2")


def errors(path: str) -> list[str]:
    with pytest.raises(UserError) as exc:
        resolve(path, [])
    return exc.value.messages


def test_a_target_no_linear_module_has_is_said_at_the_key_by_validate_plan_and_train(tmp_path):
    """As a user types it: a transformers checkpoint, LLaMA-Factory's GaLore recipe keys with a word no Linear
    module's name holds; validate (a fresh interpreter), plan and train refuse it at galore_target's line, and train
    builds nothing."""
    from tests.acceptance.harness import refused, write_data, write_hf_checkpoint

    write_hf_checkpoint(tmp_path / "ckpt", "llama", small_vocab=True)
    write_data(tmp_path / "data")
    (tmp_path / "r.yaml").write_text(
        "### model\nmodel_name_or_path: ckpt\n\n### method\nstage: sft\ndo_train: true\nfinetuning_type: full\n"
        "use_galore: true\ngalore_layerwise: true\ngalore_target: attention\ngalore_rank: 4\n\n### dataset\n"
        "dataset: tiny_sft\ndataset_dir: data\ntemplate: llama3\ncutoff_len: 64\n\n### output\noutput_dir: saves/r\n"
        "\n### train\nper_device_train_batch_size: 1\ngradient_accumulation_steps: 1\nlearning_rate: 1.0e-5\n"
        "num_train_epochs: 1.0\n")
    want = (f"r.yaml:10:16: galore_target: given 'attention', which selects no nn.Linear module of this llama model "
            f"(its Linear modules: {', '.join(linear_leaves('llama'))}; `all` is every one but lm_head): GaLore "
            f"{IDLE}; name some of them, or remove use_galore")
    assert want in refused("validate", "r.yaml", cwd=tmp_path)
    for command in ("plan", "train"):
        assert want in refused(command, "r.yaml", cwd=tmp_path, as_typed=False), command
    assert not (tmp_path / "saves").exists()


@pytest.mark.parametrize("keys, message", [
    # freeze_trainable_modules: mlp trains gate/up/down only, none of which q_proj names
    ("finetuning_type: freeze\nfreeze_trainable_modules: mlp\nuse_galore: true\ngalore_target: q_proj\n",
     "r.yaml:8:16: galore_target: given 'q_proj', but none of the nn.Linear modules it selects trains under "
     "finetuning_type: freeze with freeze_trainable_layers: 2, freeze_trainable_modules: 'mlp' (the Linear modules "
     f"that train: gate_proj, up_proj, down_proj): GaLore {IDLE}; name a module that trains, train the ones it "
     "names (freeze_trainable_layers, freeze_trainable_modules), or remove use_galore"),
    # only the last block's input_layernorm trains: no Linear at all; apollo_target left at its default
    ("finetuning_type: freeze\nfreeze_trainable_layers: 1\nfreeze_trainable_modules: input_layernorm\n"
     "use_apollo: true\n",
     "r.yaml: apollo_target: given 'all', but none of the nn.Linear modules it selects trains under "
     "finetuning_type: freeze with freeze_trainable_layers: 1, freeze_trainable_modules: 'input_layernorm' (no "
     f"Linear module trains): APOLLO {IDLE}; name a module that trains, train the ones it names "
     "(freeze_trainable_layers, freeze_trainable_modules), or remove use_apollo"),
])
def test_a_target_freeze_leaves_frozen_names_the_freeze_setting(write, keys, message):
    assert errors(write("r.yaml", LLAMA + keys)) == [message]


def test_gpt2s_conv1d_projections_leave_all_nothing_and_the_message_says_why(write):
    leaves = linear_leaves("gpt2")
    assert leaves == ["lm_head"]  # transformers' GPT-2: c_attn, c_proj, c_fc are Conv1D
    assert errors(write("r.yaml", LLAMA.replace("llama", "gpt2") + "finetuning_type: full\nuse_galore: true\n")) == [
        "r.yaml: galore_target: given 'all', which selects no nn.Linear module of this gpt2 model (its Linear "
        "modules: lm_head; `all` is every one but lm_head; the attention and MLP projections of gpt2 are Conv1D in "
        f"transformers, which LLaMA-Factory's GaLore skips): GaLore {IDLE}; name some of them, or remove "
        "use_galore"]


@pytest.mark.parametrize("keys", [
    "finetuning_type: full\nuse_galore: true\ngalore_target: q_proj,nothing\n",  # a word inside a name: q_proj
    "finetuning_type: full\nuse_apollo: true\napollo_target: mlp\n",  # LLaMA-Factory's substring rule
    "finetuning_type: freeze\nfreeze_trainable_modules: mlp\nuse_galore: true\ngalore_target: up_proj\n",
])
def test_a_target_that_selects_a_trained_linear_passes(write, keys):
    assert resolve(write("r.yaml", LLAMA + keys))["finetuning_type"] in ("full", "freeze")
