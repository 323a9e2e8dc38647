"""layers_pattern, PEFT's name for a model's list of layers, which qualifies layers_to_transform (adapt those layers
only). PEFT 0.21's LoraConfig.__post_init__ raises on layers_pattern without layers_to_transform ("When
`layers_pattern` is specified, `layers_to_transform` must also be specified."), so PEFT loads no such adapter.

- In a recipe neither key exists (LLaMA-Factory's arguments have neither; its HfArgumentParser refuses a key it does
  not know): refused as an unknown key, at its file and line, exit 2. This was right already: pinned here.
- In an adapter_config.json (a hand edit: PEFT's save_pretrained writes none such), brought as adapter_name_or_path:
  refused in one message naming the file, the key, the value and what PEFT needs. Failed before: loaded without a
  word, as if layers_pattern were not there (export exited 0).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.acceptance.harness import refused, write_recipe
from tests.acceptance.test_peft_regex_targets_cli import MERGE, PATTERNS, peft_adapter

peft = pytest.importorskip("peft")


def test_layers_pattern_in_a_recipe_is_an_unknown_key(workdir: Path):
    recipe = write_recipe(workdir / "r.yaml", model_name_or_path="tiny", dataset_dir="data", output_dir="saves/r",
                          layers_pattern="h")
    line = recipe.read_text().splitlines().index('layers_pattern: "h"') + 1
    err = refused("validate", "r.yaml", cwd=workdir)  # as typed
    assert err == f"error: r.yaml:{line}:1: layers_pattern: unknown key\n", err


def test_an_adapter_with_layers_pattern_alone_is_refused_as_peft_refuses_it(tmp_path: Path, hf_checkpoint):
    base = hf_checkpoint("llama", small_vocab=True)
    peft_adapter(base, tmp_path / "adapter", PATTERNS["attention"])
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "target_modules": ["q_proj", "v_proj"],
                                  "layers_pattern": "layers"}))
    with pytest.raises(ValueError, match="When `layers_pattern` is specified, `layers_to_transform` must also be"):
        peft.LoraConfig.from_pretrained(tmp_path / "adapter")  # what PeftModel.from_pretrained reads first
    (tmp_path / "m.yaml").write_text(MERGE.format(base=base, adapter="adapter"))
    said = refused("export", "m.yaml", cwd=tmp_path, as_typed=False)
    assert [line for line in said.splitlines() if line.startswith("error:")] == [
        "error: adapter/adapter_config.json: layers_pattern is \"layers\" without layers_to_transform, which PEFT"
        " 0.21's LoraConfig refuses (\"When `layers_pattern` is specified, `layers_to_transform` must also be"
        " specified\"), so PEFT cannot load this adapter; expected layers_pattern null, as PEFT writes it for an"
        " adapter on every layer (set it so in this file)"], said
    assert not (tmp_path / "adapter-merged").exists()


def test_a_string_target_modules_with_any_layers_pattern_is_refused_as_peft_refuses_it(tmp_path: Path, hf_checkpoint):
    """PEFT 0.21's LoraConfig raises on a string target_modules beside any layers_pattern but null ("`layers_pattern`
    cannot be used when `target_modules` is a str."), an empty one too, which its other rule lets pass. Failed
    before: layers_pattern "" loaded without a word (export exited 0); "layers" was refused quoting the other rule."""
    base = hf_checkpoint("llama", small_vocab=True)
    peft_adapter(base, tmp_path / "adapter", PATTERNS["attention"])
    config = tmp_path / "adapter" / "adapter_config.json"
    (tmp_path / "m.yaml").write_text(MERGE.format(base=base, adapter="adapter"))
    for pattern in ("", "layers"):
        config.write_text(json.dumps({**json.loads(config.read_text()), "layers_pattern": pattern}))
        with pytest.raises(ValueError, match="`layers_pattern` cannot be used when `target_modules` is a str"):
            peft.LoraConfig.from_pretrained(tmp_path / "adapter")
        said = refused("export", "m.yaml", cwd=tmp_path, as_typed=False)
        assert [line for line in said.splitlines() if line.startswith("error:")] == [
            f"error: adapter/adapter_config.json: layers_pattern is {json.dumps(pattern)} beside target_modules"
            f" {json.dumps(PATTERNS['attention'])}, a string, which PEFT 0.21's LoraConfig refuses (\"`layers_pattern`"
            " cannot be used when `target_modules` is a str\"), so PEFT cannot load this adapter; expected"
            " layers_pattern null, as PEFT writes it for an adapter on every layer (set it so in this file)"], said
        assert not (tmp_path / "adapter-merged").exists()
