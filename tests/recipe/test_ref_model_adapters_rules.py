"""ref_model_adapters' rules and resolution: on top of ref_model only, in the stages with a reference, each folder an
adapter (the check adapter_name_or_path gets), a run's output_dir meaning its adapter/, and make's upstreams."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.recipe import resolve


def messages(path: str, command: str | None = None) -> list[str]:
    with pytest.raises(UserError) as exc:
        resolve(path, command=command)
    return exc.value.messages


def adapter(folder: str) -> str:
    Path(folder).mkdir(parents=True)
    (Path(folder) / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA"}), encoding="utf-8")
    return folder


@pytest.mark.parametrize("lines, command, said", [
    ("stage: dpo\nref_model_adapters: saves/sft\n", None,
     "r.yaml:6:21: ref_model_adapters: given 'saves/sft' but ref_model is not set; the adapters go on top of "
     "ref_model: set ref_model to the base model they were trained on (often model_name_or_path, tiny), or remove "
     "ref_model_adapters"),
    ("stage: sft\nref_model_adapters: saves/sft\n", None,
     "r.yaml:6:21: ref_model_adapters: is a preference-tuning setting but stage is sft; remove it or set stage: dpo"),
    ("stage: dpo\npref_loss: simpo\nref_model: tiny\nref_model_adapters: saves/sft\n", None,
     "r.yaml:7:12: ref_model: is set but pref_loss simpo uses no reference model; remove ref_model and "
     "ref_model_adapters, or choose pref_loss sigmoid, hinge or ipo"),
    ("stage: dpo\npref_loss: orpo\nref_model_adapters: saves/sft\n", None,
     "r.yaml:7:21: ref_model_adapters: is set but pref_loss orpo uses no reference model; remove "
     "ref_model_adapters, or choose"),
    # validate: a folder that exists must be an adapter (a missing one may be an upstream's output: train says so)
    ("stage: kto\nref_model: tiny\nref_model_adapters: empty\n", None,
     "r.yaml:7:21: ref_model_adapters: 'empty' holds no adapter_config.json; expected an adapter directory (LoRA or "
     "OFT: e.g. saves/<recipe>/adapter)"),
    # train loads it now: each folder of several, the missing one named
    ("stage: dpo\nref_model: tiny\nref_model_adapters: one, saves/sft/missing\n", "train",
     "r.yaml:7:21: ref_model_adapters: directory 'saves/sft/missing' does not exist here; if another recipe "
     "produces it, run that one first; expected an adapter directory"),
], ids=["without-ref_model", "under-sft", "reference-free-loss", "reference-free-loss-alone", "not-an-adapter",
        "missing-at-train"])
def test_a_wrong_ref_model_adapters_is_one_message_at_its_line(recipe, lines, command, said):
    Path("empty").mkdir()
    adapter("one")
    found = [m for m in messages(recipe(lines), command) if "ref_model" in m]
    assert len(found) == 1 and found[0].startswith(said), found


def test_sft_with_use_asft_loss_takes_them_as_its_kl_terms_reference(recipe):
    """ASFT scores against the reference dpo / kto use (pipeline.train.preference.starting_reference), so its
    ref_model_adapters are folded in the same way and checked the same way; without use_asft_loss sft refuses them."""
    adapter("saves/sft/adapter")
    r = resolve(recipe("stage: sft\nuse_asft_loss: true\nref_model: tiny\nref_model_adapters: saves/sft\n"))
    assert r["ref_model_adapters"] == "saves/sft/adapter"
    said = messages(recipe("stage: sft\nuse_asft_loss: true\nref_model_adapters: saves/sft\n"))
    assert [m for m in said if "ref_model" in m] == [
        "r.yaml:7:21: ref_model_adapters: given 'saves/sft/adapter' but ref_model is not set; the adapters go on top "
        "of ref_model: set ref_model to the base model they were trained on (often model_name_or_path, tiny), or "
        "remove ref_model_adapters"]


def test_a_runs_output_dir_means_its_adapter_and_keeps_the_recipes_line(recipe):
    """As adapter_name_or_path: LLaMA-Factory's `ref_model_adapters: saves/<sft run>` names the run's output_dir,
    where we keep the adapter in adapter/; each of several is mapped, in order."""
    adapter("saves/sft/adapter")
    adapter("plain")
    r = resolve(recipe("stage: dpo\nref_model: tiny\nref_model_adapters: saves/sft, plain\n"))
    assert r["ref_model_adapters"] == "saves/sft/adapter,plain"
    assert r.origin("ref_model_adapters").where == "r.yaml:7:21"


def test_the_reference_adapters_are_upstreams_of_the_preference_stages_only(write):
    """make builds the sft recipe whose output_dir the dpo recipe's ref_model_adapters name, before the dpo one."""
    from pipeline.recipe.deps import lines, upstream_paths

    assert upstream_paths({"stage": "dpo", "ref_model": "base", "ref_model_adapters": "saves/a, saves/b"}) == [
        "base", "saves/a", "saves/b"]
    assert upstream_paths({"stage": "sft", "ref_model": "base", "ref_model_adapters": "saves/a"}) == []
    assert upstream_paths({"stage": "sft", "use_asft_loss": True, "ref_model": "base",  # ASFT's KL reference
                           "ref_model_adapters": "saves/a"}) == ["base", "saves/a"]
    write("recipes/sft.yaml", "model_name_or_path: tiny\ndataset: x\noutput_dir: saves/sft\n")
    write("recipes/dpo.yaml", "model_name_or_path: tiny\ndataset: x\nstage: dpo\nref_model: tiny\n"
                              "ref_model_adapters: saves/sft\n")
    assert "UPSTREAMS=recipes/sft.yaml:train" in lines(resolve("recipes/dpo.yaml", command="deps"))
