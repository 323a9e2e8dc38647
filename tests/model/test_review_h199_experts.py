"""Review h199: a transformers-4 per-expert LoRA file (PEFT's layout before fused experts) that lacks some experts."""
from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.model.lora import load_adapter
from pipeline.model.weights import load_model
from tests.acceptance.test_peft_written_adapters import transformers4_adapter
from tests.acceptance.test_qwen3_moe_cli import save_pretrained_moe

safetensors_torch = pytest.importorskip("safetensors.torch")


def test_a_per_expert_adapter_without_one_experts_pairs_is_one_message(tmp_path):
    """Layer 0's expert 3 taken out of the file: one error naming its three Linears, not a missing / unexpected line
    per tensor of the block (28 lines before this change)."""
    save_pretrained_moe(tmp_path / "base")
    adapter = transformers4_adapter(tmp_path, "v4")
    weights = adapter / "adapter_model.safetensors"
    tensors = safetensors_torch.load_file(str(weights))
    tensors = {k: v for k, v in tensors.items() if ".layers.0.mlp.experts.3." not in k}
    safetensors_torch.save_file(tensors, str(weights), metadata={"format": "pt"})
    with pytest.raises(UserError) as caught:
        load_adapter(load_model(tmp_path / "base"), adapter)
    assert len(caught.value.messages) == 1, caught.value.messages
    message = caught.value.messages[0]
    for linear in ("gate_proj", "up_proj", "down_proj"):
        assert f"model.layers.0.mlp.experts.3.{linear}" in message, message
    assert "experts.2." not in message and "fewer experts" in message
