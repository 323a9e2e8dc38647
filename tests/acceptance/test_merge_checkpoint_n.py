"""A run's checkpoint-N (save_steps) used as users do after training. One run trained as typed (`python -m pipeline
train`, no make: no stamps) on a transformers-written GPT-2, two steps, a checkpoint each, in a scratch repository
(recipes/train.yaml, output_dir saves/r). Golden values: PEFT's reading of checkpoint-1/adapter on the same base
(logits, losses, greedy tokens).

- Merging it the LLaMA-Factory way: a merge recipe whose adapter_name_or_path is the run's checkpoint-N folder
  (LLaMA-Factory's examples/merge_lora with adapter_name_or_path: saves/x/checkpoint-500). Our checkpoint-N keeps its
  adapter in checkpoint-N/adapter/ (pipeline.train.checkpoint), which resolve reads for checkpoint-N
  (recipe.run_folders.run_adapter), so `export` merges step N. The training recipe itself with adapter_name_or_path
  at its own checkpoint-N merged the run's final adapter without a word (merge takes what the recipe trained first:
  runtime.layout.trained_weights): it is refused, naming the two ways that merge step N: the merge recipe, or the
  same recipe with another output_dir (rules.outputs.adapter_is_no_checkpoint_of_this_run; it exited 0 before).
- Evaluating it with an eval recipe of its own, and chatting with it (--model adapter, one prompt), from another
  output_dir.
- `make export` of the merge recipe with the training recipe in scope: the checkpoint is used as it is
  (pipeline.recipe.deps._upstream).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

from tests.acceptance.harness import (cli_env, make, make_stages, pipeline, refused, scratch_repo, write_data,
                                      write_recipe)

STEP1 = "saves/r/checkpoint-1"

# LLaMA-Factory's examples/merge_lora/qwen3_lora_sft.yaml, with our tiny base, its template and step 1's checkpoint
MERGE_RECIPE = """### model
model_name_or_path: {base}
adapter_name_or_path: saves/r/checkpoint-1
template: alpaca
trust_remote_code: true

### export
export_dir: saves/r_step1
export_size: 5
export_device: cpu
export_legacy_format: false
"""
# an eval recipe of the user's own: LLaMA-Factory's extras/nlg_eval predict recipe with the dataset this pipeline
# requires (docs/coming-from-llama-factory.md); step 1's adapter on the base, the held-out rows, another output_dir;
# run_name without wandb has a notice (validate's, not eval's again under make)
EVAL_RECIPE = """model_name_or_path: {base}
adapter_name_or_path: saves/r/checkpoint-1
stage: sft
do_train: false
do_predict: true
finetuning_type: lora
template: alpaca
dataset: tiny_sft
cutoff_len: 48
max_new_tokens: 4
max_eval_samples: 2
eval_base: false
output_dir: saves/eval_step1
run_name: step1
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory, hf_checkpoint) -> tuple[Path, Path]:
    """(a scratch repository whose recipes/train.yaml trained saves/r as typed, with recipes/eval_step1.yaml naming
    its step 1; the base checkpoint)."""
    repo = scratch_repo(tmp_path_factory.mktemp("checkpoint_n") / "repo")
    base = hf_checkpoint("gpt2")
    write_data(repo / "datasets")
    (repo / "recipes").mkdir()
    write_recipe(repo / "recipes/train.yaml", model_name_or_path=str(base), output_dir="saves/r", max_steps=2,
                 save_steps=1, learning_rate=5e-2)
    pipeline("build", "recipes/train.yaml", cwd=repo, as_typed=False)  # no model: the same files as typed
    pipeline("train", "recipes/train.yaml", cwd=repo)
    assert (repo / STEP1 / "adapter/adapter_model.safetensors").is_file() and (repo / "saves/r/adapter").is_dir()
    (repo / "recipes/eval_step1.yaml").write_text(EVAL_RECIPE.format(base=base), encoding="utf-8")
    return repo, base


def _peft(base: Path, adapter: Path):
    import peft
    import transformers

    return peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), adapter).eval()


