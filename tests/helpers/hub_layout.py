"""Checkpoint folders as the hub holds them, beyond what transformers' save_pretrained writes, for the tests that the
pipeline downloads, reads and exports only what it loads:

- mistralai/Mistral-7B-Instruct-v0.3 (and -v0.3): config.json, generation_config.json, model-0000i-of-00003
  .safetensors + model.safetensors.index.json, AND consolidated.safetensors (Mistral's own format: the same weights
  again under Mistral's tensor names), params.json, tokenizer.model, tokenizer.model.v3, tokenizer.json,
  tokenizer_config.json, special_tokens_map.json;
- meta-llama/Llama-2-7b-chat-hf: the safetensors shards + index AND pytorch_model-0000i-of-00002.bin +
  pytorch_model.bin.index.json, tokenizer.model, tokenizer.json, ...

The decoys here hold what such files hold in shape, not in value: consolidated.safetensors zeros under Mistral's names
(read in place of the shards, the model would compute something else), the .bin files a pickle that creates a file
when unpickled (torch.load(weights_only=True) refuses it; any full unpickling leaves the file behind), the
sentencepiece models bytes that no reader accepts.
"""
from __future__ import annotations

import json
import pathlib
import shutil
from pathlib import Path
from typing import Any

SNAPSHOT = "0123456789abcdef0123456789abcdef01234567"
# the hub's files each layout holds that transformers' save_pretrained does not write (and nothing here reads)
MISTRAL_DECOYS = ("consolidated.safetensors", "params.json", "tokenizer.model", "tokenizer.model.v3")
LLAMA2_DECOYS = ("pytorch_model-00001-of-00002.bin", "pytorch_model-00002-of-00002.bin", "pytorch_model.bin.index.json",
                 "tokenizer.model")


def hub_cache(home: Path, repo_id: str, checkpoint: Path) -> Path:
    """The documented cache layout: hub/models--Org--Name/{refs/main, snapshots/<commit>/...} (blobs omitted), the
    snapshot a copy of `checkpoint`; returns the snapshot folder."""
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    shutil.copytree(checkpoint, repo / "snapshots" / SNAPSHOT)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(SNAPSHOT)
    return repo / "snapshots" / SNAPSHOT


def save_sharded(model: Any, directory: Path, shards: int = 3) -> list[str]:
    """model.save_pretrained(directory) split into about `shards` safetensors files + model.safetensors.index.json,
    as the hub's 7B checkpoints are (transformers' max_shard_size), in place of model.safetensors; the shard names."""
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    model.save_pretrained(directory, safe_serialization=True, max_shard_size=total // shards + 1)
    (directory / "model.safetensors").unlink(missing_ok=True)
    index = json.loads((directory / "model.safetensors.index.json").read_text())
    names = sorted(set(index["weight_map"].values()))
    assert len(names) > 1, names
    return names


def add_mistral_decoys(directory: Path, config: Any) -> None:
    """consolidated.safetensors (zeros under Mistral's names: tok_embeddings, layers.i.attention.wq, feed_forward.w1,
    ..., output), params.json (mistral-inference's shape file) and the two sentencepiece models, beside a
    save_pretrained folder of `config` (a MistralConfig)."""
    import torch
    from safetensors.torch import save_file

    width, layers, ffn, vocab = config.hidden_size, config.num_hidden_layers, config.intermediate_size, config.vocab_size
    head = getattr(config, "head_dim", None) or width // config.num_attention_heads
    kv = config.num_key_value_heads * head
    tensors = {"tok_embeddings.weight": (vocab, width), "norm.weight": (width,), "output.weight": (vocab, width)}
    for i in range(layers):
        tensors |= {f"layers.{i}.attention.wq.weight": (config.num_attention_heads * head, width),
                    f"layers.{i}.attention.wk.weight": (kv, width), f"layers.{i}.attention.wv.weight": (kv, width),
                    f"layers.{i}.attention.wo.weight": (width, config.num_attention_heads * head),
                    f"layers.{i}.feed_forward.w1.weight": (ffn, width), f"layers.{i}.feed_forward.w2.weight": (width, ffn),
                    f"layers.{i}.feed_forward.w3.weight": (ffn, width), f"layers.{i}.attention_norm.weight": (width,),
                    f"layers.{i}.ffn_norm.weight": (width,)}
    save_file({k: torch.zeros(shape) for k, shape in tensors.items()}, directory / "consolidated.safetensors")
    (directory / "params.json").write_text(json.dumps(
        {"dim": width, "n_layers": layers, "head_dim": head, "hidden_dim": ffn, "n_heads": config.num_attention_heads,
         "n_kv_heads": config.num_key_value_heads, "norm_eps": config.rms_norm_eps, "vocab_size": vocab,
         "rope_theta": 1000000.0}))
    for name in ("tokenizer.model", "tokenizer.model.v3"):
        (directory / name).write_bytes(b"\x0a\x0bnot a sentencepiece model")


class _Touch:
    """Unpickled, creates `marker` (pathlib.Path.touch): the sign that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self) -> tuple:
        return pathlib.Path.touch, (pathlib.Path(self.marker),)


def add_llama2_decoys(directory: Path, marker: Path) -> None:
    """Llama-2-7b-chat-hf's pickled copy of the weights (pytorch_model-0000i-of-00002.bin + its index), each a pickle
    that creates `marker` when unpickled, and a sentencepiece tokenizer.model nothing may read."""
    import pickle

    index = json.loads((directory / "model.safetensors.index.json").read_text())
    names = sorted(set(index["weight_map"].values()))
    bins = [n for n in LLAMA2_DECOYS if n.endswith(".bin")]
    for name in bins:
        (directory / name).write_bytes(pickle.dumps(_Touch(marker), protocol=4))
    weight_map = {key: bins[names.index(file) % len(bins)] for key, file in index["weight_map"].items()}
    (directory / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    (directory / "tokenizer.model").write_bytes(b"\x0a\x0bnot a sentencepiece model")
