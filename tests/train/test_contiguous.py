"""Parameters are dense whatever the checkpoint they come from (issue 19), and the trainer says so if not.

DeepSpeed views every parameter as bytes (p.data.view(torch.uint8)) to broadcast and partition it; a
strided parameter (a transposed Conv1D weight, a sliced position table) fails there with a message that
names nothing. Each source of weights the loader accepts is checked here; the check before
deepspeed.initialize is checked to name the parameter.
"""
from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.model.weights import load_model, save_hf, save_model
from pipeline.train.run import check_contiguous
from tests.acceptance.harness import hf_model

transformers = pytest.importorskip("transformers")


def strided(model: torch.nn.Module) -> list[str]:
    return [name for name, p in model.named_parameters() if not p.is_contiguous()]


@pytest.fixture(scope="module")
def hf_gpt2_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("hf") / "gpt2"
    hf_model("gpt2").save_pretrained(path, safe_serialization=True)
    return path


def test_save_pretrained_checkpoint_loads_dense(hf_gpt2_dir):
    assert strided(load_model(hf_gpt2_dir)) == []


def test_dense_with_a_shorter_context(hf_gpt2_dir):
    cfg = load_model(hf_gpt2_dir).cfg.replace(context_length=16)
    assert strided(load_model(hf_gpt2_dir, cfg=cfg)) == []


def test_dense_without_prefix_untied_and_sharded(tmp_path):
    ref = hf_model("gpt2", seed=2, tie_word_embeddings=False)
    ref.save_pretrained(tmp_path / "sharded", max_shard_size="200KB")
    assert len(list((tmp_path / "sharded").glob("model-*.safetensors"))) > 1
    assert strided(load_model(tmp_path / "sharded")) == []
    plain = tmp_path / "plain"
    plain.mkdir()
    (plain / "config.json").write_bytes((tmp_path / "sharded" / "config.json").read_bytes())
    ref.save_pretrained(tmp_path / "single")
    with safe_open(tmp_path / "single" / "model.safetensors", "pt") as f:
        save_file({k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}, str(plain / "model.safetensors"))
    assert strided(load_model(plain)) == []


def test_dense_from_our_checkpoints_and_merged_exports(hf_gpt2_dir, tmp_path):
    model = load_model(hf_gpt2_dir)
    save_model(model, tmp_path / "own")
    save_hf(model, tmp_path / "merged", dtype="bf16", max_shard_bytes=200_000)
    assert strided(load_model(tmp_path / "own")) == []
    assert strided(load_model(tmp_path / "merged")) == []
    assert strided(load_model(tmp_path / "merged", dtype=torch.bfloat16)) == []


def test_check_names_a_strided_parameter(hf_gpt2_dir):
    model = load_model(hf_gpt2_dir)
    check_contiguous(model)  # dense: silent
    weight = model.get_submodule("layers.1.mlp.up_proj").weight
    model.get_submodule("layers.1.mlp.up_proj").weight = torch.nn.Parameter(weight.detach().t().contiguous().t())
    with pytest.raises(RuntimeError, match=r"bug: 1 model parameter.*'layers\.1\.mlp\.up_proj\.weight' \(shape \[128, 32\]"):
        check_contiguous(model)
