"""resolve(): precedence, provenance for every source, derived values (hand-computed), immutability."""
from __future__ import annotations

import json
import os
import pickle

import pytest
import yaml

from pipeline.errors import UserError
from pipeline.recipe import Resolved, derive_steps, resolve, resolved_yaml
from pipeline.recipe import spec
from tests.acceptance.harness import link_makefile


def test_defaults_fill_every_schema_key(recipe):
    r = resolve(recipe())
    assert set(spec.properties()) <= set(r)
    assert r["learning_rate"] == 5e-5 and r.source("learning_rate") == "default"  # transformers' default
    assert r["lr_scheduler_type"] == "linear" and r["num_train_epochs"] == 3.0
    assert r.learning_rate == r["learning_rate"]  # attribute access


def test_precedence_and_provenance_for_each_source(write):
    write("recipes/base.yaml", """
        model_name_or_path: tiny
        dataset: alpaca_demo
        learning_rate: 3e-4
        lora_rank: 4
        num_train_epochs: 2
        """)
    write("recipes/x.yaml", """
        extends: base.yaml
        cutoff_len: 64

        lora_rank: 16
        """)
    r = resolve("recipes/x.yaml", ["learning_rate=5e-5"])
    assert (r["model_name_or_path"], r.source("model_name_or_path")) == ("tiny", "recipes/base.yaml:1")
    assert (r["num_train_epochs"], r.source("num_train_epochs")) == (2, "recipes/base.yaml:5")
    assert (r["lora_rank"], r.source("lora_rank")) == (16, "recipes/x.yaml:4")  # the recipe beats its base
    assert (r["learning_rate"], r.source("learning_rate")) == (5e-5, "cli")  # the command line beats both
    assert (r["seed"], r.source("seed")) == (42, "default")
    assert (r["lora_alpha"], r.source("lora_alpha")) == (32, "derived")  # 2 x lora_rank
    assert (r["output_dir"], r.source("output_dir")) == ("saves/x", "derived")
    assert r.source("world_size") == "derived"
    assert r.recipe_path.as_posix() == "recipes/x.yaml"
    assert r.files == ("recipes/x.yaml", "recipes/base.yaml")
    assert r["extends"] == "base.yaml"


def test_extends_list_later_files_win(write):
    write("a.yaml", "seed: 1\nlora_rank: 2\n")
    write("b.yaml", "seed: 3\n")
    write("r.yaml", "extends: [a.yaml, b.yaml]\nmodel_name_or_path: tiny\ndataset: d\nmax_steps: 5\n"
                    "cutoff_len: 64\n")
    r = resolve("r.yaml")
    assert (r["seed"], r.source("seed")) == (3, "b.yaml:1")
    assert (r["lora_rank"], r.source("lora_rank")) == (2, "a.yaml:2")
    assert r.files == ("r.yaml", "a.yaml", "b.yaml")


def test_diamond_extends_is_not_a_cycle(write):
    write("common.yaml", "seed: 7\n")
    write("a.yaml", "extends: common.yaml\n")
    write("b.yaml", "extends: common.yaml\n")
    write("r.yaml", "extends: [a.yaml, b.yaml]\nmodel_name_or_path: tiny\ndataset: d\nmax_steps: 5\n")
    assert resolve("r.yaml")["seed"] == 7


def test_explicit_values_are_kept(recipe):
    r = resolve(recipe("lora_alpha: 8\noutput_dir: out/here\n"))
    assert (r["lora_alpha"], r.source("lora_alpha")) == (8, "r.yaml:5")
    assert (r["output_dir"], r.source("output_dir")) == ("out/here", "r.yaml:6")


def test_output_dir_override_to_null_is_filled(recipe):
    r = resolve(recipe("output_dir: out/here\n"), ["output_dir="])
    assert (r["output_dir"], r.source("output_dir")) == ("saves/r", "derived")


def test_lists_are_normalised(recipe):
    r = resolve(recipe("eval_dataset: a, b\n"), ["lora_target=c_attn,c_fc"])
    assert r["dataset"] == ["alpaca_demo"]
    assert r["eval_dataset"] == ["a", "b"]
    assert r["lora_target"] == ["c_attn", "c_fc"] and r.source("lora_target") == "cli"
    assert resolve("r.yaml")["lora_target"] == ["all"]


