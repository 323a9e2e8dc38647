"""PEFT adapters whose adapter_config.json holds a STRING target_modules (PEFT's regular expression, or "all-linear") on
a sparse MoE model, brought to LLaMA-Factory's merge recipe (`python -m pipeline export`, in process as
test_peft_written_adapters.export runs it).

PEFT 0.21 reads such a string on transformers 5 through its v4 -> v5 conversion
(peft/utils/transformers_weight_conversion.py _resolve_string_target_modules): the last part of each module and
parameter name it fullmatches, and each expert / router name of its table it fullmatches under a fused parameter's
container, then as a list over every layer. So "model.layers.1.mlp.experts.(gate|up|down)_proj" adapts every sparse
block's experts, and "all-linear" the attention, the routed experts and the routers (not GLM-4.5's shared experts
nor its dense block: their names go to the experts). Golden values: PEFT's own PeftModel.from_pretrained of the same
folder + merge_and_unload(); the export loaded by transformers computes its logits (fp32, |difference| <= 1e-5).

Failed before: every string on a MoE model was refused ("which this pipeline does not reproduce", exit 2).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.acceptance.harness import refused
from tests.acceptance.test_peft_written_adapters import RANK, ALPHA, assert_merged_is_peft_merge, merge_recipe, \
    randomised, transformers4_adapter
from tests.acceptance.test_qwen3_moe_cli import save_pretrained_moe
from tests.acceptance.test_transformers4_moe_adapters import save_base

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

CONVERTED = ("target_parameters", "rank_pattern", "alpha_pattern")  # what PEFT's conversion wrote beside the list


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """base/: a tiny Qwen3MoeForCausalLM (2 sparse blocks of 4 experts) as transformers' save_pretrained writes it."""
    root = tmp_path_factory.mktemp("moe_regex")
    save_pretrained_moe(root / "base")
    return root


def with_string(folder: Path, target_modules: str) -> None:
    """adapter_config.json with `target_modules` as written before PEFT's conversion (a transformers 4 adapter's,
    a hand-written one): the string, no target_parameters / rank_pattern / alpha_pattern."""
    path = folder / "adapter_config.json"
    config = {k: v for k, v in json.loads(path.read_text()).items() if k not in CONVERTED}
    path.write_text(json.dumps({**config, "target_modules": target_modules}))


def peft_loaded(root: Path, adapter: str):
    """PEFT 0.21's model of root/<adapter> on a fresh root/base (PeftModel.from_pretrained)."""
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    return peft.PeftModel.from_pretrained(base, root / adapter).eval()


def changed_blocks(root: Path, adapter: str) -> list[str]:
    """The tensors of the export that differ from the base's (transformers' names)."""
    merged = transformers.AutoModelForCausalLM.from_pretrained(root / f"{adapter}-merged").state_dict()
    plain = transformers.AutoModelForCausalLM.from_pretrained(root / "base").state_dict()
    return sorted(k for k, v in merged.items() if not torch.equal(v, plain[k]))


def test_one_blocks_experts_and_q_proj_widen_to_every_block_as_peft_0_21_widens_them(root):
    """The per-expert file PEFT wrote on transformers 4 for LLaMA-Factory's targets (every block's q_proj, experts and
    router), its config a pattern naming block 1's experts and router and block 0's q_proj: PEFT 0.21 loads those
    names in every block, so does export (every pair of the file merged)."""
    transformers4_adapter(root, "v4")
    with_string(root / "v4", r"model\.layers\.1\.mlp\.(experts\.(gate|up|down)_proj|gate)|model\.layers\.0\.self_attn\.q_proj")
    with pytest.warns(RuntimeWarning, match="rank_pattern keys did not match"):  # PEFT's own (test_peft_written_adapters)
        theirs = peft_loaded(root, "v4")
    assert_merged_is_peft_merge(root, "v4", theirs)
    assert changed_blocks(root, "v4") == [f"model.layers.{i}.{m}" for i in (0, 1) for m in (
        "mlp.experts.down_proj", "mlp.experts.gate_up_proj", "mlp.gate.weight", "self_attn.q_proj.weight")]


def test_all_linear_on_glm4_moe_leaves_the_shared_experts_as_peft_does(tmp_path):
    """"all-linear" on GLM-4.5 (block 0 dense, block 1 sparse with a shared expert): PEFT adapts the attention, the
    routed experts and the router; the names gate_proj / up_proj / down_proj go to the experts, so the shared experts'
    and the dense block's Linears keep their weights."""
    save_base(tmp_path, "glm4_moe")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "base")
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear")
    with pytest.warns(RuntimeWarning, match="rank_pattern keys did not match"):
        randomised(peft.get_peft_model(base, config)).save_pretrained(tmp_path / "all")
    with_string(tmp_path / "all", "all-linear")
    with pytest.warns(RuntimeWarning, match="rank_pattern keys did not match"):
        theirs = peft_loaded(tmp_path, "all")
    assert_merged_is_peft_merge(tmp_path, "all", theirs, template="glm4_moe")
    changed = changed_blocks(tmp_path, "all")
    assert "model.layers.1.mlp.experts.gate_up_proj" in changed and "model.layers.1.mlp.gate.weight" in changed
    assert not [k for k in changed if "shared_experts" in k or k.startswith("model.layers.0.mlp")], changed


def test_a_regex_peft_raises_on_is_one_message(root):
    """A pattern that matches the experts' container (no Linear on transformers 5): PEFT raises; export exits 2 with
    one message naming the file, the module and a pattern that works, nothing written."""
    transformers4_adapter(root, "experts")
    with_string(root / "experts", r".*\.experts")
    with pytest.raises(ValueError, match="Target module Qwen3MoeExperts"):
        peft_loaded(root, "experts")
    err = refused("export", merge_recipe(root, "experts"), cwd=root, as_typed=False)
    assert err.count("error:") == 1, err
    assert "experts/adapter_config.json: target_modules is \"" in err and "'experts' selects" \
           " model.layers.0.mlp.experts and 1 more, no Linear nor Embedding in transformers 5" in err, err
    assert not (root / "experts-merged").exists()
