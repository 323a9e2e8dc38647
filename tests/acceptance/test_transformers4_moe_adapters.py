"""LoRA adapters PEFT wrote on transformers 4 for GLM-4.5, DeepSeek-V3 and Qwen2-MoE, brought to the CLI as a user
brings them: LLaMA-Factory's merge recipe (model_name_or_path + adapter_name_or_path + export_dir) run with
`python -m pipeline export` (in process: main(argv), test_peft_written_adapters.export); transformers loads the export.

On transformers 4 every Linear of a target's name took its own LoRA pair: each routed expert's gate_proj / up_proj /
down_proj, the shared experts' and a dense block's MLP, Qwen2-MoE's router (an nn.Linear there). The golden is PEFT
0.21's own PeftModel.from_pretrained + merge_and_unload() on transformers 5 (measured, as these tests assert):
- GLM-4.5 / DeepSeek-V3 (transformers' qwen2_moe conversion pattern): the routed experts' pairs are fused onto
  mlp.experts.gate_up_proj / down_proj, and the shared experts' and dense block's pairs are dropped without a word.
- Qwen2-MoE (no conversion: PEFT's pattern table has no qwen2_moe entry): the shared expert, shared_expert_gate and
  attention load, the routed experts' pairs are dropped without a word, and a router `gate` target raises.
A file whose pairs PEFT drops is refused in one message (pipeline.model.untaken_lora: neither PEFT's model nor ours
would be the trained one); without those pairs it merges to PEFT's merge within 1e-5."""
from __future__ import annotations

import pytest

from tests.acceptance.harness import refused, save_pretrained_small
from tests.acceptance.test_peft_written_adapters import assert_merged_is_peft_merge, logits, merge_recipe, \
    transformers4_adapter

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

MLP = ("gate_proj", "up_proj", "down_proj")
NOT_ROUTED = r"mlp\.shared_experts\.|layers\.0\.mlp\.\w+_proj"  # GLM-4.5's / DeepSeek-V3's shared experts, dense block 0
TEMPLATES = {"glm4_moe": "glm4_moe", "deepseek_v3": "deepseek3", "qwen2_moe": "qwen"}
QWEN2_MOE = dict(hidden_size=32, intermediate_size=48, moe_intermediate_size=16, shared_expert_intermediate_size=24,
                 num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, num_experts=4,
                 num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False)


def save_base(root, family: str) -> None:
    """root/base: the family's tiny checkpoint of its CLI test (GLM-4.5 / DeepSeek-V3: block 0 dense, block 1 sparse
    with 4 experts and a shared expert; Qwen2-MoE: 2 sparse blocks with a gated shared expert) and small tokenizer."""
    if family == "glm4_moe":
        from tests.acceptance.test_glm4_moe_cli import TINY
        save_pretrained_small(root / "base", "glm4", "Glm4MoeForCausalLM", "Glm4MoeConfig",
                              ("eos_token_id", "pad_token_id"), **TINY)
    elif family == "deepseek_v3":
        from tests.acceptance.test_deepseek_v3_cli import TINY
        save_pretrained_small(root / "base", "deepseek_v3", "DeepseekV3ForCausalLM", "DeepseekV3Config",
                              ("bos_token_id", "eos_token_id"), **TINY)
    else:
        save_pretrained_small(root / "base", "qwen2", "Qwen2MoeForCausalLM", "Qwen2MoeConfig", ("eos_token_id",),
                              **QWEN2_MOE)


def peft_merge(root, adapter: str) -> torch.Tensor:
    """The logits of PEFT 0.21's merge of root/adapter onto a fresh root/base."""
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    return logits(peft.PeftModel.from_pretrained(base, root / adapter).merge_and_unload().eval())


@pytest.mark.parametrize("family, refused_file, loaded_file", [
    # LLaMA-Factory's lora_target o_proj,gate_proj,up_proj,down_proj on transformers 4 (the router no Linear there)
    ("glm4_moe", dict(targets=("o_proj", *MLP)), dict(targets=("o_proj", *MLP), leave_out=NOT_ROUTED)),
    ("deepseek_v3", dict(targets=("o_proj", *MLP)), dict(targets=("o_proj", *MLP), leave_out=NOT_ROUTED)),
    # lora_target all on transformers 4 (the router `gate` and shared_expert_gate among the Linears)
    ("qwen2_moe", dict(targets=("q_proj", *MLP, "gate", "shared_expert_gate")),
     dict(targets=("q_proj", *MLP, "shared_expert_gate"), leave_out=r"mlp\.experts\.")),
])
def test_a_transformers_4_moe_adapter_merges_as_peft_0_21_or_is_refused_in_one_message(tmp_path, family,
                                                                                      refused_file, loaded_file):
    """The whole transformers-4 file: PEFT 0.21 drops some of its pairs without a word (its merge equals the merge of
    the file without them), so export exits 2 with one message naming those modules, nothing written. The file
    without them (GLM-4.5 / DeepSeek-V3: the shared experts' and the dense block's pairs; Qwen2-MoE: the routed
    experts' and the router's) merges to PEFT's merge."""
    save_base(tmp_path, family)
    transformers4_adapter(tmp_path, "whole", **refused_file)
    loaded = transformers4_adapter(tmp_path, "loaded", **loaded_file)

    if family == "qwen2_moe":
        with pytest.raises(ValueError, match="Target module Qwen2MoeTopKRouter"):  # PEFT refuses the router target
            peft_merge(tmp_path, "whole")
    else:
        assert (peft_merge(tmp_path, "whole") - peft_merge(tmp_path, "loaded")).abs().max() == 0  # dropped by PEFT
    err = refused("export", merge_recipe(tmp_path, "whole", TEMPLATES[family]), cwd=tmp_path, as_typed=False)
    assert err.count("error:") == 1 and "whole/adapter_model.safetensors: LoRA on " in err, err
    untaken = "mlp.experts.E.gate_proj" if family == "qwen2_moe" else "mlp.shared_experts.gate_proj"
    assert untaken in err and "PEFT 0.21 loads this file without those tensors" in err, err
    assert not (tmp_path / "whole-merged").exists()

    if family == "deepseek_v3":  # DeepseekV3MoE is Glm4MoeMoE (the same module tree and PEFT conversion): one export
        return                    # for the two, GLM-4.5's (the suite's time)
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base"),
                                            loaded)
    assert_merged_is_peft_merge(tmp_path, "loaded", theirs, template=TEMPLATES[family])
