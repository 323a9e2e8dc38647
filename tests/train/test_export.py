"""The trained weights' export (pipeline/train/export.py).

LoRA and full fine-tuning fill the model's skeleton with the engine's fp32 masters, so they never build a
second model on the host. freeze fills its frozen tensors from the base as it writes (they are written as
loaded), and builds the model only where the recipe changes the base as it builds it (a config override,
an adapter folded in). The reference is the path the exports took before the skeleton: a model built from
the recipe (base weights read again, in fp32) with the same masters loaded into it. Every file, tensor and
config must come out the same. The PEFT and transformers readers of these files are tested in
tests/acceptance/.
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from pipeline.model.build import base_subset, build_model, build_skeleton
from pipeline.recipe.args import recipe_args
from pipeline.train import export
from pipeline.train.run import train
from tests.train.helpers import BASE_PT, BASE_SFT

CASES = [
    (BASE_SFT, dict(finetuning_type="lora", additional_target=["ln_f"]), "adapter", False),
    (BASE_PT, dict(finetuning_type="full"), "model", False),
    (BASE_PT, dict(finetuning_type="freeze", freeze_trainable_layers=1), "model", False),
    (BASE_PT, dict(finetuning_type="freeze", freeze_trainable_layers=1, context_length=48), "model", True),
]


def files(directory: Path) -> dict[str, object]:
    """Each file under `directory`: tensors for safetensors, parsed JSON, else bytes."""
    out: dict[str, object] = {}
    for path in sorted(p for p in directory.rglob("*") if p.is_file()):
        name = str(path.relative_to(directory))
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as handle:
                out[name] = {k: handle.get_tensor(k) for k in handle.keys()}
        elif path.suffix == ".json":
            out[name] = json.loads(path.read_text())
        else:
            out[name] = path.read_bytes()
    return out


def assert_same(a: dict[str, object], b: dict[str, object]) -> None:
    assert a.keys() == b.keys()
    for name, value in a.items():
        if isinstance(value, dict) and value and all(isinstance(v, torch.Tensor) for v in value.values()):
            assert value.keys() == b[name].keys(), name
            for key, tensor in value.items():
                assert torch.equal(tensor, b[name][key]), f"{name}: {key}"
        else:
            assert value == b[name], name


@pytest.mark.parametrize("base, keys, kind, builds", CASES, ids=["lora", "full", "freeze", "freeze-override"])
def test_the_export_equals_the_built_model_path_and_builds_only_where_the_base_changes(make_recipe, monkeypatch,
                                                                                     tmp_path, base, keys, kind,
                                                                                     builds):
    built = []
    real_model = export.Exporter.model
    monkeypatch.setattr(export.Exporter, "model", lambda self: (built.append(1), real_model(self))[1])
    r = make_recipe(base, max_steps=2, **keys)
    result = train(r)
    assert bool(built) == builds  # no second model on the host for LoRA, full, and freeze on an unchanged base
    built.clear()

    engine, name = result.engine, r["model_name_or_path"]
    reference = export.Exporter(engine, name, r["finetuning_type"], lambda: build_model(*recipe_args(r)))
    reference.write(tmp_path / "reference")
    assert built  # the reference took the built path
    assert_same(files(tmp_path / "reference" / kind), files(result.output_dir / kind))
    skeleton = export.Exporter(engine, name, r["finetuning_type"], lambda: build_model(*recipe_args(r)),
                               skeleton=lambda: build_skeleton(*recipe_args(r)),
                               frozen=lambda names: base_subset(recipe_args(r).model, names))
    skeleton.write(tmp_path / "skeleton")
    assert_same(files(tmp_path / "reference" / kind), files(tmp_path / "skeleton" / kind))


def test_the_final_export_is_linked_from_the_last_checkpoint(make_recipe, monkeypatch):
    """The run's export repeats its last checkpoint's: the same files, not gathered and written again, and they
    outlive the checkpoint."""
    writes = []
    real_filled = export.Exporter.filled
    monkeypatch.setattr(export.Exporter, "filled", lambda self, state: (writes.append(1), real_filled(self, state))[1])
    result = train(make_recipe(max_steps=2, save_steps=1))
    out = result.output_dir
    assert len(writes) == 2  # checkpoint-1 and checkpoint-2; the final export wrote nothing
    final, last = out / "adapter" / "adapter_model.safetensors", out / "checkpoint-2" / "adapter" / "adapter_model.safetensors"
    assert os.stat(final).st_ino == os.stat(last).st_ino
    kept = files(out / "adapter")
    assert_same(kept, files(out / "checkpoint-2" / "adapter"))
    shutil.rmtree(out / "checkpoint-2")
    assert_same(kept, files(out / "adapter"))
    assert kept["adapter_model.safetensors"] != {}


def test_freeze_falls_back_to_the_built_model_when_the_base_does_not_fit(make_recipe, monkeypatch, tmp_path):
    """A frozen tensor the base lacks or holds in another shape is never written from it: the export builds the
    model instead, and writes what the reference writes."""
    r = make_recipe(BASE_PT, max_steps=1, finetuning_type="freeze", freeze_trainable_layers=1)
    result = train(r)
    engine, name = result.engine, r["model_name_or_path"]
    reference = export.Exporter(engine, name, "freeze", lambda: build_model(*recipe_args(r)))
    reference.write(tmp_path / "reference")
    built = []
    real_model = export.Exporter.model
    monkeypatch.setattr(export.Exporter, "model", lambda self: (built.append(1), real_model(self))[1])
    for label, frozen in [("wrong-shape", lambda names: {n: torch.zeros(3) for n in names}),
                          ("missing", lambda names: {})]:
        built.clear()
        odd = export.Exporter(engine, name, "freeze", lambda: build_model(*recipe_args(r)),
                              skeleton=lambda: build_skeleton(*recipe_args(r)), frozen=frozen)
        odd.write(tmp_path / label)
        assert built, label
        assert_same(files(tmp_path / "reference" / "model"), files(tmp_path / label / "model"))