def test_integral_float_for_an_integer_key_becomes_int(recipe):
    r = resolve(recipe("max_steps: 1e3\n"))
    assert r["max_steps"] == 1000 and type(r["max_steps"]) is int
    assert type(resolve("r.yaml", ["learning_rate=1"])["learning_rate"]) is int  # numbers stay as written


def test_default_cutoff_len_is_capped_at_the_model_context(write):
    write("r.yaml", "model_name_or_path: tiny\ndataset: d\nmax_steps: 1\n")
    r = resolve("r.yaml")
    assert (r["cutoff_len"], r.source("cutoff_len")) == (128, "derived")  # tiny's context; the default is 1024


def test_a_mistral_sliding_window_bounds_no_cutoff_len(write, tmp_path):
    """A Mistral v0.1 config.json: 32,768 positions, a 100-position window. The window bounds what each layer sees,
    not a row (pipeline.model.attention.windowed), so the default cutoff_len (2,048) stays and a cutoff_len past the
    window is accepted; past the context it is refused at its key (rule cutoff_within_context)."""
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "config.json").write_text(json.dumps({
        "architectures": ["MistralForCausalLM"], "model_type": "mistral", "hidden_size": 64, "num_hidden_layers": 2,
        "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 96, "vocab_size": 512,
        "max_position_embeddings": 4096, "sliding_window": 100}))
    write("r.yaml", f"model_name_or_path: {tmp_path / 'm'}\ndataset: d\nmax_steps: 1\n")
    r = resolve("r.yaml")
    assert (r["cutoff_len"], r.source("cutoff_len")) == (2048, "default")
    write("r.yaml", f"model_name_or_path: {tmp_path / 'm'}\ndataset: d\nmax_steps: 1\ncutoff_len: 4096\n")
    assert resolve("r.yaml")["cutoff_len"] == 4096
    write("r.yaml", f"model_name_or_path: {tmp_path / 'm'}\ndataset: d\nmax_steps: 1\ncutoff_len: 4097\n")
    with pytest.raises(UserError) as err:
        resolve("r.yaml")
    assert [m for m in err.value.messages if "cutoff_len" in m] == [
        "r.yaml:4:13: cutoff_len: given 4097, expected at most 4096 (the model's context length); lower cutoff_len, or "
        "set rope_scaling: linear (or dynamic, yarn), which stretches the checkpoint's positions to cutoff_len as "
        "LLaMA-Factory does"]


# --- derived values, hand-computed ------------------------------------------------------------------
# 1000 training examples (600 + 400 over two datasets), micro-batch 8, accumulation 4, 3 epochs, warmup 10%:
# (the train loader drops the last incomplete global batch, so batches/rank rounds down):
#   world 1: batches/rank = floor(1000/8)  = 125 -> steps/epoch = 125 // 4 = 31 -> total = 93 -> warmup ceil(9.3) = 10
#   world 2: batches/rank = floor(1000/16) = 62  -> 15 -> 45 -> ceil(4.5) = 5
#   world 8: batches/rank = floor(1000/64) = 15  -> 3  -> 9  -> ceil(0.9) = 1
@pytest.mark.parametrize("world, batch, per_epoch, total, warmup", [
    (1, 32, 31, 93, 10), (2, 64, 15, 45, 5), (8, 256, 3, 9, 1)])
def test_derived_steps_for_world_sizes(write, manifest, world, batch, per_epoch, total, warmup):
    manifest("a", train=600, val=60)
    manifest("b", train=400, val=40)
    write("r.yaml", "model_name_or_path: tiny\ndataset: [a, b]\ncutoff_len: 64\nnum_train_epochs: 3\n"
                    "per_device_train_batch_size: 8\ngradient_accumulation_steps: 4\nwarmup_ratio: 0.1\n")
    env = {"WORLD_SIZE": str(world), "RANK": str(world - 1), "LOCAL_RANK": "0"}
    r = resolve("r.yaml", env=env)
    assert (r["world_size"], r["rank"], r["local_rank"]) == (world, world - 1, 0)
    assert r["num_train_examples"] == 1000
    assert r["total_train_batch_size"] == batch
    assert r["steps_per_epoch"] == per_epoch
    assert r["total_steps"] == total
    assert r["num_warmup_steps"] == warmup
    assert r.ds_config["train_batch_size"] == batch
    assert all(r.source(k) == "derived" for k in ("total_train_batch_size", "num_train_examples",
                                                  "steps_per_epoch", "total_steps", "num_warmup_steps"))


