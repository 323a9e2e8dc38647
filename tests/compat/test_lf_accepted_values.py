"""Recipe values LLaMA-Factory accepts that the pipeline used to refuse, through the CLI as a user types it.

val_size: LLaMA-Factory's data_utils.split_dataset takes "an integer or a float in range [0,1)", default 0 (no
evaluation split). alpaca_en_demo has 16 rows and identity 8 (tests/compat/lf_data), split per dataset here.

Each command (build, plan, validate, train, eval) runs as typed here, once at least for a success and for a refusal;
further cases run main(argv) in this process (as_typed=False: the same code and messages, without an interpreter
start each). Training runs stay typed.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from tests.acceptance.harness import pipeline
from tests.compat.test_lf_recipes import lf_checkout, tiny_recipe

TWO_DATASETS = "alpaca_en_demo,identity"  # 16 + 8 rows


def splits(work: Path) -> dict[str, dict[str, int]]:
    return {name: json.loads((work / "data/build" / name / "manifest.json").read_text("utf-8"))["splits"]
            for name in TWO_DATASETS.split(",")}


def eval_losses(work: Path) -> list[int]:
    log = (work / "saves/tiny/trainer_log.jsonl").read_text("utf-8").splitlines()
    return [rec["step"] for rec in map(json.loads, log) if "eval_loss" in rec]


def test_val_size_zero_builds_no_val_split_and_trains(tmp_path):
    """build and plan of val_size 0; its training (no val split: nothing evaluated, nothing crashed, the adapter
    written) is test_interleave_mix_trains_on_the_rows_hf_interleaves's run, on these two datasets at val_size 0."""
    work = lf_checkout(tmp_path, "tiny")
    recipe = tiny_recipe(work, dataset=TWO_DATASETS, val_size=0)
    built = pipeline("build", recipe, cwd=work)
    assert "train 16 · val 0" in built.stdout and "train 8 · val 0" in built.stdout
    assert splits(work) == {"alpaca_en_demo": {"train": 16, "val": 0}, "identity": {"train": 8, "val": 0}}
    assert "val_size                   0" in pipeline("plan", recipe, cwd=work).stdout


def test_val_size_zero_refuses_an_evaluation_it_cannot_do(tmp_path):
    work = lf_checkout(tmp_path, "tiny")
    recipe = tiny_recipe(work, dataset=TWO_DATASETS, val_size=0)
    pipeline("build", recipe, cwd=work, as_typed=False)
    for args, asked in ((("train", recipe, "eval_strategy=steps", "do_predict=true"), "eval_strategy and do_predict"),
                        (("eval", recipe), "the eval command")):
        failed = pipeline(*args, cwd=work, expect=2)
        assert f"{recipe}:" in failed.stderr and "val_size: given 0: no validation split" in failed.stderr
        assert f"so {asked} would have nothing to evaluate" in failed.stderr and "Traceback" not in failed.stderr
    # an eval_dataset outside `dataset` is evaluated whole: val_size 0 is fine then
    pipeline("validate", recipe, "dataset=alpaca_en_demo", "eval_dataset=identity", "eval_strategy=steps", cwd=work)


@pytest.mark.slow  # ~10 s: trains one step through the CLI
def test_val_size_integer_holds_out_that_many_rows_per_dataset(tmp_path):
    work = lf_checkout(tmp_path, "tiny")
    recipe = tiny_recipe(work, dataset=TWO_DATASETS, val_size=5)
    pipeline("build", recipe, cwd=work, as_typed=False)
    assert splits(work) == {"alpaca_en_demo": {"train": 11, "val": 5}, "identity": {"train": 3, "val": 5}}
    assert "val_size                   5" in pipeline("plan", recipe, cwd=work, as_typed=False).stdout
    pipeline("train", recipe, cwd=work)
    assert eval_losses(work) == [1]  # do_eval null: the final evaluation on the 10 held-out rows


