"""deps (for the Makefile) and docs (docs/recipe-reference.md's key tables, generated from the schema)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.recipe import resolve, spec
from pipeline.recipe.deps import lines
from pipeline.recipe.docs import END, START, main as docs_main, render, splice


def test_deps_lines(write):
    write("recipes/common.yaml", "model_name_or_path: tiny\nmax_steps: 2\ncutoff_len: 64\n")
    write("recipes/demo_pt.yaml", "extends: common.yaml\nstage: pt\ndataset: corpus\n")
    write("recipes/demo_sft.yaml", "extends: common.yaml\nmodel_name_or_path: saves/demo_pt/model\n"
                                   "dataset: [a, b]\ndataset_dir: data\n")
    write("data/dataset_info.json", '{"a": {"file_name": "a.json"}, "b": {"file_name": "b dir"}, '
                                    '"corpus": {"file_name": "c.txt"}}')
    write("data/a.json", "[]")
    write("data/b dir/1.json", "[]")  # a path make cannot name: left out
    r = resolve("recipes/demo_sft.yaml", command="deps")
    assert lines(r) == [
        "RECIPE_FILES=recipes/demo_sft.yaml recipes/common.yaml",
        "OUTPUT_DIR=saves/demo_sft",
        "DATASET_DIR=data",
        "DATASETS=a b",
        "DATA_FILES=data/a.json",
        "STAGE=sft",
        "EXPORT_DIR=",
        "BENCHMARK=",
        "BENCHMARK_FILES=",
        "NO_TRAIN=",
        "CHECKPOINT_FILES=",
        "UPSTREAMS=recipes/demo_pt.yaml:train",
        "UPSTREAM=recipes/demo_pt.yaml",
        "UPSTREAM_GOAL=train",
        "SCOPE_FOLDERS=./ data/ recipes/",  # "data/b dir" too, but make cannot name it
    ]
    assert lines(resolve("recipes/demo_pt.yaml", command="deps"))[-3:-1] == ["UPSTREAM=", "UPSTREAM_GOAL="]


def test_deps_of_a_benchmark_recipe(write):
    """LLaMA-Factory's eval recipe (task, no dataset): BENCHMARK names the task for the Makefile's eval rule (no data,
    train or merge), its task folder's files are inputs, and the sft recipe writing its adapter is its upstream."""
    write("recipes/sft.yaml", "model_name_or_path: tiny\ndataset: x\nmax_steps: 1\noutput_dir: saves/sft\n")
    write("recipes/mmlu.yaml", "model_name_or_path: tiny\nadapter_name_or_path: saves/sft\ntemplate: default\n"
                               "task: mmlu_test\ntask_dir: evaluation\n")
    write("evaluation/mmlu/mapping.json", "{}")
    write("evaluation/mmlu/mmlu.zip", "")
    write("evaluation/cmmlu/cmmlu.zip", "")  # another task's folder: not an input
    got = dict(line.split("=", 1) for line in lines(resolve("recipes/mmlu.yaml", command="deps")))
    assert (got["BENCHMARK"], got["BENCHMARK_FILES"], got["DATASETS"]) == \
        ("mmlu_test", "evaluation/mmlu/mapping.json evaluation/mmlu/mmlu.zip", "")
    assert got["UPSTREAMS"] == "recipes/sft.yaml:train"


def test_deps_upstream_with_explicit_output_dir_and_adapter(write):
    write("recipes/a.yaml", "model_name_or_path: tiny\ndataset: x\nmax_steps: 1\noutput_dir: out/first\n")
    write("recipes/b.yaml", "model_name_or_path: tiny\ndataset: x\nmax_steps: 1\nadapter_name_or_path: "
                            "out/first/adapter\n")
    write("recipes/broken.yaml", "this: [is broken\n")  # siblings that do not load are ignored
    assert _upstreams("recipes/b.yaml")[1:] == ["UPSTREAM=recipes/a.yaml", "UPSTREAM_GOAL=train"]
    # a merged model comes from the upstream's merge stage (make runs `merge` there, not only `train`)
    write("recipes/c.yaml", "model_name_or_path: out/first/merged\ndataset: x\nmax_steps: 1\n")
    assert _upstreams("recipes/c.yaml")[1:] == ["UPSTREAM=recipes/a.yaml", "UPSTREAM_GOAL=merge"]


