"""Stage dpo in the trainer: step one equals ln 2 (policy = reference), the LoRA reference (adapters off) scores like
a separate frozen copy, the frozen head keeps its chunked path, ZeRO-3 partitions the frozen copy, exact resume."""
from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import pytest
import torch

from pipeline.model import head_loss
from pipeline.model import lora as L
from pipeline.model.weights import load_model
from pipeline.runtime.log import read_log
from pipeline.train.preference import token_nll
from pipeline.train.run import train
from tests.train.helpers import BASE_SFT, WORDS

METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")


def pair_rows(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    rows = []
    for i in range(n):
        a, b, c = rng.sample(WORDS, 3)
        rows.append({"instruction": f"Repeat: {a} {b}", "input": "", "chosen": f"{a} {b}",
                     "rejected": f"{c} {a} ({i})"})
    return rows


BASE_DPO = {**BASE_SFT, "stage": "dpo", "dataset": "tiny_pairs", "max_steps": 3, "val_size": 0.2,
            "per_device_train_batch_size": 2, "gradient_accumulation_steps": 1, "pref_beta": 0.5}


@pytest.fixture
def dpo_recipe(workdir: Path, make_recipe):
    """make_recipe over a registry that also holds an alpaca ranking dataset (LLaMA-Factory's entry form)."""
    data = workdir / "data"
    (data / "raw" / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in pair_rows(30)), encoding="utf-8")
    registry = json.loads((data / "dataset_info.json").read_text())
    registry["tiny_pairs"] = {"file_name": "raw/pairs.jsonl", "ranking": True,
                              "columns": {"prompt": "instruction", "query": "input", "chosen": "chosen",
                                          "rejected": "rejected"}}
    (data / "dataset_info.json").write_text(json.dumps(registry), encoding="utf-8")

    def make(name: str = "dpo", **keys):
        return make_recipe({**BASE_DPO, **keys}, name=name)

    return make


def test_lora_dpo_first_step_is_ln2_and_logs_trl_metrics(dpo_recipe, monkeypatch):
    chunked = []
    original = head_loss._ChunkedHeadCrossEntropy.apply
    monkeypatch.setattr(head_loss._ChunkedHeadCrossEntropy, "apply",
                        lambda *a: chunked.append(a[0].shape) or original(*a))
    result = train(dpo_recipe(eval_steps=3))
    log = read_log(result.output_dir / "trainer_log.jsonl")
    first = log[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)  # the reference is the policy at step one
    assert first["rewards/chosen"] == 0.0 and first["rewards/rejected"] == 0.0 and first["rewards/margins"] == 0.0
    assert all(key in rec for rec in log for key in METRICS)
    assert log[-1]["rewards/margins"] > 0 and log[-1]["loss"] < math.log(2)  # learning moves the margin
    assert "eval_loss" in log[-1] and "eval_rewards/accuracies" in log[-1]
    assert chunked, "the frozen-head chunked loss path was not used"
    assert (result.output_dir / "adapter" / "adapter_model.safetensors").is_file()


def test_adapters_off_reference_equals_a_separate_frozen_copy():
    base = load_model("tiny", seed=3).eval()
    frozen_copy = copy.deepcopy(base).requires_grad_(False)
    policy = base
    L.apply_lora(policy, "all", rank=4, alpha=8, seed=0, additional_targets=["ln_f"])
    with torch.no_grad():  # a trained-looking adapter and final norm
        for wrapper in L.lora_modules(policy).values():
            wrapper.lora.B.normal_(0, 0.1)
    L.keep_starting_modules(policy)
    with torch.no_grad():
        policy.norm.weight.mul_(1.5)
    ids = torch.tensor([[464, 3290, 318, 257, 1332, 13, 50256], [15496, 11, 466, 345, 588, 8887, 30]])
    batch = {"input_ids": ids[:, :-1], "attention_mask": torch.ones_like(ids[:, :-1]),
             "labels": torch.where(torch.arange(6) >= 2, ids[:, 1:], -100)}
    with torch.no_grad():
        with L.adapters_disabled(policy):
            off = token_nll(policy, batch)
        expected = token_nll(frozen_copy, batch)
        tuned = token_nll(policy, batch)
    assert torch.equal(off, expected)
    assert not torch.allclose(tuned, expected)  # the adapters are back on after the context
    assert not L.lora_modules(policy)["layers.0.self_attn.qkv_proj"].disabled