def test_fractional_epochs_round_up(write, manifest):
    manifest("a", train=1000)
    write("r.yaml", "model_name_or_path: tiny\ndataset: a\ncutoff_len: 64\nnum_train_epochs: 2.5\n"
                    "per_device_train_batch_size: 8\ngradient_accumulation_steps: 4\n")
    r = resolve("r.yaml")
    assert (r["steps_per_epoch"], r["total_steps"], r["num_warmup_steps"]) == (31, 78, 0)  # ceil(2.5 x 31) = 78


def test_max_steps_wins_and_warmup_steps_are_taken_as_given(write, manifest):
    manifest("a", train=1000)
    write("r.yaml", "model_name_or_path: tiny\ndataset: a\ncutoff_len: 64\nnum_train_epochs: 3\nmax_steps: 50\n"
                    "warmup_steps: 7\n")
    r = resolve("r.yaml")
    assert (r["steps_per_epoch"], r["total_steps"], r["num_warmup_steps"]) == (125, 50, 7)


def test_unknown_data_leaves_steps_unknown(recipe):
    r = resolve(recipe("warmup_ratio: 0.1\n"))
    assert (r["num_train_examples"], r["steps_per_epoch"], r["total_steps"], r["num_warmup_steps"]) == \
        (None, None, None, None)


def test_missing_one_manifest_means_unknown(write, manifest):
    manifest("a", train=10)
    write("r.yaml", "model_name_or_path: tiny\ndataset: [a, b]\nmax_steps: 3\n")
    assert resolve("r.yaml")["num_train_examples"] is None


def test_pt_steps_come_from_the_trainer(write, manifest):
    manifest("corpus", train=3)
    write("r.yaml", "model_name_or_path: tiny\ndataset: corpus\nstage: pt\nnum_train_epochs: 2\ncutoff_len: 64\n"
                    "per_device_train_batch_size: 2\nwarmup_ratio: 0.25\n")
    r = resolve("r.yaml")
    assert r["num_train_examples"] is None and r["total_steps"] is None
    # the trainer counts 37 windows: floor(37 / 2) = 18 batches (drop_last) -> 18 steps/epoch -> 36 steps
    # -> warmup ceil(0.25 * 36) = 9
    d = derive_steps(r, 37)
    assert (d["num_train_examples"], d["steps_per_epoch"], d["total_steps"], d["num_warmup_steps"]) == (37, 18, 36, 9)
    assert d.source("total_steps") == "derived"
    assert r["total_steps"] is None  # the original is unchanged


def test_derive_steps_with_world_size(write):
    write("r.yaml", "model_name_or_path: tiny\ndataset: d\nnum_train_epochs: 1\ncutoff_len: 64\n"
                    "per_device_train_batch_size: 4\ngradient_accumulation_steps: 2\n")
    r = resolve("r.yaml", env={"WORLD_SIZE": "2", "RANK": "1"})
    d = derive_steps(r, 100)  # ceil(100 / 8) = 13 batches per rank -> 13 // 2 = 6 steps
    assert (d["steps_per_epoch"], d["total_steps"]) == (6, 6)


def test_rank_must_be_below_world_size(recipe):
    with pytest.raises(UserError) as exc:
        resolve(recipe(), env={"WORLD_SIZE": "2", "RANK": "2"})
    assert exc.value.messages == ["environment RANK=2 is not below WORLD_SIZE=2"]


# --- the Resolved object ----------------------------------------------------------------------------

def test_resolved_is_immutable(recipe):
    r = resolve(recipe())
    with pytest.raises(AttributeError):
        r.learning_rate = 1.0
    with pytest.raises(TypeError):
        r["learning_rate"] = 1.0  # type: ignore[index]
    r["dataset"].append("other")  # a copy: the Resolved keeps its own list
    assert r["dataset"] == ["alpaca_demo"]
    ds = r.ds_config
    ds["train_batch_size"] = 999
    assert r.ds_config["train_batch_size"] == 8


def test_unknown_attribute_suggests(recipe):
    r = resolve(recipe())
    with pytest.raises(AttributeError, match="did you mean 'learning_rate'"):
        r.learning_rat