def test_val_size_integer_that_leaves_nothing_to_train_and_bad_values(tmp_path):
    work = lf_checkout(tmp_path, "tiny")
    recipe = tiny_recipe(work, dataset=TWO_DATASETS, val_size=8)
    failed = pipeline("build", recipe, cwd=work, expect=2)  # nothing built yet: the build says it
    assert ("dataset 'identity' (data/dataset_info.json:2): 8 rows remain after cleaning (read 8; removed: none); "
            "val_size 8 leaves 0 for training and 8 for validation, and both need at least one") in failed.stderr
    pipeline("build", recipe, "val_size=7", cwd=work, as_typed=False)
    failed = pipeline("validate", recipe, cwd=work, expect=2)  # built: the recipe check says it
    assert (f"{recipe}:" in failed.stderr and "val_size: given 8, but dataset 'identity' has 8 rows: nothing would be "
            "left to train on; lower val_size (at most 7 rows)") in failed.stderr
    for value in ("2.5", "-1", "1.5"):
        failed = pipeline("validate", recipe, f"val_size={value}", cwd=work, expect=2, as_typed=False)
        assert f"val_size: given {value} " in failed.stderr
        assert "expected an integer >= 0 or a number >= 0 and < 1" in failed.stderr


def hf_interleaved(work: Path, probs: list[float], seed: int, stopping: str) -> list[dict]:
    """HF datasets' interleave_datasets (what LLaMA-Factory's merge_dataset calls) over the built train splits."""
    datasets = pytest.importorskip("datasets")
    parts = [datasets.Dataset.from_list(json.loads((work / "data/build" / name / "train.json").read_text("utf-8")))
             for name in TWO_DATASETS.split(",")]
    return datasets.interleave_datasets(parts, probabilities=probs, seed=seed, stopping_strategy=stopping).to_list()


def training_rows(work: Path, recipe: str) -> list[dict]:
    """The rows the train command reads (pipeline.data.load), resolved from the recipe in the working copy."""
    import os

    from pipeline.data.load import load_split
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args

    here = os.getcwd()
    os.chdir(work)
    try:
        return load_split(data_args(resolve(recipe, [], command="train")), "train")
    finally:
        os.chdir(here)


def test_interleave_mix_trains_on_the_rows_hf_interleaves(tmp_path):
    """mix_strategy interleave_under with interleave_probs, from a LLaMA-Factory dataset_info.json through build,
    plan and train on a transformers-written checkpoint; the trained rows are HF's interleave_datasets of the
    built train splits (16 + 8 rows, val_size 0), with LLaMA-Factory's seed."""
    peft, transformers = pytest.importorskip("peft"), pytest.importorskip("transformers")
    from tests.acceptance.harness import write_hf_checkpoint

    write_hf_checkpoint(tmp_path / "ckpt", "gpt2")
    work = lf_checkout(tmp_path / "lf", str(tmp_path / "ckpt"))
    recipe = tiny_recipe(work, model_name_or_path=str(tmp_path / "ckpt"), dataset=TWO_DATASETS,
                         mix_strategy="interleave_under", interleave_probs="0.7,0.3", seed=3, max_steps=2, val_size=0)
    pipeline("build", recipe, cwd=work, as_typed=False)
    golden = hf_interleaved(work, [0.7, 0.3], 3, "first_exhausted")
    assert training_rows(work, recipe) == golden and len(golden) < 24  # under: stops when one dataset runs out
    planned = pipeline("plan", recipe, cwd=work, as_typed=False).stdout
    assert f"num_train_examples      {len(golden)}     interleave_under of splits.train" in planned
    trained = pipeline("train", recipe, cwd=work)
    assert f"data: {len(golden)} examples" in trained.stdout + trained.stderr
    assert eval_losses(work) == []  # val_size 0, no val split: nothing evaluated, nothing crashed
    adapter = work / "saves/tiny/adapter"
    peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ckpt"), adapter)