def test_a_continued_adapters_reference_has_the_base_additional_target_modules(tmp_path):
    """LoRA dpo continuing an adapter that trained an additional_target (PEFT's modules_to_save): adapters off must
    give the base back, as PEFT's disable_adapter does. The kept "starting" copy was the adapter's trained norm, so
    the reference was the base's Linears with the sft's final norm: neither the base nor the sft model."""
    from dataclasses import replace

    from pipeline.model.build import FinetuneArgs, ModelArgs, build_model, load_base
    from pipeline.train.preference import AdapterReference

    base = ModelArgs("tiny", seed=3, dropout=0.0, context_length=None, qkv_bias=None, tie_word_embeddings=None)
    ft = FinetuneArgs("lora", 4, None, 0.0, "all", False, False, ["ln_f"], 2, None, 0)
    sft = build_model(base, ft)
    with torch.no_grad():  # a trained adapter and final norm
        for wrapper in L.lora_modules(sft).values():
            wrapper.lora.B.normal_(0, 0.1)
        sft.norm.weight.mul_(1.5)
    L.save_adapter(sft, tmp_path / "sft")
    policy = build_model(base, replace(ft, adapter_name_or_path=str(tmp_path / "sft"))).eval()

    class Engine:
        module = policy

        def __call__(self, *args, **kwargs):
            return policy(*args, **kwargs)

    reference = AdapterReference(Engine(), base, str(tmp_path / "sft"))
    ids = torch.tensor([[464, 3290, 318, 257, 1332, 13, 50256], [15496, 11, 466, 345, 588, 8887, 30]])
    batch = {"input_ids": ids[:, :-1], "attention_mask": torch.ones_like(ids[:, :-1]),
             "labels": torch.where(torch.arange(6) >= 2, ids[:, 1:], -100)}
    with torch.no_grad():
        expected = token_nll(load_base(base, dropout=False).eval(), batch)
        tuned = token_nll(policy, batch)
    assert torch.allclose(reference(batch), expected, rtol=1e-6, atol=1e-6)
    assert not torch.allclose(tuned, expected)
    assert torch.equal(policy.norm.weight, sft.norm.weight)  # the policy keeps training the adapter's norm


def assert_ref_model_is_the_starting_policy(base, ref_model: Path, ids: torch.Tensor) -> None:
    """build_reference with ref_model = the base checkpoint (full fine-tuning, a frozen reference) scores `ids` as
    the starting policy does (load_base of the recipe's model keys)."""
    from pipeline.model.build import FinetuneArgs, build_model, load_base
    from pipeline.recipe.args import PreferenceArgs, RecipeModel
    from pipeline.train.preference import build_reference

    ft = FinetuneArgs("full", 4, None, 0.0, "all", False, False, None, 2, None, 3)
    policy = build_model(base, ft).eval()

    class Engine:
        module, device = policy, torch.device("cpu")

    pref = PreferenceArgs("sigmoid", 0.1, 0.0, 0.0, 0.5, str(ref_model))
    reference = build_reference(pref, RecipeModel(base, ft), Engine())
    batch = {"input_ids": ids[:, :-1], "attention_mask": torch.ones_like(ids[:, :-1]), "labels": ids[:, 1:]}
    with torch.no_grad():
        expected = token_nll(load_base(base, dropout=False).eval(), batch)
    assert torch.equal(reference(batch), expected)


def test_a_ref_model_grows_as_the_policy_does(tmp_path):
    """ref_model with new_special_tokens (dpo / kto): LLaMA-Factory loads the reference with the run's tokenizer and
    resizes it too (create_ref_model copies the model arguments), so it scores the new ids. The reference of a
    ref_model that is the base is then the starting policy. It was refused as another vocabulary (training), and
    eval's reference (the same model.build.load_ref_model) indexed past its embedding."""
    from pipeline.model.build import ModelArgs
    from pipeline.model.weights import save_hf

    save_hf(load_model("tiny", seed=3), tmp_path / "ref")
    base = ModelArgs("tiny", seed=3, dropout=0.0, context_length=None, qkv_bias=None, tie_word_embeddings=None,
                     new_special_tokens="<think>,</think>")
    new_ids = [50257, 50258]  # <think>, </think>: GPT-2's tokenizer has 50,257 ids
    assert_ref_model_is_the_starting_policy(base, tmp_path / "ref", torch.tensor([[464, 3290, *new_ids, 318, 13]]))


