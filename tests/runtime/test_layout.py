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


def test_a_finished_runs_recipe_is_named_from_the_folder_it_was_started_in(tmp_path, monkeypatch):
    """resolved.yaml's first line names the recipe as typed, its second the folder typed in (pipeline.recipe.started):
    a run trained with `cd recipes && python -m pipeline train x.yaml` is recipes/x.yaml's from the root, and not the
    root's own x.yaml's (whose `make train` would have wiped it as stale). A file without the second line (older
    code's), or whose folder no longer holds the recipe (a run folder copied from another machine), names it from
    the folder of the command reading it, as before. Failed before: x.yaml was read from the root."""
    (tmp_path / "recipes").mkdir()
    for name in ("recipes/x.yaml", "x.yaml"):
        (tmp_path / name).write_text("model_name_or_path: tiny\n")
    out = RunLayout(tmp_path / "runs" / "x")
    out.root.mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    out.resolved_yaml.write_text(f"# resolved recipe: x.yaml\n# started in: {tmp_path / 'recipes'}\nseed: 7  # cli\n")
    assert out.finished_recipe() is None and not out.finished_by("recipes/x.yaml")  # not finished
    out.all_results.write_text("{}")
    assert out.finished_recipe() == os.path.join("recipes", "x.yaml")
    assert out.finished_by("recipes/x.yaml") and out.finished_by(tmp_path / "recipes" / "x.yaml")
    assert not out.finished_by("x.yaml")
    monkeypatch.chdir(tmp_path / "recipes")
    assert out.finished_recipe() == "x.yaml" and out.finished_by("x.yaml") and not out.finished_by("../x.yaml")
    monkeypatch.chdir(tmp_path)
    for older in ("# resolved recipe: x.yaml\nseed: 7  # cli\n",
                  f"# resolved recipe: x.yaml\n# started in: {tmp_path / 'gone'}\nseed: 7  # cli\n"):
        out.resolved_yaml.write_text(older)
        assert out.finished_recipe() == "x.yaml" and out.finished_by("x.yaml") and not out.finished_by("recipes/x.yaml")