def test_an_interleave_probs_mistake_is_one_message_with_the_recipe_line(tmp_path):
    """The other mistakes: tests/recipe/test_recipe_rules.py (in-process)."""
    work = lf_checkout(tmp_path, "tiny")
    recipe = tiny_recipe(work, dataset=TWO_DATASETS, mix_strategy="interleave_over", interleave_probs="1.0,0.0")
    line = next(n for n, text in enumerate((work / recipe).read_text("utf-8").splitlines(), 1)
                if text.startswith("interleave_probs"))
    failed = pipeline("validate", recipe, cwd=work, expect=2, as_typed=False)
    assert f"{recipe}:{line}:19: interleave_probs: given '1.0,0.0': a dataset of probability 0 is never drawn, so " \
           "with mix_strategy interleave_over the mix never ends" in failed.stderr
    assert "Traceback" not in failed.stderr and len(failed.stderr.strip().splitlines()) == 1


def test_a_dataset_listed_twice_is_one_message_with_the_recipe_line(tmp_path):
    """LLaMA-Factory reads `identity,identity` once (its loader keys the datasets by name); here the built split was
    read twice, and under interleave plan counted two datasets (12 rows with these probabilities) while train read
    one of 14. Refused before anything runs."""
    work = lf_checkout(tmp_path, "tiny")
    recipe = tiny_recipe(work, dataset="identity,identity", mix_strategy="interleave_under", interleave_probs="0.5,0.5")
    line = next(n for n, text in enumerate((work / recipe).read_text("utf-8").splitlines(), 1)
                if text.startswith("dataset:"))
    failed = pipeline("validate", recipe, cwd=work, expect=2, as_typed=False)
    assert f"{recipe}:{line}:10: dataset: given identity, identity: 'identity' listed more than once; expected each " \
           "dataset once (LLaMA-Factory reads a repeated name once)" in failed.stderr, failed.stderr
    assert "Traceback" not in failed.stderr and len(failed.stderr.strip().splitlines()) == 1


def cache_model(home: Path, repo_id: str, revision: str = "main") -> Path:
    """A GPT-2 checkpoint (the tiny preset's vocabulary) as the hub cache stores it: hub/models--Org--Name/
    {refs/<revision>, snapshots/<commit>/} (blobs omitted: a snapshot's files may be plain files)."""
    from tests.acceptance.harness import write_hf_checkpoint

    commit = "b" * 40
    repo = home / "hub" / f"models--{repo_id.replace('/', '--')}"
    write_hf_checkpoint(repo / "snapshots" / commit, "gpt2", n_positions=128)
    (repo / "refs").mkdir()
    (repo / "refs" / revision).write_text(commit)
    return repo / "snapshots" / commit


@pytest.mark.slow  # ~15 s: trains one dpo step through the CLI
def test_ref_model_as_a_hub_id_resolves_from_the_offline_cache(tmp_path):
    from tests.acceptance.harness import cli_env

    work = lf_checkout(tmp_path, "tiny")
    env = cli_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    snapshot = cache_model(tmp_path / "hf", "Org/Tiny-GPT2")
    recipe = tiny_recipe(work, model_name_or_path=str(snapshot), stage="dpo", dataset="dpo_en_demo", cutoff_len=128,
                         ref_model="Org/Tiny-GPT2")
    pipeline("build", recipe, cwd=work, env=env, as_typed=False)
    pipeline("validate", recipe, cwd=work, env=env, as_typed=False)
    pipeline("train", recipe, cwd=work, env=env)
    log = json.loads((work / "saves/tiny/trainer_log.jsonl").read_text("utf-8").splitlines()[0])
    # the reference is the policy's starting weights (LoRA starts as the identity): sigmoid loss -log(1/2) at step 1
    assert log["step"] == 1 and abs(log["loss"] - math.log(2)) < 1e-5
    failed = pipeline("train", recipe, "ref_model=Org/Not-Cached", "overwrite_output_dir=true", cwd=work, env=env,
                      expect=2, as_typed=False)
    assert ("command line override ref_model=Org/Not-Cached: ref_model: 'Org/Not-Cached' is neither a local "
            "directory nor a cached hub snapshot (HF_HUB_OFFLINE=1 and it is not in") in failed.stderr
    assert "hf download Org/Not-Cached" in failed.stderr and "Traceback" not in failed.stderr


