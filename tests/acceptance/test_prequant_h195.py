"""A pre-quantized bitsandbytes checkpoint (transformers' save_pretrained of a BitsAndBytesConfig model, as the hub's
unsloth/*-bnb-4bit repos are written) under recipes that need no training of it: LLaMA-Factory's eval recipe
(`task: mmlu_test`) with finetuning_type: full, through make as a user types it.

The checkpoint is a tiny untied Qwen2 whose llm_int8_skip_modules lists one MLP Linear and not lm_head: transformers
quantizes the output head too (quantizers/base.py get_modules_to_not_convert adds the default heads only where the
list is None), so its 4-bit lm_head is part of every model compared here.

Golden values: LLaMA-Factory 0.9.5's Evaluator (tests/evaluate/test_choice_benchmarks.lf_golden, re-typed there with
file:line) on transformers' from_pretrained of the same folder; LLaMA-Factory's get_eval_args
(hparams/parser.py:572-590) calls _verify_model_args, which checks finetuning_type against quantization_bit only
(:188-190), and a pre-quantized checkpoint leaves that unset: its eval runs.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from tests.acceptance.harness import (DPO, assert_close, assert_same_run, crash_copy, make, make_stages, pipeline,
                                      refused, scratch_repo, trained_model, write_data, write_hf_checkpoint,
                                      write_ranking_data, write_recipe)
from tests.evaluate.test_choice_benchmarks import RECIPE, SUBJECTS, lf_golden, write_mmlu

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tests.model.test_prequantized_bnb import reference  # noqa: E402  (after the skips)

SKIP = ["model.layers.0.mlp.down_proj"]  # not lm_head: the untied head is stored in 4 bits


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    """A scratch repository with the 4-bit checkpoint (qbnb/, its tokenizer files beside it as a hub repo holds them)
    and LLaMA-Factory's MMLU task folder."""
    root = scratch_repo(tmp_path_factory.mktemp("prequant") / "repo")
    plain = root.parent / "plain"
    write_hf_checkpoint(plain, "qwen2", small_vocab=True, max_position_embeddings=1024, noise=0.5,
                        tie_word_embeddings=False)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=torch.float32,
                                             llm_int8_skip_modules=SKIP)
    transformers.AutoModelForCausalLM.from_pretrained(plain, quantization_config=config, dtype=torch.float32,
                                                      device_map="cpu").save_pretrained(root / "qbnb")
    for file in plain.iterdir():
        if not (root / "qbnb" / file.name).exists():
            shutil.copy(file, root / "qbnb" / file.name)
    write_mmlu(root / "evaluation", {"algebra": SUBJECTS["algebra"]})  # one subject: 5 questions
    return root


def test_make_eval_of_a_full_benchmark_recipe_on_a_prequantized_checkpoint_runs(repo):
    """LLaMA-Factory's eval recipe with finetuning_type: full on a 4-bit checkpoint: validate and plan check it as the
    benchmark it is (they refused it as a full fine-tune), make eval gives LLaMA-Factory's letters on transformers'
    4-bit model; training the same recipe without its task stays refused with the existing message. (validate, plan
    and train in this process: make eval is the one run as typed.)"""
    assert isinstance(reference(repo / "qbnb").lm_head, bnb.nn.Linear4bit)  # the fixture's point: a 4-bit head
    (repo / "full.yaml").write_text(RECIPE.format(model="qbnb", batch=4, save="saves/full")
                                    + "finetuning_type: full\n")
    validated = pipeline("validate", "full.yaml", cwd=repo, as_typed=False).stdout
    assert "eval with task mmlu_test, model qbnb" in validated
    assert "`make eval RECIPE=full.yaml` (python -m pipeline eval full.yaml)" in pipeline("plan", "full.yaml", cwd=repo, as_typed=False).stdout

    done = make("eval", "RECIPE=full.yaml", cwd=repo)
    assert make_stages(done) == [("eval", "full.yaml")]
    golden, _ = lf_golden(repo / "evaluation" / "mmlu", repo / "qbnb", n_shot=2, model=reference(repo / "qbnb"))
    assert json.loads((repo / "saves" / "full" / "results.json").read_text()) == golden

    message = refused("train", "full.yaml", "task=null", "task_dir=null", "n_shot=null", "lang=null",
                      "batch_size=null", "save_dir=null", "dataset=x", cwd=repo, as_typed=False)
    assert "finetuning_type: given full with model_name_or_path: qbnb, a pre-quantized bitsandbytes checkpoint" \
           " stored as 4-bit nf4 with double quantization: a quantized base cannot train" in message


