"""Loading real-layout GPT-2 checkpoints (written by transformers), our own checkpoints, and export back."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from pipeline.errors import UserError
from pipeline.model.config import PRESETS
from pipeline.model.gpt import GPTModel
from pipeline.model.weights import checkpoint_tensors, load_model, save_hf, save_model

transformers = pytest.importorskip("transformers")


def ids(seed=0, shape=(2, 16)):
    return torch.randint(0, 50257, shape, generator=torch.Generator().manual_seed(seed))


def hf_logits(model, x):
    with torch.no_grad():
        return model(x).logits


def copy_config(src, dst):
    dst.mkdir(parents=True, exist_ok=True)
    (dst / "config.json").write_text((src / "config.json").read_text())


def test_hf_checkpoint_parity(hf_dir):
    path, ref = hf_dir
    with safe_open(path / "model.safetensors", "pt") as f:
        assert any(k.startswith("transformer.") for k in f.keys())  # the save_pretrained variant
    ours = load_model(path).eval()
    x = ids()
    assert torch.allclose(ours(x), hf_logits(ref, x), atol=1e-4, rtol=0)
    assert ours.cfg.context_length == 64 and ours.lm_head.weight is ours.embed_tokens.weight


def test_hf_checkpoint_without_prefix_and_with_mask_buffers(hf_dir, tmp_path):
    """OpenAI's original files: no `transformer.` prefix, causal-mask buffers h.N.attn.bias present."""
    path, ref = hf_dir
    with safe_open(path / "model.safetensors", "pt") as f:
        state = {k.removeprefix("transformer."): f.get_tensor(k) for k in f.keys()}
    for i in range(2):
        state[f"h.{i}.attn.bias"] = torch.tril(torch.ones(1, 1, 64, 64))
    copy_config(path, tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"))
    x = ids(1)
    assert torch.allclose(load_model(tmp_path).eval()(x), hf_logits(ref, x), atol=1e-4, rtol=0)


def test_sharded_hf_checkpoint(tmp_path, make_hf):
    ref = make_hf(seed=1)
    ref.save_pretrained(tmp_path, max_shard_size="1MB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 1
    x = ids(2)
    assert torch.allclose(load_model(tmp_path).eval()(x), hf_logits(ref, x), atol=1e-4, rtol=0)


def test_checkpoint_tensors_stream_what_load_model_loads(tmp_path, make_hf):
    """Sharded, bf16 on disk, Conv1D layout, tied head: the stream gives load_model's fp32 tensors, one at a time."""
    ref = make_hf(seed=4).to(torch.bfloat16)
    ref.save_pretrained(tmp_path, max_shard_size="1MB")
    want = load_model(tmp_path).state_dict()
    got = dict(checkpoint_tensors(tmp_path))
    assert set(want) - set(got) == {"lm_head.weight"}  # tied: the embedding, read once
    for name, tensor in got.items():
        assert tensor.dtype == torch.float32 and torch.equal(tensor, want[name]), name


def test_untied_hf_checkpoint(tmp_path, make_hf):
    ref = make_hf(seed=2, tie_word_embeddings=False)
    with torch.no_grad():
        ref.lm_head.weight.normal_()
    ref.save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    assert ours.lm_head.weight is not ours.embed_tokens.weight
    x = ids(3)
    assert torch.allclose(ours(x), hf_logits(ref, x), atol=1e-4, rtol=0)


@pytest.mark.parametrize("tied,qkv_bias", [(True, True), (False, False)])
def test_save_hf_loads_in_transformers(tmp_path, tied, qkv_bias):
    ours = GPTModel(PRESETS["tiny"].replace(tie_weights=tied, qkv_bias=qkv_bias), seed=4).eval()
    with torch.no_grad():
        for p in ours.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # biases and norms not at their init values
    save_hf(ours, tmp_path / "merged")
    files = sorted(p.name for p in (tmp_path / "merged").iterdir())
    assert files == ["config.json", "generation_config.json", "model.safetensors"]
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    x = ids(5)
    assert torch.allclose(hf_logits(ref, x), ours(x), atol=1e-4, rtol=0)
    assert torch.allclose(load_model(tmp_path / "merged")(x), ours(x), atol=1e-5, rtol=0)


def test_save_hf_sharded_and_bf16(tmp_path):
    ours = GPTModel(PRESETS["tiny"], seed=5).eval()
    save_hf(ours, tmp_path / "out", dtype="bf16", max_shard_bytes=2_000_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((tmp_path / "out" / s).is_file() for s in shards)
    assert index["metadata"]["total_size"] == 2 * sum(p.numel() for p in ours.parameters())
    ref = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "out", dtype=torch.float32).eval()
    bf16 = GPTModel(PRESETS["tiny"], seed=5).eval()
    with torch.no_grad():
        for p in bf16.parameters():
            p.copy_(p.to(torch.bfloat16).float())
    x = ids(6)
    assert torch.allclose(hf_logits(ref, x), bf16(x), atol=1e-4, rtol=0)
    assert torch.allclose(load_model(tmp_path / "out")(x), bf16(x), atol=1e-5, rtol=0)


def test_own_checkpoint_round_trip(tmp_path):
    ours = GPTModel(PRESETS["tiny"].replace(tie_weights=False, qkv_bias=False), seed=6).eval()
    save_model(ours, tmp_path / "model")
    assert json.loads((tmp_path / "model" / "config.json").read_text())["format"] == "pipeline-gpt"
    back = load_model(tmp_path / "model")
    for (n, a), (_, b) in zip(ours.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), n
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temp dirs left behind


def test_preset_is_seeded(tmp_path):
    a, b = load_model("tiny", seed=7), load_model("tiny", seed=7)
    assert torch.equal(a.layers[1].mlp.up_proj.weight, b.layers[1].mlp.up_proj.weight)


def test_a_tied_config_with_a_different_head_in_its_file_is_refused(hf_dir, tmp_path):
    """tie_word_embeddings true, yet the file holds its own lm_head.weight: transformers 5 keeps that head untied,
    4 ties it to the embedding, so no reading is right for both; an equal copy (some exporters write one) is the
    embedding, dropped without a word."""
    path, ref = hf_dir
    with safe_open(path / "model.safetensors", "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    copy_config(path, tmp_path)
    save_file({**state, "lm_head.weight": state["transformer.wte.weight"].clone()}, str(tmp_path / "model.safetensors"))
    x = ids(2)
    assert torch.allclose(load_model(tmp_path).eval()(x), hf_logits(ref, x), atol=1e-4, rtol=0)
    save_file({**state, "lm_head.weight": state["transformer.wte.weight"] + 0.5}, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError) as err:
        load_model(tmp_path)
    assert err.value.messages == [
        f"{tmp_path / 'model.safetensors'}: tensor 'lm_head.weight' differs from the embedding"
        f" 'transformer.wte.weight', but {tmp_path / 'config.json'} says tie_word_embeddings: true (the head is"
        " then the embedding, and this tensor is not used); to use this head, set \"tie_word_embeddings\": false in"
        " config.json (transformers 5 keeps it untied); to tie, remove lm_head.weight from the file"]


def test_shape_mismatch_and_missing_keys_are_listed(hf_dir, tmp_path):
    path, _ = hf_dir
    with safe_open(path / "model.safetensors", "pt") as f:
        state = {k: f.get_tensor(k) for k in f.keys()}
    state.pop("transformer.h.1.mlp.c_fc.bias")
    state["transformer.h.0.ln_1.weight"] = torch.ones(31)
    state["transformer.extra.weight"] = torch.ones(2)
    copy_config(path, tmp_path)
    save_file(state, str(tmp_path / "model.safetensors"))
    with pytest.raises(UserError) as err:
        load_model(tmp_path)
    msgs = err.value.messages
    assert any("missing tensor 'h.1.mlp.c_fc.bias' (expected shape [128])" in m for m in msgs)
    assert any("model.safetensors: tensor 'h.0.ln_1.weight' has shape [31], the model expects [32]" in m for m in msgs)
    assert any("unexpected tensor 'extra.weight'" in m for m in msgs)


def test_only_a_shape_change_of_the_recipe_is_blamed(hf_dir, tmp_path):
    """config.json wider than its weights, loaded with the recipe's dropout (0.0, GPT-2's config says 0.1): the
    mismatch is the checkpoint's own, so no line says the recipe changed the config (it named drop_rate)."""
    path, _ = hf_dir
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "n_embd": 64, "resid_pdrop": 0.1}))
    from pipeline.model.config import read_config

    file_cfg = read_config(tmp_path)
    for cfg, blamed in ((file_cfg.replace(drop_rate=0.0), None), (file_cfg.replace(drop_rate=0.0, n_layers=3),
                                                                 "changed the checkpoint's config (n_layers 2 -> 3)")):
        with pytest.raises(UserError) as err:
            load_model(tmp_path, cfg=cfg)
        msgs = err.value.messages
        assert any("tensor 'h.0.ln_1.weight' has shape [32], the model expects [64]" in m for m in msgs)
        assert [m for m in msgs if "recipe changed" in m] == ([] if blamed is None else [
            f"{tmp_path}: the recipe {blamed}; these weights do not fit the changed shapes"]), msgs