def test_model_revision_main_is_accepted_and_another_points_at_the_snapshot_folder(tmp_path):
    from tests.acceptance.harness import cli_env

    work = lf_checkout(tmp_path, "tiny")
    env = cli_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    snapshot = cache_model(tmp_path / "hf", "Org/Tiny-GPT2", revision="v1")  # `hf download --revision v1`
    recipe = tiny_recipe(work, model_revision="main")
    pipeline("build", recipe, cwd=work, env=env, as_typed=False)
    pipeline("validate", recipe, cwd=work, env=env)
    failed = pipeline("validate", recipe, "model_name_or_path=Org/Tiny-GPT2", "model_revision=v1", cwd=work, env=env,
                      expect=2, as_typed=False)
    assert ("model_revision: given 'v1': revisions other than main are not supported yet; it is in the HF cache: set "
            f"model_name_or_path to its snapshot folder, {snapshot}, and remove model_revision") in failed.stderr
    failed = pipeline("validate", recipe, "model_name_or_path=Org/Tiny-GPT2", "model_revision=v2", cwd=work, env=env,
                      expect=2, as_typed=False)
    assert "download it with `hf download Org/Tiny-GPT2 --revision v2 --include 'config.json'" in failed.stderr
    assert f"{snapshot.parent}/<commit> (the commit is in {snapshot.parents[1] / 'refs/v2'}" in failed.stderr
    failed = pipeline("validate", recipe, "model_revision=v1", cwd=work, env=env, expect=2, as_typed=False)
    assert "model_name_or_path 'tiny' is not a hub id (a directory or preset has no revisions)" in failed.stderr
    failed = pipeline("validate", recipe, "model_name_or_path=models/gpt2", "model_revision=v1", cwd=work, env=env,
                      expect=2, as_typed=False)  # a folder under models/, where checkpoints go: no hub download
    assert "model_name_or_path 'models/gpt2' is not a hub id" in failed.stderr and "hf download" not in failed.stderr
    pipeline("validate", recipe, f"model_name_or_path={snapshot}", cwd=work, env=env, as_typed=False)  # the advice works


def test_a_cached_id_in_the_wrong_case_or_the_cache_folder_itself_gets_the_right_name(tmp_path):
    """Offline, `org/tiny-gpt2` misses a cached `Org/Tiny-GPT2` (the hub ignores case, the cache does not), and a
    path to hub/models--Org--Tiny-GPT2 is the cache's folder, not a checkpoint: each message names what to use."""
    from tests.acceptance.harness import cli_env

    work = lf_checkout(tmp_path, "tiny")
    env = cli_env(HF_HOME=str(tmp_path / "hf"), HF_HUB_OFFLINE="1")
    snapshot = cache_model(tmp_path / "hf", "Org/Tiny-GPT2")
    recipe = tiny_recipe(work)
    pipeline("build", recipe, cwd=work, env=env, as_typed=False)
    done = pipeline("validate", recipe, "model_name_or_path=org/tiny-gpt2", cwd=work, env=env)  # data need no model
    assert "(did you mean 'Org/Tiny-GPT2'? it is cached)" in done.stdout
    failed = pipeline("train", recipe, "model_name_or_path=org/tiny-gpt2", cwd=work, env=env, expect=2,
                      as_typed=False)
    assert "(did you mean 'Org/Tiny-GPT2'? it is cached)" in failed.stderr and "Traceback" not in failed.stderr
    folder = snapshot.parents[1]
    failed = pipeline("validate", recipe, f"model_name_or_path={folder}", cwd=work, env=env, expect=2,
                      as_typed=False)
    assert (f"model_name_or_path: {folder} is a Hugging Face cache folder (it holds snapshots/, not a checkpoint); "
            f"set it to the hub id 'Org/Tiny-GPT2', or to its snapshot {snapshot}") in failed.stderr
    assert len(failed.stderr.strip().splitlines()) == 1
    pipeline("validate", recipe, "model_name_or_path=Org/Tiny-GPT2", cwd=work, env=env, as_typed=False)  # advice works