def test_a_merge_recipe_naming_checkpoint_n_merges_step_n(run):
    import transformers

    repo, base = run
    out = repo / "saves/r"
    (repo / "recipes/merge.yaml").write_text(MERGE_RECIPE.format(base=base), encoding="utf-8")
    # in this process (main(argv)): export as typed is driven by tests/acceptance/test_export_ends_answers.py;
    # what is new here, the checkpoint folder read as its adapter/, is the same without an interpreter's start
    done = pipeline("export", "recipes/merge.yaml", cwd=repo, as_typed=False)
    assert "exported adapter saves/r/checkpoint-1/adapter onto" in done.stderr, done.stderr[-2000:]

    merged = transformers.AutoModelForCausalLM.from_pretrained(repo / "saves/r_step1").eval()
    step1, final = _peft(base, out / "checkpoint-1/adapter"), _peft(base, out / "adapter")
    x = torch.randint(0, merged.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = step1(x).logits
        assert torch.allclose(merged(x).logits, want, atol=1e-4, rtol=0)
        assert (final(x).logits - want).abs().max() > 1e-3  # step 2 moved the adapter: step 1's was merged

    # the training recipe pointed at its own checkpoint: refused, naming both ways; the first, another output_dir,
    # merges the same model as the merge recipe
    train = "recipes/train.yaml"
    err = refused("merge", train, "adapter_name_or_path=saves/r/checkpoint-1", cwd=repo, as_typed=False)
    assert ("saves/r/checkpoint-1/adapter is step 1's adapter of this recipe's own run (output_dir saves/r), but "
            "this recipe's merge, eval and chat use that run's final adapter (saves/r/adapter)") in err, err
    assert "give it with another output_dir (adapter_name_or_path=saves/r/checkpoint-1 output_dir=saves/r-step1: " in err
    assert "(model_name_or_path, adapter_name_or_path: saves/r/checkpoint-1, template, export_dir)" in err
    assert not (out / "merged").exists()
    pipeline("merge", train, "adapter_name_or_path=saves/r/checkpoint-1", "output_dir=saves/r-step1", cwd=repo,
             as_typed=False)
    again = transformers.AutoModelForCausalLM.from_pretrained(repo / "saves/r-step1/merged").state_dict()
    assert all(torch.equal(again[k], v) for k, v in merged.state_dict().items())


@torch.no_grad()
def _loss(model, recipe: Path, cwd: Path) -> float:
    """Mean cross-entropy over the trained tokens of the recipe's held-out rows, by transformers (`model`) on the
    pipeline's batches (ids and labels: the tokenization is tested against LLaMA-Factory elsewhere)."""
    from pipeline.data.loaders import make_loader
    from pipeline.recipe import resolve
    from pipeline.recipe.args import data_args

    here = os.getcwd()
    os.chdir(cwd)
    try:
        loader = make_loader(data_args(resolve(recipe, [], command="eval")), "val", rank=0, world_size=1,
                             shuffle=False, say_workers=False)
        total, count = 0.0, 0
        for k in range(len(loader)):
            batch = loader.batch(k)
            logits = model(batch["input_ids"], attention_mask=batch.get("attention_mask")).logits
            labels = batch["labels"]  # the pipeline's labels are shifted already: position i's label is token i+1
            total += torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100,
                                                       reduction="sum").item()
            count += int((labels != -100).sum())
    finally:
        os.chdir(here)
    return total / count


def test_an_eval_recipe_of_checkpoint_n_evaluates_that_step(run):
    """eval of an eval recipe naming saves/r/checkpoint-1 scores step 1's adapter: its tuned loss
    is PEFT's on checkpoint-1/adapter, not the final adapter's; the run's folder gets no eval/. `make eval` of it
    runs build, validate and eval: before, it ran train, which refused the recipe (lora_rank 8, the default, against
    the adapter's r 4: a rule for continuing an adapter, applied where do_train: false only evaluates; this test
    failed there) and would then have evaluated, and merge, which wrote a merged copy, before eval. eval says none
    of the notices validate said."""
    from pipeline.recipe import resolve

    repo, base = run
    assert make_stages(make("-n", "eval", "RECIPE=recipes/eval_step1.yaml", f"VENV={repo / 'venv'}", cwd=repo)) == \
        [("build", "recipes/eval_step1.yaml"), ("validate", "recipes/eval_step1.yaml"), ("eval", "recipes/eval_step1.yaml")]
    here = os.getcwd()
    os.chdir(repo)
    try:  # train (llamafactory-cli train's verb for this recipe) evaluates it: its rules pass
        assert resolve("recipes/eval_step1.yaml", [], command="train")["do_train"] is False
    finally:
        os.chdir(here)
    recipe = repo / "recipes/eval_step1.yaml"
    pipeline("build", recipe, cwd=repo, as_typed=False)
    # eval as make runs it after validate (its stamp touched: validate's notices are tests/recipe's), its command
    # replaced by one that shows the environment make gives it: validate's stamp (PIPELINE_AFTER_VALIDATE), with which
    # eval does not say the recipe's run_name notice again; eval typed alone says it (tests/recipe/test_review_h199).
    # Failed without the Makefile's export (eval said it a second time). eval itself runs in this process (main(argv)):
    # what is asked is which weights it takes, which an interpreter's start does not change (eval as typed:
    # tests/evaluate, test_user_paths; a real `make eval` of this recipe costs 6 s more)
    args = ("RECIPE=recipes/eval_step1.yaml", f"VENV={repo / 'venv'}")
    make("-t", "validate", *args, cwd=repo)
    shown = make("eval", *args, """LAUNCH=sh -c 'echo "after validate: $$PIPELINE_AFTER_VALIDATE"' sh""", cwd=repo)
    (after,) = [line.partition(": ")[2] for line in shown.stdout.splitlines() if line.startswith("after validate:")]
    assert Path(repo / after).name == "validate" and Path(repo / after).is_file(), shown.stdout
    err = pipeline("eval", "recipes/eval_step1.yaml", cwd=repo, as_typed=False,
                   env=cli_env(PIPELINE_AFTER_VALIDATE=after)).stderr
    assert not [line for line in err.splitlines() if line.startswith("notice:")], err
    metrics = json.loads((repo / "saves/eval_step1/eval/metrics.json").read_text())
    assert metrics["tuned_model"] == f"{base} + LoRA adapter {STEP1}/adapter"
    tuned = metrics["results"]["tuned"]["loss"]
    want = _loss(_peft(base, repo / STEP1 / "adapter"), recipe, repo)
    final = _loss(_peft(base, repo / "saves/r/adapter"), recipe, repo)
    assert abs(tuned - want) < 1e-4 and abs(final - want) > 1e-3, (tuned, want, final)
    assert not (repo / "saves/r/eval").exists()