def test_plan_counts_the_linears_an_rm_run_holds_quantized(repo, monkeypatch):
    """stage rm on the checkpoint: its score head is new (drawn at load: the file stores none), a plain Linear beside
    the stored 4-bit ones, whatever llm_int8_skip_modules lists, and its stored 4-bit lm_head is dropped as the
    unquantized one is (the load failed on it); plan's byte count covers the Linears the loaded model holds
    quantized, no more (it counted the score head quantized where the checkpoint has a skip list)."""
    from pipeline.model.build import load_base
    from pipeline.model.quantize import is_quantized
    from pipeline.recipe import resolve
    from pipeline.recipe.args import recipe_args
    from pipeline.recipe.plan import estimate_memory

    monkeypatch.chdir(repo)
    # dataset_dir: a folder no test writes (the module's data/, which a later test writes, lists no 'x'): the
    # recipe resolves before any data exists, as this test needs, in whatever order the file's tests run
    (repo / "rm.yaml").write_text("model_name_or_path: qbnb\nstage: rm\ndataset: x\ndataset_dir: no_data\n"
                                  "template: qwen\n")
    r = resolve("rm.yaml")
    model = load_base(recipe_args(r).model, dropout=False)
    held = [m for m in model.modules() if is_quantized(m)]
    assert not is_quantized(model.score) and len(held) == 13  # 2 blocks x 7 Linears but the skipped one
    quantized, unquantized = estimate_memory(r).quantized
    assert unquantized == 4 * sum(m.in_features * m.out_features for m in held)  # fp32: 4 bytes a value


def test_a_4bit_untied_head_is_transformers_and_takes_no_added_tokens(repo, capsys):
    """The checkpoint's lm_head stored in 4 bits (untied, llm_int8_skip_modules without it): ours holds the file's
    codes and computes transformers' logits, and the load's note counts the head among the stored 4-bit Linears (it
    said the one plain Linear was "the output head"). Added tokens, which need a row each in the head, are one
    message (they raised a bare RuntimeError growing the packed codes)."""
    from dataclasses import replace

    from pipeline.errors import UserError
    from pipeline.model.build import ModelArgs, load_base, load_for_inference

    args = ModelArgs(model_name_or_path=str(repo / "qbnb"), seed=0, dropout=0.0, context_length=None, qkv_bias=None,
                     tie_word_embeddings=None)
    ours, theirs = load_for_inference(args, device="cpu"), reference(repo / "qbnb")
    assert "model: 14 Linears loaded as stored, bitsandbytes 4-bit (a pre-quantized checkpoint), their matmuls in" \
           " float32 (bnb_4bit_compute_dtype); 1 stored unquantized (1 listed in llm_int8_skip_modules) in the run's" \
           " precision\n" in capsys.readouterr().err
    assert type(ours.lm_head) is bnb.nn.Linear4bit and torch.equal(ours.lm_head.weight.data, theirs.lm_head.weight.data)
    x = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert_close(theirs(x).logits, ours(x), rel=1e-5)  # noise 0.5: logits of a few units
    with pytest.raises(UserError) as refused_at_load:
        load_base(replace(args, new_special_tokens="<tool_x>"))
    assert refused_at_load.value.messages == [f"model_name_or_path: {repo / 'qbnb'} {HEAD_REFUSED}"]


# the load's refusal of added tokens on the 4-bit head, after "model_name_or_path: NAME" (re-typed: the test holds it)
HEAD_REFUSED = ("stores its output head (lm_head) quantized (its quantization_config's llm_int8_skip_modules does not"
                " list lm_head), which has no rows to add tokens to (LLaMA-Factory: 'Cannot resize embedding layers of a"
                " quantized model.'); remove the added tokens (new_special_tokens, add_tokens, add_special_tokens), or"
                " start from a checkpoint that keeps lm_head unquantized")