def test_a_ref_model_takes_the_recipes_rope_scaling(tmp_path):
    """rope_scaling with ref_model: LLaMA-Factory loads the reference with the run's model arguments, the scaling
    included, so it reads the inputs the policy reads. It was loaded as saved: a sequence longer than its
    max_position_embeddings stopped the reference pass (and eval's), a shorter one had other positions."""
    from pipeline.model.build import ModelArgs
    from pipeline.model.config import PRESETS
    from pipeline.model.gpt import GPTModel
    from pipeline.model.weights import save_hf

    cfg = PRESETS["qwen2.5-0.5b"].replace(vocab_size=512, context_length=16, emb_dim=32, n_layers=1, n_heads=2,
                                          n_kv_heads=1, ffn_dim=64)
    save_hf(GPTModel(cfg, seed=0), tmp_path / "base")  # a Qwen2 checkpoint of 16 positions
    base = ModelArgs(str(tmp_path / "base"), seed=3, dropout=0.0, context_length=None, qkv_bias=None,
                     tie_word_embeddings=None, rope_scaling="linear", cutoff_len=24)
    # 20 inputs: past the checkpoint's 16 positions
    assert_ref_model_is_the_starting_policy(base, tmp_path / "base", torch.arange(3, 24).unsqueeze(0))

def test_reference_free_losses_run_without_a_reference(dpo_recipe):
    result = train(dpo_recipe(name="orpo", pref_loss="orpo", per_device_train_batch_size=1, max_steps=1))
    first = read_log(result.output_dir / "trainer_log.jsonl")[0]
    c, r = first["logps/chosen"], first["logps/rejected"]  # one pair: length-averaged log-probs
    log_odds = (c - math.log1p(-math.exp(c))) - (r - math.log1p(-math.exp(r)))
    assert first["loss"] == pytest.approx(-c + 0.5 * math.log1p(math.exp(-log_odds)), rel=1e-5)
    assert first["rewards/chosen"] == pytest.approx(0.5 * c, rel=1e-6)


def test_the_policy_trains_without_dropout(dpo_recipe):
    """As TRL's DPOTrainer (disable_dropout) and LLaMA-Factory: the reference is scored without dropout, so a policy
    scored with it differed from the reference at step one (loss 0.6926, rewards non-zero with dropout 0.3)."""
    result = train(dpo_recipe(name="drop", finetuning_type="full", dropout=0.3, lora_dropout=0.3, max_steps=1,
                              warmup_steps=0))
    first = read_log(result.output_dir / "trainer_log.jsonl")[0]
    assert first["loss"] == pytest.approx(math.log(2), abs=1e-7)
    assert first["rewards/chosen"] == first["rewards/rejected"] == 0.0


def test_continuing_an_sft_adapter_says_the_reference_is_the_base_without_it(dpo_recipe, make_recipe, capsys):
    """LoRA dpo after LoRA sft through adapter_name_or_path continues that adapter; switching the adapters off for the
    reference removes it too (as in LLaMA-Factory), so the reference is the base, not the model training starts
    from. The run used to announce "reference: the starting model", and its step one is not ln 2."""
    sft = train(make_recipe(name="sft", max_steps=2, warmup_steps=0, learning_rate=5e-2))
    capsys.readouterr()
    result = train(dpo_recipe(name="after_sft", max_steps=1, warmup_steps=0,
                              adapter_name_or_path=str(sft.output_dir / "adapter")))
    said = capsys.readouterr().err
    assert "reference: the base model tiny WITHOUT adapter_name_or_path" in said and "ref_model" in said, said
    first = read_log(result.output_dir / "trainer_log.jsonl")[0]
    assert first["loss"] != pytest.approx(math.log(2), abs=1e-4) and first["rewards/margins"] != 0.0