def _upstreams(recipe: str) -> list[str]:
    return [line for line in lines(resolve(recipe, command="deps")) if line.startswith("UPSTREAM")]


def test_deps_dpo_ref_model_is_an_upstream_too(write):
    """ref_model named no upstream: make trained the dpo recipe before its reference existed."""
    write("recipes/sft.yaml", "model_name_or_path: tiny\ndataset: x\noutput_dir: saves/sft\n")
    write("recipes/pt.yaml", "model_name_or_path: tiny\ndataset: x\nstage: pt\nfinetuning_type: full\n")
    write("recipes/dpo.yaml", "model_name_or_path: saves/pt/model\nstage: dpo\ndataset: x\n"
                              "ref_model: saves/sft/merged\n")
    assert _upstreams("recipes/dpo.yaml") == ["UPSTREAMS=recipes/pt.yaml:train recipes/sft.yaml:merge",
                                               "UPSTREAM=recipes/pt.yaml", "UPSTREAM_GOAL=train"]
    # one recipe for both: listed once, with merge (which runs train first)
    write("recipes/dpo.yaml", "model_name_or_path: tiny\nadapter_name_or_path: saves/sft\nstage: dpo\n"
                              "dataset: x\nref_model: saves/sft/merged\n")
    assert _upstreams("recipes/dpo.yaml")[0] == "UPSTREAMS=recipes/sft.yaml:merge"


def test_deps_an_export_dir_is_made_by_export_or_by_merge(write):
    write("recipes/sft.yaml", "model_name_or_path: tiny\ndataset: x\noutput_dir: saves/sft\n")
    # a LLaMA-Factory merge recipe names no dataset: `make export` writes its export_dir (deps reads it too)
    write("recipes/exp.yaml", "model_name_or_path: tiny\nadapter_name_or_path: saves/sft\nexport_dir: saves/sft/hf\n")
    write("recipes/down.yaml", "model_name_or_path: saves/sft/hf\ndataset: x\n")
    # saves/sft/hf is inside sft's output_dir too: the innermost folder names the producer
    assert _upstreams("recipes/down.yaml")[0] == "UPSTREAMS=recipes/exp.yaml:export"
    assert _upstreams("recipes/exp.yaml")[0] == "UPSTREAMS=recipes/sft.yaml:train"
    assert "DATASETS=" in lines(resolve("recipes/exp.yaml", command="deps"))
    # a recipe that trains writes its export_dir with merge
    write("recipes/exp.yaml", "model_name_or_path: tiny\ndataset: x\nexport_dir: saves/sft/hf\n")
    assert _upstreams("recipes/down.yaml")[0] == "UPSTREAMS=recipes/exp.yaml:merge"


def test_deps_refuses_a_cycle_of_upstreams(write):
    write("recipes/a.yaml", "model_name_or_path: saves/b/model\ndataset: x\n")
    write("recipes/b.yaml", "model_name_or_path: tiny\ndataset: x\nstage: dpo\nref_model: saves/a/merged\n")
    with pytest.raises(UserError) as err:
        lines(resolve("recipes/a.yaml", command="deps"))
    assert err.value.messages == [
        "recipes/a.yaml: its upstream recipes lead back to it (recipes/a.yaml -> recipes/b.yaml -> recipes/a.yaml: "
        "each starts from the next one's output), so none can be built first; point one of them "
        "(model_name_or_path, adapter_name_or_path, ref_model, ref_model_adapters or reward_model) at a checkpoint, hub id or "
        "preset instead"]