def test_validate_and_plan_refuse_added_tokens_on_the_4bit_head_as_the_load_does(repo, monkeypatch):
    """LLaMA-Factory's key new_special_tokens on the checkpoint whose untied head is stored in 4 bits: validate (as
    typed) and plan exit 2 with the load's message at the recipe's model_name_or_path (they passed it: train refused
    it after the data was built); stage rm (no lm_head: the score head is new) passes the rule."""
    from pipeline.recipe import resolve

    write_data(repo / "data")
    (repo / "tokens.yaml").write_text("model_name_or_path: qbnb\ntemplate: qwen\ndataset: tiny_sft\n"
                                      "dataset_dir: data\nnew_special_tokens: <tool_x>\n")
    said = refused("validate", "tokens.yaml", cwd=repo)
    assert said.splitlines() == [f"error: tokens.yaml:1:21: model_name_or_path: qbnb {HEAD_REFUSED}"], said
    assert refused("plan", "tokens.yaml", cwd=repo, as_typed=False) == said
    monkeypatch.chdir(repo)
    assert resolve("tokens.yaml", ["stage=rm"])["stage"] == "rm"


def reward_checkpoint(repo: Path, name: str, skip: list[str] | None) -> Path:
    """repo/name: a reward model (transformers' Qwen2ForSequenceClassification of the fixture's plain checkpoint, its
    score head drawn and saved) quantized to 4 bits by transformers with llm_int8_skip_modules `skip` and
    save_pretrained'd, tokenizer files beside it: without a list transformers keeps the score head (the model's last
    module, quantizers/base.py get_keys_to_not_convert) unquantized, a list without score quantizes it."""
    folder, plain = repo / name, repo.parent / "plain_rm"
    if not plain.exists():
        transformers.AutoModelForSequenceClassification.from_pretrained(
            repo.parent / "plain", num_labels=1, dtype=torch.float32).save_pretrained(plain)
    config = transformers.BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                             bnb_4bit_compute_dtype=torch.float32, llm_int8_skip_modules=skip)
    transformers.AutoModelForSequenceClassification.from_pretrained(
        plain, quantization_config=config, dtype=torch.float32, device_map="cpu").save_pretrained(folder)
    for file in (repo.parent / "plain").iterdir():
        if not (folder / file.name).exists():
            shutil.copy(file, folder / file.name)
    return folder


