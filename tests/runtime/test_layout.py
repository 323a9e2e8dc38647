"""The run layout and the one rule for which tuned weights are current (used by merge, eval and chat)."""
from __future__ import annotations

import json

import os
from pathlib import Path

from pipeline.runtime.layout import RunLayout, Weights, current_weights, describe, merged_weights, trained_weights


def _adapter(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "adapter_config.json").write_text("{}")
    (path / "adapter_model.safetensors").write_bytes(b"x")
    return path


def _model(path: Path) -> Path:
    path.mkdir(parents=True)
    (path / "config.json").write_text("{}")
    return path


def _age(path: Path, seconds: float) -> None:
    for p in [path, *path.rglob("*")]:
        st = p.stat()
        os.utime(p, (st.st_atime - seconds, st.st_mtime - seconds))


def test_paths_are_the_documented_ones(tmp_path):
    out = RunLayout(tmp_path)
    assert [p.name for p in (out.resolved_yaml, out.ds_config, out.trainer_log, out.loss_plot, out.all_results,
                             out.adapter, out.model, out.merged, out.eval)] == [
        "resolved.yaml", "ds_config.json", "trainer_log.jsonl", "training_loss.png", "all_results.json",
        "adapter", "model", "merged", "eval"]
    assert out.trained_dir("lora") == tmp_path / "adapter" and out.trained_dir("freeze") == tmp_path / "model"
    assert RunLayout.of("saves/x").root == Path("saves/x")


def test_trained_adapter_comes_before_the_starting_one(tmp_path):
    out = RunLayout(tmp_path / "out")
    start = _adapter(tmp_path / "start")
    assert trained_weights(out, "lora", None) is None
    assert trained_weights(out, "lora", str(start)) == Weights("adapter", start)
    (out.adapter).mkdir(parents=True)
    (out.adapter / "adapter_config.json").write_text("{}")  # incomplete: no weights file
    assert trained_weights(out, "lora", str(start)) == Weights("adapter", start)
    (out.adapter / "adapter_model.safetensors").write_bytes(b"x")
    assert trained_weights(out, "lora", str(start)) == Weights("adapter", out.adapter)


def test_full_and_freeze_use_output_dir_model(tmp_path):
    out = RunLayout(tmp_path)
    assert trained_weights(out, "full", None) is None
    _model(out.model)
    assert trained_weights(out, "freeze", "ignored") == Weights("model", out.model)


def test_merged_is_current_only_when_not_older_than_the_training(tmp_path, capsys):
    out = RunLayout(tmp_path)
    assert current_weights(out, "lora", None) is None
    _model(out.merged)
    assert current_weights(out, "lora", None) == Weights("merged", out.merged)  # merged alone
    _adapter(out.adapter)
    _age(out.adapter, 100)
    assert current_weights(out, "lora", None) == Weights("merged", out.merged)
    _age(out.merged, 1000)  # the adapter was retrained after the merge
    assert current_weights(out, "lora", None) == Weights("adapter", out.adapter)
    assert "is older than" in capsys.readouterr().err
    assert merged_weights(out) == Weights("merged", out.merged)  # still there when asked for by name


def test_reports_name_the_merged_models_own_architecture(tmp_path):
    """A merged Qwen3 is 'Hugging Face Qwen3ForCausalLM layout' in metrics.json and report.md, not GPT-2's."""
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["Qwen3ForCausalLM"]}))
    assert describe(Weights("merged", tmp_path), "base", "lora") == \
        f"{tmp_path} (merged, Hugging Face Qwen3ForCausalLM layout)"