@pytest.mark.parametrize("theirs", ["saves/merged", "saves/merged/", "saves/merged/v2"])
def test_deps_and_validate_refuse_an_export_dir_another_recipe_writes(write, theirs):
    """Two recipes exporting to one folder: each export replaced the other's, and make (one stamp per recipe) could
    hand a recipe training from the folder the other recipe's newer model."""
    write("recipes/a.yaml", "model_name_or_path: tiny\nadapter_name_or_path: saves/sft\nexport_dir: saves/merged\n")
    write("recipes/b.yaml", f"model_name_or_path: tiny\nadapter_name_or_path: saves/sft\nexport_dir: {theirs}\n")
    write("recipes/c.yaml", "model_name_or_path: tiny\nadapter_name_or_path: saves/sft\nexport_dir: saves/c\n")
    for command in ("deps", "validate"):
        with pytest.raises(UserError) as err:
            resolve("recipes/a.yaml", ["dataset=x"], command=command)
        assert err.value.messages == [
            f"recipes/a.yaml:3:13: export_dir: saves/merged is also written by another recipe "
            f"(recipes/b.yaml has export_dir: {theirs}): each export replaces the whole folder, so one deletes the "
            "other's model, and make could hand a recipe that starts from it the other recipe's export; give each "
            "recipe its own export_dir, e.g. export_dir: saves/a_export"]
    resolve("recipes/c.yaml", command="deps")
    write("saves/sft/adapter_config.json", {"peft_type": "LORA"})  # export loads the adapter: it must be there
    resolve("recipes/a.yaml", command="export")  # LLaMA-Factory's own merge_lora examples share one export_dir


def test_deps_follows_upstreams_across_the_folders_of_the_working_tree(write):
    """LLaMA-Factory keeps the recipe that trains an adapter (examples/train_lora/) apart from the one that merges it
    (examples/merge_lora/): only the merge recipe's own folder was searched, so make exported before training."""
    sft = "model_name_or_path: tiny\ndataset: x\noutput_dir: saves/qwen3-4b/lora/sft\n"
    write("examples/train_lora/qwen3_lora_sft.yaml", sft)
    write("examples/train_lora/qwen3_lora_sft_ds3.yaml", sft + "deepspeed: ds.json\n")  # the same output_dir
    write("examples/merge_lora/qwen3_lora_sft.yaml", "model_name_or_path: tiny\nadapter_name_or_path: "
                                                     "saves/qwen3-4b/lora/sft\nexport_dir: saves/qwen3_sft_merged\n")
    write("examples/train_lora/qwen3_lora_dpo.yaml", "model_name_or_path: saves/qwen3_sft_merged\nstage: dpo\n"
                                                     "dataset: x\nref_model: saves/qwen3_sft_merged\n")
    # not recipes make chains: outputs, hidden folders, a run folder elsewhere, a YAML without model_name_or_path
    for name in ("saves/old/r.yaml", ".git/r.yaml", "runs/a/r.yaml", "docs/r.yaml", "tests/lf/r.yaml"):
        write(name, ("dataset: x\n" if name.startswith("docs") else sft) + "export_dir: saves/qwen3_sft_merged\n")
    write("runs/a/resolved.yaml", "{}\n")
    # the merge recipe's file name picks the train_lora recipe of the two writing the adapter's folder
    assert _upstreams("examples/merge_lora/qwen3_lora_sft.yaml")[0] == (
        "UPSTREAMS=examples/train_lora/qwen3_lora_sft.yaml:train")
    assert _upstreams("examples/train_lora/qwen3_lora_dpo.yaml")[0] == (
        "UPSTREAMS=examples/merge_lora/qwen3_lora_sft.yaml:export")
    # LLaMA-Factory's ppo example reads the reward example's output_dir
    write("examples/train_lora/qwen3_lora_reward.yaml", "model_name_or_path: tiny\nstage: rm\ndataset: x\n"
                                                        "output_dir: saves/qwen3-4b/lora/reward\n")
    write("examples/extras/ppo/qwen3_lora_ppo.yaml", "model_name_or_path: tiny\nstage: ppo\ndataset: x\n"
                                                     "reward_model: saves/qwen3-4b/lora/reward\n")
    assert _upstreams("examples/extras/ppo/qwen3_lora_ppo.yaml")[0] == (
        "UPSTREAMS=examples/train_lora/qwen3_lora_reward.yaml:train")
    from pipeline.recipe.plan import render

    assert render(resolve("examples/train_lora/qwen3_lora_dpo.yaml", command="plan")).splitlines()[1] == (
        "made first by make train / export: examples/merge_lora/qwen3_lora_sft.yaml (export)")
    scope = lines(resolve("examples/train_lora/qwen3_lora_dpo.yaml", command="deps"))[-1]
    assert scope == ("SCOPE_FOLDERS=./ docs/ examples/ examples/extras/ examples/extras/ppo/ examples/merge_lora/ "
                     "examples/train_lora/ runs/")
    # validate and build tokenize with the chain's root, across the folders too
    from pipeline.recipe.deps import tokenizer_source

    write("examples/train_full/full.yaml", "model_name_or_path: tiny\ntokenizer_name_or_path: the/root\n"
                                           "finetuning_type: full\ndataset: x\noutput_dir: saves/full\n")
    write("examples/inference/full.yaml", "model_name_or_path: saves/full/model\ndataset: x\n")
    assert tokenizer_source(resolve("examples/inference/full.yaml", command="build")) == "the/root"