@pytest.mark.slow
@pytest.mark.parametrize("finetuning_type, zero_stage, bf16, extra", [
    ("full", 0, False, {}), ("full", 3, False, {}), ("lora", 3, False, {}), ("freeze", 2, True, {}),
    ("lora", 0, False, {"additional_target": "lm_head"}),  # a trained head: the adapters-off reference too
])
def test_first_step_is_ln2_for_every_reference(dpo_recipe, finetuning_type, zero_stage, bf16, extra):
    r = dpo_recipe(name=f"{finetuning_type}{zero_stage}{len(extra)}", finetuning_type=finetuning_type,
                   zero_stage=zero_stage, bf16=bf16, max_steps=2, warmup_steps=0, **extra)
    result = train(r)
    log = read_log(result.output_dir / "trainer_log.jsonl")
    assert log[0]["loss"] == pytest.approx(math.log(2), abs=1e-7)  # the reference scores as the policy does
    assert log[0]["rewards/chosen"] == log[0]["rewards/rejected"] == 0.0 and log[0]["rewards/accuracies"] == 0.0
    assert log[1]["loss"] < math.log(2)


@pytest.mark.parametrize("logging_steps, logged", [(1, [1, 2, 3, 4]), (3, [3, 4])], ids=["every-step", "across-the-stop"])
def test_resume_continues_exactly(dpo_recipe, logging_steps, logged):
    """Interrupted after step 2 (SIGTERM), resumed: the same losses and rewards as one uninterrupted run, also on a
    log line whose window spans the stop (the rewards are window means: the checkpoint keeps the window's sums)."""
    from tests.train.test_checkpoint_resume import straight_and_resumed

    # dropout: the restored RNG state matters
    a, b = straight_and_resumed(dpo_recipe, max_steps=4, lora_dropout=0.1, logging_steps=logging_steps)
    assert [rec["step"] for rec in b if "loss" in rec] == logged
    for key in ("loss", *METRICS):
        assert [rec[key] for rec in b] == [rec[key] for rec in a], key


def test_a_resume_with_another_objective_says_so(dpo_recipe, capsys):
    """pref_loss / pref_beta changed on resume switched the objective mid-run without a word (learning_rate said so)."""
    keys = dict(max_steps=2, save_steps=1)
    train(dpo_recipe(name="objective", **keys))
    capsys.readouterr()
    train(dpo_recipe(name="objective", resume_from_checkpoint="saves/objective/checkpoint-1", pref_loss="ipo",
                     pref_beta=0.2, lora_dropout=0.3, **keys))
    err = capsys.readouterr().err
    assert "pref_loss changed from \"sigmoid\" to \"ipo\": applied from step 1 on" in err, err
    assert "pref_beta changed from 0.5 to 0.2: applied from step 1 on" in err, err
    # dpo trains without dropout (disable_dropout): "applied" would be untrue
    assert "lora_dropout changed from 0.0 to 0.3: no effect, stage dpo trains without dropout" in err, err


@pytest.mark.slow
@pytest.mark.multirank
def test_two_ranks_match_one_rank(dpo_recipe, workdir):
    import os

    from tests.ports import run_on_free_port

    keys = dict(max_steps=3, warmup_steps=0, eval_steps=3, zero_stage=2, val_size=0.2)
    one = train(dpo_recipe(name="one", per_device_train_batch_size=4, **keys))
    dpo_recipe(name="two", per_device_train_batch_size=2, **keys)  # writes two.yaml
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    launcher = str(Path(os.sys.executable).with_name("deepspeed"))
    proc = run_on_free_port(lambda port: [launcher, "--num_gpus", "2", "--master_port", port, "--module", "pipeline",
                                          "train", "two.yaml"], cwd=workdir, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    a = read_log(one.output_dir / "trainer_log.jsonl")
    b = read_log(workdir / "saves" / "two" / "trainer_log.jsonl")
    for key in ("loss", *METRICS, "eval_loss", "eval_rewards/accuracies"):
        values = [rec[key] for rec in a if key in rec]
        assert values and [rec[key] for rec in b if key in rec] == pytest.approx(values, rel=1e-4, abs=1e-6), key


def test_additional_target_under_zero3_is_refused_before_any_work(dpo_recipe):
    from pipeline.errors import UserError

    r = dpo_recipe(name="z3extra", zero_stage=3, additional_target=["ln_f"])
    with pytest.raises(UserError) as err:
        train(r)
    assert "additional_target" in err.value.messages[0] and "zero_stage 2" in err.value.messages[0]
    assert not (Path(r["output_dir"])).exists()