def test_a_prequantized_reward_model_scores_as_transformers_and_its_4bit_score_head_is_refused(repo, capsys,
                                                                                             monkeypatch):
    """A reward model saved quantized: stage rm on it keeps its stored score head (LLaMA-Factory would load it as a
    causal LM with a new value head, its score dropped). Unquantized (no skip list), ours computes transformers'
    scores and the load's note counts it ("the score head" stored unquantized: it said nothing of it, 14 Linears
    stored and no plain one). Stored in 4 bits (a skip list without score), training it is one message in validate
    (as typed) and at the load (it raised a bare RuntimeError making the packed codes trainable)."""
    from pipeline.errors import UserError
    from pipeline.model.build import ModelArgs, build_model, load_base
    from pipeline.recipe import resolve
    from pipeline.recipe.args import recipe_args

    args = ModelArgs(model_name_or_path=str(reward_checkpoint(repo, "rm_plain_head", None)), seed=0, dropout=0.0,
                     context_length=None, qkv_bias=None, tie_word_embeddings=None, stage="rm")
    ours = load_base(args, dropout=False).eval()
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(args.model_name_or_path).eval()
    assert "model: 14 Linears loaded as stored, bitsandbytes 4-bit (a pre-quantized checkpoint), their matmuls in" \
           " float32 (bnb_4bit_compute_dtype); 1 stored unquantized (the score head) in the run's precision\n" \
           in capsys.readouterr().err
    assert type(theirs.score) is torch.nn.Linear and torch.equal(theirs.score.weight, ours.score.weight)
    x = torch.randint(0, 384, (1, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(theirs(x).logits[0], ours(x)[0, -1], rtol=1e-5, atol=1e-6)

    reward_checkpoint(repo, "rm_4bit_head", SKIP)
    write_ranking_data(write_data(repo / "data"))
    (repo / "rm.yaml").write_text("model_name_or_path: rm_4bit_head\nstage: rm\ntemplate: qwen\n"
                                  "dataset: prefs_alpaca\ndataset_dir: data\n")
    said = refused("validate", "rm.yaml", cwd=repo)
    message = ("model_name_or_path: rm_4bit_head is a reward model (XForSequenceClassification) whose score head is"
               " stored quantized (its quantization_config's llm_int8_skip_modules does not list score): stage rm"
               " trains the score head in full")
    assert f"error: rm.yaml:1:21: {message}" in said, said
    monkeypatch.chdir(repo)
    built = recipe_args(resolve("rm.yaml", command="build"))  # build trains nothing: the rule is silent there
    with pytest.raises(UserError) as at_load:
        build_model(*built)
    assert at_load.value.messages[0].startswith(message) and at_load.value.messages[0] in said


def test_expand_refuses_a_prequantized_checkpoint_and_writes_nothing(repo):
    """`python -m pipeline expand` (LLaMA Pro) on the 4-bit checkpoint, as typed: one message, exit 2, no output
    folder. The new blocks need zero o_proj / down_proj weights, and packed nf4 codes hold none (code 0 is
    -1 x absmax); LLaMA-Factory's scripts/llama_pro.py zeroes the quantized state_dict's tensors, quant state included."""
    said = refused("expand", "--model", "qbnb", "--output-dir", "pro", "--num-expand", "2", cwd=repo)
    assert said.splitlines()[-1] == (
        "error: --model: qbnb is a pre-quantized bitsandbytes checkpoint (quantization_config: 4-bit nf4 with double"
        " quantization), whose projections are packed codes with no zero weight to write into the new blocks; expand"
        " the unquantized checkpoint it was made from (a recipe's quantization_bit then quantizes the expanded model"
        " at load for QLoRA)"), said
    assert not (repo / "pro").exists()


def test_dpo_on_the_prequantized_checkpoint_resumes_exactly_and_peft_loads_its_adapter(repo):
    """QLoRA stage dpo (LoRA, no quantization key) on the 4-bit checkpoint, LLaMA-Factory's pairwise data, two steps
    saved at each: train as typed (the reference is the stored 4-bit base with the adapter off); PEFT's
    PeftModel.from_pretrained of adapter/ on transformers' model of the same folder computes our adapter model's
    logits; the run killed after its step-1 checkpoint and resumed as typed (resume_from_checkpoint: latest) ends
    bitwise equal to it (adapter, logged losses, step: CPU bitsandbytes dequantizes the stored codes
    deterministically)."""
    write_ranking_data(write_data(repo / "data"))
    recipe = write_recipe(repo / "dpo.yaml", DPO, model_name_or_path="qbnb", dataset_dir="data", template="qwen",
                          cutoff_len=256, max_steps=2, save_steps=1, val_size=0.0, learning_rate=0.05,
                          output_dir="saves/dpo")
    pipeline("build", recipe, cwd=repo, as_typed=False)
    trained = pipeline("train", recipe, cwd=repo).stderr
    assert "model: 14 Linears loaded as stored, bitsandbytes 4-bit (a pre-quantized checkpoint)" in trained
    x = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        stored = reference(repo / "qbnb")
        before = stored(x).logits
        golden = peft.PeftModel.from_pretrained(stored, repo / "saves/dpo/adapter").eval()(x).logits
        assert (golden - before).abs().max() > 1e-3  # the adapter trained
        assert_close(golden, trained_model(recipe, repo)(x), rel=1e-5)

    crashed = crash_copy(repo / "saves/dpo", repo / "saves/crashed", 1)
    resumed = pipeline("train", recipe, "output_dir=saves/crashed", "resume_from_checkpoint=latest", cwd=repo).stderr
    assert "step 2 |" in resumed and "step 1 |" not in resumed  # it trained step 2 only
    assert_same_run(repo / "saves/dpo", crashed, "adapter/adapter_model.safetensors")


def test_an_8bit_head_takes_no_added_tokens_with_the_4bit_heads_message(repo):
    """load_in_8bit (LLM.int8, quantization_bit 8's form) with the same llm_int8_skip_modules: transformers stores the
    untied lm_head in int8 too. Ours computes transformers' logits on it; added tokens are the 4-bit head's one
    message (HEAD_REFUSED) in validate and at the load."""
    from dataclasses import replace

    from pipeline.errors import UserError
    from pipeline.model.build import ModelArgs, load_base, load_for_inference

    folder = repo / "q8"
    config = transformers.BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP)
    transformers.AutoModelForCausalLM.from_pretrained(repo.parent / "plain", quantization_config=config,
                                                      dtype=torch.float32, device_map="cpu").save_pretrained(folder)
    for file in (repo.parent / "plain").iterdir():
        if not (folder / file.name).exists():
            shutil.copy(file, folder / file.name)
    theirs = reference(folder)
    assert isinstance(theirs.lm_head, bnb.nn.Linear8bitLt)  # the fixture's point: an 8-bit head
    args = ModelArgs(model_name_or_path=str(folder), seed=0, dropout=0.0, context_length=None, qkv_bias=None,
                     tie_word_embeddings=None)
    x = torch.randint(0, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():  # no attention mask: transformers' 8-bit model with one shifts a row's logits by ~1e-2
        assert_close(theirs(x).logits, load_for_inference(args, device="cpu")(x), rel=1e-4)

    write_data(repo / "data")
    (repo / "q8.yaml").write_text("model_name_or_path: q8\nquantization_bit: 8\ntemplate: qwen\ndataset: tiny_sft\n"
                                  "dataset_dir: data\nnew_special_tokens: <tool_x>\n")
    said = refused("validate", "q8.yaml", cwd=repo, as_typed=False)  # the 4-bit case runs as typed
    assert said.splitlines() == [f"error: q8.yaml:1:21: model_name_or_path: q8 {HEAD_REFUSED}"], said
    with pytest.raises(UserError) as at_load:
        load_base(replace(args, new_special_tokens="<tool_x>"))
    assert at_load.value.messages == [f"model_name_or_path: {folder} {HEAD_REFUSED}"]


PPO = """model_name_or_path: {policy}
reward_model: {reward}
reward_model_type: full
stage: ppo
finetuning_type: lora
lora_target: all
dataset: tiny_sft
dataset_dir: data
template: qwen
cutoff_len: 256
per_device_train_batch_size: 2
max_steps: 1
ppo_epochs: 1
max_new_tokens: 2
logging_steps: 1
output_dir: saves/ppo
"""


def test_ppo_scores_with_a_prequantized_reward_model_as_transformers_does(repo, monkeypatch):
    """stage ppo with reward_model_type full on the 4-bit reward model (transformers' Qwen2ForSequenceClassification
    saved quantized, its score head plain) and the unquantized language model it came from as the policy: train
    (as typed) runs its step; the scorer ppo loads (its stored 4-bit Linears, the score head plain) computes
    transformers' scores of the same folder (one row a call: without a pad id transformers scores a lone row at its
    last token)."""
    from pipeline.recipe import resolve
    from pipeline.recipe.plan import estimate_memory
    from pipeline.train.ppo import load_reward_model

    folder = repo / "rm_plain_head"
    if not folder.exists():
        reward_checkpoint(repo, "rm_plain_head", None)
    write_data(repo / "data")
    (repo / "ppo.yaml").write_text(PPO.format(policy=repo.parent / "plain", reward="rm_plain_head"))
    pipeline("build", "ppo.yaml", cwd=repo, as_typed=False)
    trained = pipeline("train", "ppo.yaml", cwd=repo).stderr
    assert "ppo: reward_model rm_plain_head (full), scoring with its score head at the last attended token" \
        in trained, trained
    (step,) = [json.loads(line) for line in (repo / "saves/ppo/trainer_log.jsonl").read_text().splitlines()]
    assert step["step"] == 1 and torch.isfinite(torch.tensor(step["reward"]))

    # plan's reward_model row: the folder's stored 4-bit Linears at their packed size (it counted them at 4 bytes a
    # value, twice this), as transformers' model of it holds them: its parameters (the packed codes, the rest fp32)
    # and each 4-bit weight's absmax (one fp32 per 64 values; its quant state, no parameter)
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(folder, device_map="cpu").eval()
    absmax = sum(m.weight.quant_state.absmax.nbytes for m in theirs.modules() if isinstance(m, bnb.nn.Linear4bit))
    monkeypatch.chdir(repo)
    held = estimate_memory(resolve("ppo.yaml")).gpu["reward_model"]
    assert held == sum(p.nbytes for p in theirs.parameters()) + absmax
    scorer = load_reward_model(str(folder), "full", None, "cpu", torch.float32, pad_id=0)
    assert sum(isinstance(m, bnb.nn.Linear4bit) for m in scorer.model.modules()) == 14
    assert not isinstance(scorer.model.score, bnb.nn.Linear4bit)
    x = torch.randint(1, 384, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        golden = torch.cat([theirs(row[None]).logits[:, 0] for row in x])
        torch.testing.assert_close(scorer(x, torch.ones_like(x)), golden, rtol=1e-5, atol=1e-6)