def test_two_recipes_writing_the_path_a_recipe_starts_from_are_one_message(write, tmp_path, monkeypatch):
    sft = "model_name_or_path: tiny\ndataset: x\noutput_dir: saves/llama3-8b/lora/sft\n"
    write("examples/extras/loraplus/llama3_lora_sft.yaml", sft)
    write("examples/train_qlora/llama3_lora_sft_awq.yaml", sft)
    write("examples/extras/nlg_eval/llama3_lora_predict.yaml", "model_name_or_path: tiny\nadapter_name_or_path: "
                                                               "saves/llama3-8b/lora/sft\ndataset: x\n")
    for command in ("deps", "validate"):
        with pytest.raises(UserError) as err:
            resolve("examples/extras/nlg_eval/llama3_lora_predict.yaml", command=command)
        assert err.value.messages == [
            "examples/extras/nlg_eval/llama3_lora_predict.yaml:2:23: adapter_name_or_path: saves/llama3-8b/lora/sft "
            "is written by 2 recipes (examples/extras/loraplus/llama3_lora_sft.yaml, "
            "examples/train_qlora/llama3_lora_sft_awq.yaml), so make cannot tell which one to run first; give the "
            "one you mean an output_dir (or export_dir) of its own and start from that, or name it "
            "llama3_lora_predict.yaml as this recipe is named (make then takes it)"]
    # once the adapter is there nothing needs deciding: make uses it as it is, as it did before it searched the
    # working tree (refusing made LLaMA-Factory's nlg_eval example unusable through make after training it)
    write("saves/llama3-8b/lora/sft/adapter_config.json", {"peft_type": "LORA"})
    resolve("examples/extras/nlg_eval/llama3_lora_predict.yaml", command="validate")
    assert _upstreams("examples/extras/nlg_eval/llama3_lora_predict.yaml")[0] == "UPSTREAMS="
    # an export_dir shared across folders is the export_dir rule's one message
    write("a/x.yaml", "model_name_or_path: tiny\nadapter_name_or_path: saves/s\nexport_dir: saves/m\n")
    write("b/y.yaml", "model_name_or_path: tiny\nadapter_name_or_path: saves/s\nexport_dir: saves/m/v2\n")
    with pytest.raises(UserError) as err:
        resolve("a/x.yaml", ["dataset=x"], command="deps")
    assert err.value.messages[0].startswith("a/x.yaml:3:13: export_dir: saves/m is also written by another recipe "
                                            "(b/y.yaml has export_dir: saves/m/v2)")