def test_replace_makes_a_new_resolved(recipe):
    r = resolve(recipe())
    r2 = r.replace(per_device_train_batch_size=2, gradient_accumulation_steps=3)
    assert isinstance(r2, Resolved)
    assert (r2["per_device_train_batch_size"], r2.source("per_device_train_batch_size")) == (2, "derived")
    assert r2.ds_config["train_micro_batch_size_per_gpu"] == 2
    assert r2.ds_config["gradient_accumulation_steps"] == 3
    assert r["per_device_train_batch_size"] == 8 and r.source("per_device_train_batch_size") == "default"
    assert r2.source("model_name_or_path") == "r.yaml:1"
    with pytest.raises(KeyError, match="lora_rank"):
        r.replace(lora_rnak=2)


def test_to_dict_and_pickle(recipe):
    r = resolve(recipe())
    d = r.to_dict()
    assert d["model_name_or_path"] == "tiny" and d["world_size"] == 1
    d["seed"] = 0
    assert r["seed"] == 42
    back = pickle.loads(pickle.dumps(r))
    assert back == r and back.source("cutoff_len") == "r.yaml:4" and back.ds_config == r.ds_config


def test_resolved_yaml_has_every_value_and_its_provenance(recipe):
    r = resolve(recipe("bf16: true\n"), ["seed=7"])
    text = resolved_yaml(r)
    data = yaml.safe_load(text)
    assert data == r.to_dict()
    lines = {line.split(":")[0]: line for line in text.splitlines() if line and not line.startswith("#")}
    assert lines["seed"] == "seed: 7  # cli"
    assert lines["bf16"] == "bf16: true  # r.yaml:5"
    assert lines["model_name_or_path"] == 'model_name_or_path: "tiny"  # r.yaml:1'
    assert lines["adam_beta1"] == "adam_beta1: 0.9  # default"
    assert lines["total_train_batch_size"] == "total_train_batch_size: 8  # derived"


def test_resolved_yaml_records_the_command_that_ran(recipe):
    """merge's refusal of an untrained adapter from another run folder names that run's training from its
    resolved.yaml (pipeline.merge.trained_by): the recipe and each override, written back so that they resolve to
    the same values (a string that reads as another type keeps its quotes)."""
    from pipeline.recipe.resolve import recorded_command
    from pipeline.rerun import run_this

    typed = ["seed=7", "lora_target=[c_attn,c_fc]", "output_dir=saves/x y", "run_name='true'", "dataset=a,b",
             "eval_dataset=[yes]"]
    r = resolve(recipe(), typed)
    path, overrides, folder = recorded_command(resolved_yaml(r))
    assert path == str(r.recipe_path) and folder is None  # typed here, where it ran
    # a list of a key LLaMA-Factory reads as a comma string comes back in that form (it was dataset=["a", "b"]); one
    # whose comma form reads as another type keeps its JSON
    assert sorted(overrides) == sorted(['seed=7', "lora_target=c_attn,c_fc", "output_dir=saves/x y",
                                        'run_name="true"', "dataset=a,b", 'eval_dataset=["yes"]'])
    again = resolve(path, overrides)
    assert all(again[key.split("=")[0]] == r[key.split("=")[0]] for key in typed)
    assert recorded_command("seed: 7  # cli\n") is None  # no resolved.yaml
    # the message's make form (typed in the Makefile's folder) needs no quoting at all (it was
    # ARGS='dataset='"'"'["a", "b"]'"'"'')
    link_makefile(os.getcwd())
    assert "ARGS=dataset=a,b`" in run_this("train", "r.yaml", [o for o in overrides if o.startswith("dataset")])


def test_recorded_command_is_typed_in_the_folder_the_run_started_in(recipe, tmp_path, monkeypatch):
    """A run trained in recipes/ (`cd recipes && python -m pipeline train r.yaml`) recorded r.yaml and that folder
    (resolved.yaml's second line): the command that trains it again is typed there, since the recipe's relative
    paths (output_dir, its default saves/r too) are relative to it. A message typed in the folder above says
    `cd recipes && python -m pipeline train r.yaml`, from outside both the absolute folder, from recipes/ itself no
    cd. A resolved.yaml without that line (older code's), or whose folder holds no such recipe, names the recipe as
    recorded. Failed before (afd494e): recipes/r.yaml from the folder above, which trains saves/r there, not the
    run's recipes/saves/r."""
    from pipeline.recipe.resolve import recorded_command
    from pipeline.rerun import run_this

    recipe(name="recipes/r.yaml")
    monkeypatch.chdir(tmp_path / "recipes")
    text = resolved_yaml(resolve("r.yaml", ["seed=7"]))
    assert recorded_command(text) == ("r.yaml", ("seed=7",), None)
    monkeypatch.chdir(tmp_path)
    assert recorded_command(text) == ("r.yaml", ("seed=7",), "recipes")
    assert run_this("train", *recorded_command(text)) == "`cd recipes && python -m pipeline train r.yaml seed=7`"
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    assert recorded_command(text) == ("r.yaml", ("seed=7",), str(tmp_path / "recipes"))
    first, _, rest = text.split("\n", 2)
    assert recorded_command(f"{first}\n{rest}") == ("r.yaml", ("seed=7",), None)
    moved = f"{first}\n# started in: {tmp_path / 'gone'}\n{rest}"  # a run folder from another machine
    assert recorded_command(moved) == ("r.yaml", ("seed=7",), None)


