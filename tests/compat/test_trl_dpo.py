"""One batch of stage dpo against TRL's own trainers (test-only dependency trl, pinned in requirements-test.txt).

The same tiny GPT-2 (and, for sigmoid, a tiny Llama; written by transformers' save_pretrained), the same PEFT LoRA adapter with trained-looking
(non-zero) weights, the same token pairs (tokenized by our alpaca template, so that tokenization is not what is
compared): our PreferenceObjective with its LoRA reference (the policy with its adapters switched off, as
LLaMA-Factory runs TRL) against

- trl.DPOTrainer (PEFT model, ref_model None: TRL's reference is also the adapters switched off), its own
  collator and compute_loss: loss and the logged rewards/chosen, rewards/rejected, rewards/accuracies,
  rewards/margins, logps/chosen, logps/rejected for sigmoid, hinge and ipo;
- trl.experimental.cpo.CPOTrainer (loss_type simpo, cpo_alpha 0 = SimPO) and trl.experimental.orpo.ORPOTrainer,
  fed their own batch format through get_batch_loss_metrics.

Known, documented differences (docs/preference-tuning.md), asserted as such: for ipo our rewards and logps
are on length-averaged log-probabilities (LLaMA-Factory's choice, and the ones the IPO loss uses), TRL's
DPOTrainer logs them on summed ones; ORPO's NLL term is ours (LLaMA-Factory's) over the chosen response, a mean
of per-sequence means; TRL's ORPOTrainer takes it over the prompt and the response ("computed over the full
prompt and response"), a mean over all the batch's chosen tokens: the odds-ratio term and the metrics are
compared, and the totals less their NLL terms.
"""
from __future__ import annotations

import random
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")
trl = pytest.importorskip("trl")

from pipeline.data.loaders import pad_examples  # noqa: E402
from pipeline.data.pairs import encode_pairs  # noqa: E402
from pipeline.data.tokenizer import gpt2  # noqa: E402
from pipeline.model.lora import load_adapter  # noqa: E402
from pipeline.model.preference import pair_logps  # noqa: E402
from pipeline.model.weights import load_model  # noqa: E402
from pipeline.recipe.args import preference_args, recipe_args  # noqa: E402
from pipeline.train.preference import PreferenceObjective, build_reference, token_nll  # noqa: E402
from tests.train.helpers import WORDS  # noqa: E402

BETA, GAMMA, PAIRS = 0.3, 0.4, 6
METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
           "logps/rejected")
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True)


def pair_rows(n: int) -> list[dict]:
    rng = random.Random(7)
    rows = []
    for i in range(n):
        a, b, c = rng.sample(WORDS, 3)
        rows.append({"instruction": f"Repeat: {a} {b}", "input": "", "chosen": f"{a} {b}",
                     "rejected": " ".join(rng.sample(WORDS, 1 + i % 4)) + f" {c}"})
    return rows


def hf_config(family: str):
    if family == "gpt2":
        return transformers.GPT2Config(n_embd=32, n_layer=2, n_head=2, n_positions=128, vocab_size=50257,
                                       resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.LlamaConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                    num_key_value_heads=2, vocab_size=50257, max_position_embeddings=128,
                                    tie_word_embeddings=False)


def write_checkpoint(root: Path, family: str) -> dict:
    """A tiny checkpoint of the family and a PEFT adapter whose B is non-zero, and tokenized pairs."""
    torch.manual_seed(0)
    transformers.AutoModelForCausalLM.from_config(hf_config(family)).save_pretrained(root / "base")
    adapted = peft.get_peft_model(hf_base(root / "base"), lora_config(family, init_lora_weights=False))
    with torch.no_grad():  # PEFT leaves nn.Linear's init in A and B: scale B so that the policy stays near the base
        for name, param in adapted.named_parameters():
            if "lora_B" in name:
                param.mul_(0.2)
    adapted.save_pretrained(root / "adapter")
    pairs = encode_pairs(pair_rows(2 * PAIRS), "alpaca", gpt2(), cutoff_len=64)
    return {"root": root, "pairs": pairs, "family": family}


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    return write_checkpoint(tmp_path_factory.mktemp("trl-gpt2"), "gpt2")


def hf_base(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)


def lora_config(family: str = "gpt2", **kw):
    if family == "gpt2":
        return peft.LoraConfig(**LORA, task_type="CAUSAL_LM", **kw)
    return peft.LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM", **kw,
                           target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])


def load_trained_adapter(trainer, root: Path) -> None:
    """The saved adapter's weights into the fresh one the trainer made from peft_config (as a mid-run state).

    The trainer gets the base model and a peft_config, as LLaMA-Factory's runs start: a new adapter, reference =
    adapters off. (Given a PeftModel instead, TRL takes a copy of its adapter as the reference.)"""
    from safetensors.torch import load_file

    state = load_file(str(root / "adapter" / "adapter_model.safetensors"))
    result = peft.set_peft_model_state_dict(trainer.model, state)
    assert not result.unexpected_keys
    assert "ref" not in trainer.model.peft_config