def test_the_recipe_beside_it_stays_the_upstream_when_another_folder_writes_the_path_too(write):
    """Before make searched the whole working tree, the recipe in this recipe's own folder writing the path it starts
    from was its upstream: a second recipe elsewhere writing the same folder (an experiment copy) made deps refuse a
    layout that made fine before."""
    sft = "model_name_or_path: tiny\ndataset: x\noutput_dir: saves/sft\n"
    write("recipes/a.yaml", sft)
    write("experiments/b.yaml", sft + "learning_rate: 1.0e-3\n")
    write("recipes/eval.yaml", "model_name_or_path: tiny\nadapter_name_or_path: saves/sft\ndataset: x\n")
    for command in ("deps", "validate"):
        resolve("recipes/eval.yaml", command=command)
    assert _upstreams("recipes/eval.yaml")[0] == "UPSTREAMS=recipes/a.yaml:train"
    from pipeline.__main__ import main

    assert main(["deps", "recipes/eval.yaml"]) == 0  # what make runs
    # from the other folder, neither is beside it: still refused
    write("runs/eval.yaml", "model_name_or_path: tiny\nadapter_name_or_path: saves/sft\ndataset: x\n")
    with pytest.raises(UserError, match="is written by 2 recipes"):
        resolve("runs/eval.yaml", command="deps")


def test_a_path_several_recipes_write_is_no_step_of_a_cycle_once_it_is_there(write):
    """The cycle check followed the first of several recipes writing a path that make does not chain (it is there
    already: upstreams() names none), and refused a chain make runs fine as a cycle."""
    write("recipes/down.yaml", "model_name_or_path: saves/mid\ndataset: x\noutput_dir: saves/p\n")
    write("zz/z.yaml", "model_name_or_path: tiny\ndataset: x\noutput_dir: saves/p\n")
    write("mids/mid.yaml", "model_name_or_path: saves/p\ndataset: x\noutput_dir: saves/mid\n")
    write("saves/p/config.json", {"model_type": "gpt2"})
    assert _upstreams("recipes/down.yaml")[0] == "UPSTREAMS=mids/mid.yaml:train"


def test_the_search_stops_at_its_bounds_but_reads_the_recipes_own_folder(write, monkeypatch):
    """make / validate started from a directory holding a large tree (a home folder, a dataset of many small files)
    walked all of it: the walk stops after MAX_ENTRIES names or MAX_FILES YAML files, the recipe's folder is read."""
    from pipeline.recipe import siblings

    for i in range(10):
        write(f"a_data/f{i}.txt", "x\n")
    write("b/r.yaml", "model_name_or_path: tiny\n")
    write("me/x.yaml", "model_name_or_path: tiny\n")
    write("me/y.yaml", "model_name_or_path: tiny\n")
    assert [str(p) for p in siblings.scanned(Path("me/x.yaml"))[0]] == ["b/r.yaml", "me/x.yaml", "me/y.yaml"]
    monkeypatch.setattr(siblings, "MAX_ENTRIES", 8)  # ./ (3 folders) and a_data/ (10 files): b/ is never walked
    assert [str(p) for p in siblings.scanned(Path("me/x.yaml"))[0]] == ["me/x.yaml", "me/y.yaml"]
    monkeypatch.setattr(siblings, "MAX_ENTRIES", 100_000)
    monkeypatch.setattr(siblings, "MAX_FILES", 1)  # b/r.yaml, then the recipe's own folder
    assert [str(p) for p in siblings.scanned(Path("me/x.yaml"))[0]] == ["b/r.yaml", "me/x.yaml", "me/y.yaml"]


def test_deps_cli(write, capsys):
    from pipeline.__main__ import main

    write("r.yaml", "model_name_or_path: tiny\ndataset: x\nmax_steps: 1\n")
    assert main(["deps", "r.yaml"]) == 0
    assert capsys.readouterr().out.splitlines()[0] == "RECIPE_FILES=r.yaml"


