"""The dtype of the top-k routing weights, per family, as transformers 5.24's routers keep them.

- MixtralTopKRouter (models/mixtral/modeling_mixtral.py:106-110): softmax(router_logits.float()), top-k, renormalise,
  no cast back: MixtralExperts multiplies each expert's (bf16) output by the fp32 weight (:90), so the product is fp32,
  and casts it to the sum's dtype at index_add_ (:91).
- Qwen2MoeTopKRouter (models/qwen2_moe/modeling_qwen2_moe.py:327) and Qwen3MoeTopKRouter
  (models/qwen3_moe/modeling_qwen3_moe.py:266): router_top_value.to(router_logits.dtype), a bf16 product.
- Glm4MoeTopkRouter (models/glm4_moe/modeling_glm4_moe.py:282-307, DeepSeek-V3's): F.linear(x.float(),
  weight.float()), then sigmoid, bias, groups and weights in the logits' dtype: fp32 in a bf16 model (its fp32 weights
  into the product), bf16 under autocast. Our block took the logits from the gate in the model's dtype (0.24 off in
  bf16: a choice flipped) and the scores in fp32 (2.9e-3 off under autocast): both cases failed.
Ours is one SparseMoeBlock; the rule is ModelConfig.router_weights_fp32, set from the family's MoeKeys. The check is
bitwise, the block against transformers' block on the same bf16 input, its experts run by the per-expert loop
("eager": the loaded model's default grouped_mm rounds its own way, the same for both rules). Before the field,
Mixtral's block was a bf16 rounding away (1.95e-3 of 0.29 in bf16; 1.25e-3 under autocast): the Mixtral cases failed.
"""
from __future__ import annotations

import pytest
import torch

from pipeline.model.config import read_config
from pipeline.model.weights import load_model
from tests.model.test_moe import saved as saved_qwen3_moe
from tests.model.test_moe_families import hf_model

transformers = pytest.importorskip("transformers")


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe", "qwen3_moe", "glm4_moe"])
def checkpoint(request, tmp_path_factory):
    """(variant, directory, transformers model) saved with save_pretrained; block 0 sparse in each (glm4_moe: block
    1, after its dense block)."""
    path = tmp_path_factory.mktemp(request.param)
    if request.param == "glm4_moe":
        from tests.model.test_glm4_moe import hf_model as glm4_moe_model

        return request.param, path, glm4_moe_model(path)
    ref = saved_qwen3_moe(path) if request.param == "qwen3_moe" else hf_model(request.param, path)
    return request.param, path, ref


@pytest.mark.parametrize("precision", ["bf16", "autocast"])
def test_sparse_block_is_transformers_bitwise_in_bf16(checkpoint, precision):
    name, path, ref = checkpoint
    assert read_config(path).router_weights_fp32 is (name == "mixtral")
    block = 1 if name == "glm4_moe" else 0
    ours, theirs = load_model(path).eval().layers[block].mlp, ref.model.layers[block].mlp
    theirs.experts.config._experts_implementation = "eager"  # the per-expert loop (module-scoped model: eager stays)
    hidden = torch.randn(2, 9, 32, generator=torch.Generator().manual_seed(1))
    if precision == "bf16":  # a bf16 model: the sum is bf16 too
        ours, theirs, hidden = ours.to(torch.bfloat16), theirs.to(torch.bfloat16), hidden.bfloat16()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "autocast"):
        got, want = ours(hidden), theirs(hidden)
    theirs.float()
    assert got.dtype == want.dtype and torch.equal(got, want), (got.float() - want.float()).abs().max()