def test_a_benchmark_recipe_of_checkpoint_n_loads_that_step(run):
    """A benchmark recipe (LLaMA-Factory's eval recipe: task, adapter_name_or_path saves/r/checkpoint-1) loads step
    1's adapter for its questions: the model eval's benchmark takes (pipeline.evaluate.choice._model, in this
    process: the benchmark's run is tests/evaluate's) computes PEFT's logits of checkpoint-1/adapter."""
    from pipeline.evaluate.choice import _model
    from pipeline.recipe import resolve

    repo, base = run
    (repo / "recipes/mmlu_step1.yaml").write_text(
        f"model_name_or_path: {base}\nadapter_name_or_path: {STEP1}\ntemplate: fewshot\ntask: mmlu_test\n"
        "task_dir: evaluation\nn_shot: 0\n", encoding="utf-8")
    here = os.getcwd()
    os.chdir(repo)
    try:
        model, described = _model(resolve("recipes/mmlu_step1.yaml", [], command="eval"))
    finally:
        os.chdir(here)
        (repo / "recipes/mmlu_step1.yaml").unlink()
    assert described == f"{base} + LoRA adapter {STEP1}/adapter"
    x = torch.randint(0, 50257, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(x).float(), _peft(base, repo / STEP1 / "adapter")(x).logits, atol=1e-4, rtol=0)


def test_chat_with_checkpoint_n_answers_as_that_step(run):
    """`python -m pipeline chat R --model adapter --prompt ...` (main(argv) in this process) of the eval recipe,
    checkpoint-1 from another output_dir, prints transformers + PEFT's greedy answer of step 1's adapter."""
    from pipeline.data.tokenizer import gpt2

    repo, base = run
    out = pipeline("chat", "recipes/eval_step1.yaml", "--model", "adapter", "--prompt", "Name a colour.", cwd=repo,
                   as_typed=False).stdout
    tok = gpt2().encoding.tiktoken
    prompt = ("Below is an instruction that describes a task. Write a response that appropriately completes the "
              "request.\n\n### Instruction:\nName a colour.\n\n### Response:\n")
    ids = torch.tensor([tok.encode_ordinary(prompt)])
    with torch.no_grad():
        new = _peft(base, repo / STEP1 / "adapter").generate(
            ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, eos_token_id=50256,
            pad_token_id=50256)[0, ids.shape[1]:]
    golden = tok.decode([t for t in new.tolist() if t != 50256])
    assert out == golden + "\n", (out, golden)