def test_resolve_reads_manifests_relative_to_dataset_dir(write, manifest):
    manifest("a", train=16, dataset_dir="data")
    write("r.yaml", "model_name_or_path: tiny\ndataset: a\ndataset_dir: data\nmax_steps: 1\n")
    assert resolve("r.yaml")["num_train_examples"] == 16


def test_a_missing_recipe(tmp_path):
    with pytest.raises(UserError) as exc:
        resolve("nope.yaml")
    assert exc.value.messages == [f"nope.yaml: recipe not found (looked in {tmp_path / 'nope.yaml'})"]


def test_a_missing_recipe_under_a_long_folder_gets_only_a_close_name(tmp_path):
    """The recipe names are compared, not whole paths: under a long folder every sibling was 'close' to any name
    (zzzz.yaml got 'did you mean .../demo_pt.yaml'), as validate's model folders were (errors.did_you_mean's show=)."""
    folder = tmp_path / "a_rather_long_folder_name" / "recipes"
    folder.mkdir(parents=True)
    (folder / "demo_pt.yaml").write_text("model_name_or_path: tiny\n")
    for given, hint in (("zzzz.yaml", ""), ("demo_p.yaml", f" (did you mean '{folder / 'demo_pt.yaml'}'?)")):
        with pytest.raises(UserError) as exc:
            resolve(str(folder / given))
        assert exc.value.messages == [f"{folder / given}: recipe not found (looked in {folder / given}){hint}"]


def test_json_dump_of_ds_config_is_valid(recipe):
    """The DeepSpeed JSON survives a strict JSON round trip (no NaN/Infinity, no Python-only values) unchanged,
    and DeepSpeed's own config reader accepts it with the recipe's batch layout."""
    from deepspeed.runtime.config import DeepSpeedConfig

    r = resolve(recipe())
    text = json.dumps(r.ds_config, allow_nan=False)
    assert json.loads(text) == r.ds_config
    ds = DeepSpeedConfig(json.loads(text))
    assert (ds.train_micro_batch_size_per_gpu, ds.gradient_accumulation_steps) == \
        (r["per_device_train_batch_size"], r["gradient_accumulation_steps"])
    assert ds.train_batch_size == r["total_train_batch_size"]


def test_resume_from_checkpoint_true_is_latest(recipe):
    """transformers' Trainer.train(resume_from_checkpoint=True) resumes from the newest checkpoint; a recipe written
    for it says `resume_from_checkpoint: true`, which was refused as not a string."""
    assert resolve(recipe(), ["resume_from_checkpoint=true"])["resume_from_checkpoint"] == "latest"
    assert resolve(recipe(), ["resume_from_checkpoint=false"])["resume_from_checkpoint"] is None


@pytest.mark.parametrize("extra, dtype, source", [
    ("pure_bf16: true\nfinetuning_type: full", "bf16", "derived"),  # its model/ is bf16: the same values, half size
    ("pure_bf16: true\nfinetuning_type: freeze", "bf16", "derived"),
    ("pure_bf16: true\nfinetuning_type: lora", "fp32", "default"),  # W + B A is no bf16 value
    ("finetuning_type: full", "fp32", "default"),
    ("pure_bf16: true\nfinetuning_type: full\nexport_dtype: fp32", "fp32", "r.yaml:"),  # the recipe's word stands
])
def test_export_dtype_left_out_follows_a_pure_bf16_runs_weights(recipe, extra, dtype, source):
    r = resolve(recipe(extra))
    assert r["export_dtype"] == dtype and r.source("export_dtype").startswith(source)