def test_truncated_and_missing_weights_name_the_file(hf_dir, tmp_path, monkeypatch):
    path, _ = hf_dir
    copy_config(path, tmp_path)
    data = (path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(UserError, match=r"model\.safetensors: not a readable safetensors file"):
        load_model(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match="may be truncated or corrupt"):
        load_model(tmp_path)
    # a file this user may not read (save_pretrained wrote it 0600 for another user; root reads everything, so
    # os.access stands in): safetensors reports "No such file or directory", which the message no longer repeats
    with monkeypatch.context() as patch:
        patch.setattr("pipeline.model.weights.os.access", lambda *a, **k: False)
        with pytest.raises(UserError, match=r"model\.safetensors: this user may not read it \(permission denied, "
                                            r"mode -rw-r--r--\); give it read permission \(chmod a\+r\)"):
            load_model(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    (tmp_path / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(UserError, match="pytorch_model.bin are pickled weights"):
        load_model(tmp_path)


@pytest.mark.parametrize("pickled", ["original/consolidated.00.pth", "model.pth"])
def test_pickled_pth_weights_are_named_not_opened(hf_dir, tmp_path, pickled):
    """A Meta download with only original/consolidated.00.pth (or a top-level *.pth) got "no model.safetensors"
    without a word about the file it has; it is named as *.bin is (and, as every pickle, never opened)."""
    path, _ = hf_dir
    copy_config(path, tmp_path)
    (tmp_path / pickled).parent.mkdir(exist_ok=True)
    (tmp_path / pickled).write_bytes(b"not a pickle either")
    with pytest.raises(UserError) as err:
        load_model(tmp_path)
    assert err.value.messages == [
        f"{tmp_path}: no model.safetensors (nor model.safetensors.index.json) ({pickled} are pickled weights, which"
        " this pipeline never loads; convert them to safetensors, or download model.safetensors from the hub)"]


def test_shorter_context_override_cuts_positions(hf_dir):
    path, ref = hf_dir
    from pipeline.model.config import read_config

    short = load_model(path, cfg=read_config(path).replace(context_length=16)).eval()
    assert short.pos_embed.weight.shape == (16, 32)
    x = ids(8, (1, 16))
    assert torch.allclose(short(x), hf_logits(ref, x), atol=1e-4, rtol=0)
    with pytest.raises(UserError, match="tensor 'wpe.weight' has shape"):
        load_model(path, cfg=read_config(path).replace(context_length=128))


def test_saving_a_model_with_lora_wrappers_is_refused(tmp_path):
    from pipeline.model.lora import apply_lora

    model = GPTModel(PRESETS["tiny"], seed=0)
    apply_lora(model, "c_attn", rank=2)
    with pytest.raises(ValueError, match="merge_lora"):
        save_hf(model, tmp_path / "x")
    assert not (tmp_path / "x").exists()


def test_saving_refuses_a_model_that_still_holds_lora(tmp_path):
    from pipeline.model.lora import apply_lora

    model = GPTModel(PRESETS["tiny"])
    apply_lora(model, "all", rank=2)
    with pytest.raises(ValueError, match="still holds LoRA wrappers"):
        save_model(model, tmp_path / "m")
    assert not (tmp_path / "m").exists()