def test_make_export_of_checkpoint_n_uses_it_as_it_is(run):
    """`make -n export` of the merge recipe naming saves/r/checkpoint-1, with recipes/train.yaml (which writes
    saves/r) in scope: the checkpoint is there, so make would export it and train nothing. Before, make chained the
    training recipe, and its train (no stamps: the run was trained by `python -m pipeline train`; or the recipe
    edited since) retrained the run from scratch with --retrain-finished, replacing the step chosen (this test failed
    there: build, validate and train of recipes/train.yaml came first). A missing checkpoint is trained first where
    the recipe saves that step; one it never saves is not, and export names the folder and why."""
    from pipeline.recipe import resolve
    from pipeline.recipe.deps import lines

    repo, base = run
    venv = f"VENV={repo / 'venv'}"
    merge = repo / "recipes/merge.yaml"
    if not merge.exists():  # written by the merge test above; this test on its own
        merge.write_text(MERGE_RECIPE.format(base=base), encoding="utf-8")
    assert make_stages(make("-n", "export", "RECIPE=recipes/merge.yaml", venv, cwd=repo)) == \
        [("export", "recipes/merge.yaml")]
    # a second training recipe, not trained yet: its step 1 is made first; its step 3 (max_steps 2) never is. What
    # make chains is deps' UPSTREAMS (in this process: make's use of it is test_make_upstreams')
    write_recipe(repo / "recipes/later.yaml", model_name_or_path=str(base), output_dir="saves/later", max_steps=2,
                 save_steps=1)
    here = os.getcwd()
    os.chdir(repo)
    try:
        for step, chained in ((1, "recipes/later.yaml:train"), (2, "recipes/later.yaml:train"), (3, "")):
            r = resolve("recipes/merge.yaml", [f"adapter_name_or_path=saves/later/checkpoint-{step}"], command="deps")
            assert f"UPSTREAMS={chained}" in lines(r)
        os.chdir(here)
        never = refused("export", "recipes/merge.yaml", "adapter_name_or_path=saves/later/checkpoint-3", cwd=repo,
                        as_typed=False)
        assert ("directory 'saves/later/checkpoint-3' does not exist here (a checkpoint of recipes/later.yaml's run, "
                "which saves no step 3: save_strategy steps, save_steps 1, max_steps 2; name a checkpoint-<step> that "
                "is there, or its final adapter/)") in never, never
    finally:
        os.chdir(here)
        (repo / "recipes/later.yaml").unlink()


def test_make_export_of_checkpoint_n_runs_again_when_the_step_is_written_again(run):
    """The checkpoint used as it is has no stamp of its own: its files are export's prerequisites (deps'
    CHECKPOINT_FILES). Exported once (`make -t`: the stamps as after a real export), then the run trained again, which
    replaces checkpoint-1 (its files newer): `make -n export` would export again. Before, make said nothing to be done
    and export_dir kept the merge of the step the run no longer holds (this test failed there: [] stages)."""
    repo, base = run
    venv = f"VENV={repo / 'venv'}"
    merge = repo / "recipes/merge.yaml"
    if not merge.exists():
        merge.write_text(MERGE_RECIPE.format(base=base), encoding="utf-8")
    make("-t", "export", "RECIPE=recipes/merge.yaml", venv, cwd=repo)
    assert make_stages(make("-n", "export", "RECIPE=recipes/merge.yaml", venv, cwd=repo)) == []  # up to date
    weights = repo / STEP1 / "adapter/adapter_model.safetensors"
    before = weights.stat()
    os.utime(weights)  # written again, now: after the export
    try:
        assert make_stages(make("-n", "export", "RECIPE=recipes/merge.yaml", venv, cwd=repo)) == \
            [("export", "recipes/merge.yaml")]
    finally:
        os.utime(weights, ns=(before.st_atime_ns, before.st_mtime_ns))


def test_an_untrained_checkpoint_n_names_the_training_of_its_run(run):
    """export of a merge recipe naming a run's checkpoint-N whose adapter is all zero (a step at lr 0): the refusal
    names that run's training (recipes/train.yaml, from the resolved.yaml in the run's folder, the checkpoint's
    parent), not a bare `make train`, which trains the Makefile's default recipe (failed before: trained_by read
    checkpoint-N/resolved.yaml, which no run writes). A copy of the run (saves/z) with its checkpoint-1's lora_B
    zeroed: the fixture's run stays as it is."""
    from safetensors.torch import load_file, save_file

    repo, base = run
    merge = repo / "recipes/merge.yaml"
    if not merge.exists():
        merge.write_text(MERGE_RECIPE.format(base=base), encoding="utf-8")
    copy = repo / "saves/z/checkpoint-1/adapter"
    copy.mkdir(parents=True)
    (repo / "saves/z/resolved.yaml").write_bytes((repo / "saves/r/resolved.yaml").read_bytes())
    (copy / "adapter_config.json").write_bytes((repo / STEP1 / "adapter/adapter_config.json").read_bytes())
    tensors = load_file(repo / STEP1 / "adapter/adapter_model.safetensors")
    save_file({k: v.zero_() if "lora_B" in k else v for k, v in tensors.items()}, copy / "adapter_model.safetensors")
    said = refused("export", "recipes/merge.yaml", "adapter_name_or_path=saves/z/checkpoint-1", cwd=repo,
                   as_typed=False)
    assert "the adapter is untrained" in said and \
        "`make train RECIPE=recipes/train.yaml` (python -m pipeline train recipes/train.yaml --retrain-finished)" in said, said