class Engine:
    """What PreferenceObjective and the LoRA reference read from a DeepSpeed engine: .module and a call."""

    def __init__(self, module: torch.nn.Module):
        self.module = module

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def ours(root: Path, batch: dict, loss: str) -> tuple[float, dict[str, float], object]:
    """Our objective on our batch: the mean loss, the metric means, and the objective (for summed logps)."""
    model = load_model(root / "base")
    load_adapter(model, root / "adapter")
    model.train()
    engine = Engine(model)
    r = {"pref_loss": loss, "pref_beta": BETA, "pref_ftx": 0.0, "dpo_label_smoothing": 0.0, "simpo_gamma": GAMMA,
         "ref_model": None, "finetuning_type": "lora"}
    pref = preference_args(r)
    objective = PreferenceObjective(pref, engine, build_reference(pref, recipe_args(r), engine))
    value, metrics = objective(batch)
    return float(value.detach()), metrics, objective


def split_pair(pairs, i: int) -> dict:
    """TRL's pre-tokenized form of pair i: the shared prompt tokens, then each side's scored tokens."""
    sides = {}
    for side in ("chosen", "rejected"):
        ids, labels, _ = getattr(pairs, side).example(i)
        start = next(k for k, label in enumerate(labels) if label != -100)
        assert all(label != -100 for label in labels[start:])  # the response (and EOS) is the tail
        sides[side] = (ids[:start], ids[start:])
    assert sides["chosen"][0] == sides["rejected"][0]
    return {"prompt_ids": sides["chosen"][0], "chosen_ids": sides["chosen"][1], "rejected_ids": sides["rejected"][1]}