# --- docs -------------------------------------------------------------------------------------------

def test_reference_has_every_key_once_with_its_default_and_range():
    text = render()
    rows = {m.group(1): m.group(0) for m in re.finditer(r"^\| `(\w+)` \|.*$", text, re.M)}
    assert set(rows) == set(spec.properties())
    assert rows["learning_rate"].startswith("| `learning_rate` | float | `5e-05` | &gt; 0 and &lt;= 1 | Peak learning "
                                            "rate of AdamW")
    assert rows["stage"].startswith("| `stage` | enum | `sft` | `pt`, `sft`, `dpo`, `kto`, `rm`, `ppo` |")
    assert "| **required** |" in rows["model_name_or_path"]
    assert "### train" in text and text.startswith(START) and text.endswith(END)


def test_splice_replaces_only_the_region():
    readme = f"# Title\n\nintro\n{START}\nold\n{END}\n\n## After\n"
    out = splice(readme, "NEW")
    assert out == "# Title\n\nintro\nNEW\n\n## After\n"
    assert splice("no markers", "NEW") is None


def test_docs_write_and_check(tmp_path, capsys):
    page = tmp_path / "reference.md"
    page.write_text(f"# T\n{START}\n{END}\nrest\n", encoding="utf-8")
    assert docs_main(["--page", str(page), "--check"]) == 1
    assert docs_main(["--page", str(page)]) == 0
    assert docs_main(["--page", str(page), "--check"]) == 0
    assert page.read_text(encoding="utf-8").endswith(f"{END}\nrest\n")
    page.write_text("# no markers\n", encoding="utf-8")
    assert docs_main(["--page", str(page)]) == 1


def test_reference_page_agrees_with_schema():
    page = Path(__file__).resolve().parents[2] / "docs" / "recipe-reference.md"
    assert START in page.read_text(encoding="utf-8"), f"{page}: the recipe-reference markers are missing"
    assert docs_main(["--page", str(page), "--check"]) == 0, \
        "docs/recipe-reference.md is stale: run `python -m pipeline.recipe.docs`"


def test_a_step_save_total_limit_removes_is_not_trained_for(tmp_path):
    """save_total_limit: 2 with save_steps 1, max_steps 4 keeps checkpoint-3 and -4: step 1 and 2 are removed as
    the run goes on, so make does not chain the training for them (a run trained as typed has no stamp: make
    retrained it from scratch with --retrain-finished) and export names the folder and why. Failed before (None)."""
    from pipeline.recipe.siblings import unsaved_step

    recipe = tmp_path / "train.yaml"
    recipe.write_text("save_steps: 1\nmax_steps: 4\nsave_total_limit: 2\n", encoding="utf-8")
    assert [unsaved_step(recipe, step) is None for step in (1, 2, 3, 4)] == [False, False, True, True]
    assert "save_total_limit 2" in unsaved_step(recipe, 2)


def test_save_strategy_epoch_with_save_total_limit_1_keeps_the_last_step_alone(tmp_path):
    """save_strategy: epoch saves each epoch's end (a step counted from the data: any step may be one), but
    save_total_limit: 1 then keeps the final step alone (train.checkpoint.prune at every save): no other step is
    there to chain the training for. A larger limit keeps epoch ends the data decides: maybe saved. Failed before
    (None for every step under epoch)."""
    from pipeline.recipe.siblings import unsaved_step

    recipe = tmp_path / "train.yaml"
    recipe.write_text("save_strategy: epoch\nmax_steps: 6\nsave_total_limit: 1\n", encoding="utf-8")
    assert [unsaved_step(recipe, step) is None for step in (2, 3, 6)] == [False, False, True]
    assert unsaved_step(recipe, 3) == "save_total_limit 1 removes it (the run keeps checkpoint-6)"
    recipe.write_text("save_strategy: epoch\nmax_steps: 6\nsave_total_limit: 2\n", encoding="utf-8")
    assert unsaved_step(recipe, 3) is None