def placeholder_tokenizer():
    """TRL wants a tokenizer for its dataset preparation; every compared batch is already token ids."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"<|endoftext|>": 0, "x": 1}, unk_token="<|endoftext|>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>",
                                                pad_token="<|endoftext|>")


def trl_args(config_cls, tmp: Path, **kw):
    return config_cls(output_dir=str(tmp), per_device_train_batch_size=PAIRS, bf16=False, use_cpu=True,
                      gradient_checkpointing=False, report_to="none", beta=BETA, **kw)


def placeholder_dataset():
    import datasets

    return datasets.Dataset.from_list([{"prompt": "x", "chosen": "x", "rejected": "x"}] * 2)


def make_dpo_trainer(checkpoint: dict, tmp: Path):
    """trl.DPOTrainer on the base model with a peft_config (LLaMA-Factory's start), the saved adapter loaded."""
    root = checkpoint["root"]
    trainer = trl.DPOTrainer(model=hf_base(root / "base"), args=trl_args(trl.DPOConfig, tmp, loss_type=["sigmoid"]),
                             train_dataset=placeholder_dataset(), processing_class=placeholder_tokenizer(),
                             peft_config=lora_config(checkpoint["family"]))
    load_trained_adapter(trainer, root)
    return trainer


def trl_dpo_one_batch(trainer, pairs, indices: list[int]) -> tuple[float, dict[str, float]]:
    """DPOTrainer.compute_loss on its own collator's batch of the pairs: the loss and the metrics it logged."""
    trl_batch = trainer.data_collator([split_pair(pairs, i) for i in indices])
    trainer.model.train()
    trl_loss = float(trainer.compute_loss(trainer.model, trl_batch).detach())
    return trl_loss, {k: v[-1] for k, v in trainer._metrics["train"].items()}


@pytest.fixture(scope="module")
def dpo_trainer(setup, tmp_path_factory):
    """One trl.DPOTrainer for the three losses (building one takes seconds): loss_types is set per test."""
    return make_dpo_trainer(setup, tmp_path_factory.mktemp("dpo"))


@pytest.mark.parametrize("loss", ["sigmoid", "hinge", "ipo"])
def test_one_batch_equals_trl_dpo_trainer(setup, dpo_trainer, loss):
    pairs, root = setup["pairs"], setup["root"]
    indices = list(range(PAIRS))
    batch = pad_examples([(pairs.chosen, indices), (pairs.rejected, indices)], gpt2().pad_id)
    value, metrics, objective = ours(root, batch, loss)

    trainer = dpo_trainer
    assert trainer.loss_types == trainer.args.loss_type  # what _compute_loss iterates over
    trainer.loss_types = trainer.args.loss_type = [loss]
    trl_loss, logged = trl_dpo_one_batch(trainer, pairs, indices)

    assert value == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    if loss != "ipo":
        for key in METRICS:
            assert metrics[key] == pytest.approx(logged[key], rel=1e-5, abs=1e-6), key
    else:  # TRL logs rewards and logps on summed log-probs; ours (LLaMA-Factory) on the averaged ones IPO uses
        with torch.no_grad():
            policy = pair_logps(token_nll(objective.engine, batch), batch["labels"])
            reference = pair_logps(objective.reference(batch), batch["labels"])
        summed = {"rewards/chosen": BETA * (policy.chosen - reference.chosen),
                  "rewards/rejected": BETA * (policy.rejected - reference.rejected),
                  "logps/chosen": policy.chosen, "logps/rejected": policy.rejected}
        for key, values in summed.items():
            assert float(values.mean()) == pytest.approx(logged[key], rel=1e-5, abs=1e-6), key
        averaged = policy.averaged()
        assert metrics["logps/chosen"] == pytest.approx(float(averaged.chosen.mean()), rel=1e-6)
    assert trl_loss != pytest.approx(0.6931, abs=1e-3)  # the adapter moved the policy off the reference


def test_llama_family_one_batch_equals_trl_dpo_trainer(tmp_path):
    """The same for a Llama checkpoint (RMSNorm, rotary positions, gated MLP, grouped KV heads, untied head)."""
    checkpoint = write_checkpoint(tmp_path / "llama", "llama")
    pairs, root = checkpoint["pairs"], checkpoint["root"]
    indices = list(range(PAIRS))
    value, metrics, _ = ours(root, pad_examples([(pairs.chosen, indices), (pairs.rejected, indices)],
                                                gpt2().pad_id), "sigmoid")
    trl_loss, logged = trl_dpo_one_batch(make_dpo_trainer(checkpoint, tmp_path / "out"), pairs, indices)
    assert value == pytest.approx(trl_loss, rel=1e-5, abs=1e-6)
    for key in METRICS:
        assert metrics[key] == pytest.approx(logged[key], rel=1e-5, abs=1e-6), key
    assert trl_loss != pytest.approx(0.6931, abs=1e-3)


def cpo_batch(pairs, indices: list[int]) -> dict:
    """The batch format of TRL's CPO / ORPO trainers: each side's full sequence with HF (unshifted) labels."""
    batch = {}
    for side in ("chosen", "rejected"):
        examples = [getattr(pairs, side).example(i) for i in indices]
        width = max(len(e.input_ids) for e in examples)
        batch[f"{side}_input_ids"] = torch.tensor([e.input_ids + [0] * (width - len(e.input_ids)) for e in examples])
        batch[f"{side}_attention_mask"] = torch.tensor([[1] * len(e.input_ids) + [0] * (width - len(e.input_ids))
                                                        for e in examples])
        batch[f"{side}_labels"] = torch.tensor([e.labels + [-100] * (width - len(e.input_ids)) for e in examples])
    return batch


def test_simpo_equals_trl_cpo_trainer(setup, tmp_path):
    from trl.experimental.cpo import CPOConfig, CPOTrainer

    pairs, root = setup["pairs"], setup["root"]
    indices = list(range(PAIRS))
    value, metrics, _ = ours(root, pad_examples([(pairs.chosen, indices), (pairs.rejected, indices)],
                                                gpt2().pad_id), "simpo")
    trainer = CPOTrainer(model=hf_base(root / "base"), processing_class=placeholder_tokenizer(),
                         args=trl_args(CPOConfig, tmp_path, loss_type="simpo", cpo_alpha=0.0, simpo_gamma=GAMMA),
                         train_dataset=placeholder_dataset(), peft_config=lora_config())
    load_trained_adapter(trainer, root)
    trainer.model.train()
    trl_loss, logged = trainer.get_batch_loss_metrics(trainer.model, cpo_batch(pairs, indices))
    assert value == pytest.approx(float(trl_loss.detach()), rel=1e-5, abs=1e-6)
    for key in METRICS:
        assert metrics[key] == pytest.approx(float(logged[key]), rel=1e-5, abs=1e-6), key


def test_orpo_equals_trl_orpo_trainer(setup, tmp_path):
    from trl.experimental.orpo import ORPOConfig, ORPOTrainer

    pairs, root = setup["pairs"], setup["root"]
    indices = list(range(PAIRS))
    value, metrics, _ = ours(root, pad_examples([(pairs.chosen, indices), (pairs.rejected, indices)],
                                                gpt2().pad_id), "orpo")
    trainer = ORPOTrainer(model=hf_base(root / "base"), processing_class=placeholder_tokenizer(),
                          args=trl_args(ORPOConfig, tmp_path), train_dataset=placeholder_dataset(),
                          peft_config=lora_config())
    load_trained_adapter(trainer, root)
    trainer.model.train()
    trl_loss, logged = trainer.get_batch_loss_metrics(trainer.model, cpo_batch(pairs, indices))
    for key in METRICS:
        assert metrics[key] == pytest.approx(float(logged[key]), rel=1e-5, abs=1e-6), key
    assert metrics["odds_ratio_loss"] == pytest.approx(-float(logged["log_odds_ratio"]), rel=1e-5)
    # the beta-weighted odds-ratio term is the same; the NLL term is not (see the module docstring)
    assert value - metrics["sft_loss"] == pytest.approx(float(trl_loss.detach()) - float(logged["nll_loss"]), rel=1e-5)
