"""quantization_bit (QLoRA) for the preference and reward stages: dpo (sigmoid, orpo, simpo), kto, rm and ppo's reward
model on a quantized base. The policy is the 4 / 8-bit base + the LoRA adapter, the reference the same base with the
adapter off (no second model: LLaMA-Factory's create_ref_model returns None for LoRA and TRL's trainers call the PEFT
model under disable_adapter()); a ref_model is loaded unquantized, as LLaMA-Factory loads it
(ref_model_quantization_bit, which is refused here, left None).

Golden values: transformers' BitsAndBytesConfig model of the same save_pretrained checkpoint with PEFT's LoRA loaded
from our adapter (the policy's log-probabilities) and under PEFT's disable_adapter() (the reference's), and the
losses re-typed from LLaMA-Factory 0.9.5's train/dpo/trainer.py (dpo_loss through TRL's sigmoid: -logsigmoid(beta
* ((pi_c - pi_r) - (ref_c - ref_r))), odds_ratio_loss :150-158, simpo_loss :160-166; sums of the response's token
log-probabilities, averaged over its tokens for orpo / simpo :234-235) and TRL's KTOTrainer.kto_loss (kl the mean of
pi_KL - ref_KL clamped at 0, 1 - sigmoid(beta (logratio - kl)) desirable, 1 - sigmoid(beta (kl - logratio))
undesirable, the mean over the examples).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pipeline.model.build import FinetuneArgs, ModelArgs, build_model
from pipeline.model.lora import lora_modules, save_adapter
from pipeline.recipe.args import PreferenceArgs, RecipeModel
from pipeline.train.preference import AdapterReference, KtoObjective, PreferenceObjective, build_reference

bnb = pytest.importorskip("bitsandbytes")
peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

from tests.acceptance.harness import write_hf_checkpoint  # noqa: E402  (after the skips)
from tests.model.test_qlora import bnb_config, reference_path  # noqa: E402

BETA, GAMMA = 0.5, 0.5
T = 9


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny Llama save_pretrained'd (384-token vocabulary)."""
    path = tmp_path_factory.mktemp("llama")
    write_hf_checkpoint(path, "llama", small_vocab=True)
    return path


def model_args(path, bits: int | None) -> ModelArgs:
    return ModelArgs(model_name_or_path=str(path), seed=0, dropout=0.0, context_length=None, qkv_bias=None,
                     tie_word_embeddings=None, quantization_bit=bits)


LORA = FinetuneArgs("lora", 4, None, 0.0, "all", False, False, None, 2, None, 0)


class Engine:
    """What the objectives call: the model (DeepSpeed's engine forwards to its module)."""

    device = torch.device("cpu")

    def __init__(self, model: torch.nn.Module):
        self.module = model

    def __call__(self, *args, **kwargs):
        return self.module(*args, **kwargs)


def trained_policy(path, bits: int, adapter_dir) -> torch.nn.Module:
    """Our QLoRA policy with a trained-looking adapter, saved (PEFT layout) to adapter_dir for the golden."""
    model = build_model(model_args(path, bits), LORA).eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(2)
        for wrapper in lora_modules(model).values():
            wrapper.lora.B.normal_(0, 0.3, generator=generator)
    save_adapter(model, adapter_dir)
    return model


def batch(rows: int) -> dict[str, torch.Tensor]:
    """(2 rows, T): chosen then rejected (or examples then KL sequences); labels shifted onto the positions that
    predict them, the first three (the prompt) unlabelled, the last rows a token shorter (right padding)."""
    ids = torch.randint(1, 384, (2 * rows, T + 1), generator=torch.Generator().manual_seed(4))
    labels = torch.where(torch.arange(T) >= 3, ids[:, 1:], -100)
    mask = torch.ones(2 * rows, T, dtype=torch.long)
    mask[rows - 1::rows, -1] = 0
    labels[mask == 0] = -100
    return {"input_ids": ids[:, :-1], "attention_mask": mask, "labels": labels}


def peft_logps(path, bits: int, adapter_dir, b: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    """(policy, reference) summed response log-probabilities per row and the response lengths: PEFT's LoRA on
    transformers' bitsandbytes model, with the adapter and under disable_adapter()."""
    base = reference_path(transformers.AutoModelForCausalLM.from_pretrained(
        path, quantization_config=bnb_config(bits), dtype=torch.float32, device_map="cpu")).eval()
    model = peft.PeftModel.from_pretrained(base, adapter_dir).eval()
    labelled = b["labels"] != -100

    def logps(logits: torch.Tensor) -> torch.Tensor:
        token = logits.float().log_softmax(-1).gather(-1, b["labels"].clamp(min=0)[..., None])[..., 0]
        return (token * labelled).sum(-1)

    # right padding: no labelled position sees a pad, so the golden runs without the mask (transformers' 8-bit model
    # given a mask moves even unpadded rows' logits by ~1e-2: it is no model of ours to match there)
    with torch.no_grad():
        policy = logps(model(b["input_ids"]).logits)
        with model.disable_adapter():
            reference = logps(model(b["input_ids"]).logits)
    return policy, reference, labelled.sum(-1).float()


def pref(loss: str) -> PreferenceArgs:
    return PreferenceArgs(pref_loss=loss, pref_beta=BETA, pref_ftx=0.0, dpo_label_smoothing=0.0, simpo_gamma=GAMMA,
                          ref_model=None)


def llamafactory_losses(loss: str, policy: torch.Tensor, reference: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
    """Per pair, LLaMA-Factory 0.9.5's (train/dpo/trainer.py, re-typed)."""
    pc, pr = policy.chunk(2)
    if loss == "sigmoid":
        rc, rr = reference.chunk(2)
        return -F.logsigmoid(BETA * ((pc - pr) - (rc - rr)))
    nc, nr = n.chunk(2)
    pc, pr = pc / nc, pr / nr  # orpo / simpo: the average log-probability
    if loss == "orpo":
        log_odds = (pc - pr) - (torch.log1p(-torch.exp(pc)) - torch.log1p(-torch.exp(pr)))
        return -pc + BETA * -F.logsigmoid(log_odds)
    return -F.logsigmoid(BETA * ((pc - pr) - GAMMA / BETA))  # simpo


@pytest.mark.parametrize("bits", [4, 8])
def test_qlora_dpo_orpo_simpo_kto_losses_are_peft_on_the_quantized_base_with_the_adapter_off_as_reference(
        llama, tmp_path, bits):
    """One policy, one golden model, every loss: each objective as train builds it (build_reference), scored on the
    same two pairs (for kto: two examples, then their two KL sequences)."""
    engine = Engine(trained_policy(llama, bits, tmp_path / "adapter"))
    b = batch(2)
    policy, ref, n = peft_logps(llama, bits, tmp_path / "adapter", b)
    assert (policy - ref).abs().max() > 1e-2  # the adapter is there to be switched off
    models = RecipeModel(model_args(llama, bits), LORA)
    for loss in ("sigmoid", "orpo", "simpo"):
        reference = build_reference(pref(loss), models, engine)
        if loss == "sigmoid":  # the policy's own weights, its adapter off: no second model
            assert isinstance(reference, AdapterReference) and reference.engine is engine
        else:
            assert reference is None  # orpo / simpo: reference-free
        with torch.no_grad():
            losses, metrics = PreferenceObjective(pref(loss), engine, reference).scores(b)
        torch.testing.assert_close(losses, llamafactory_losses(loss, policy, ref, n), rtol=1e-5, atol=1e-5)
        chosen = policy.chunk(2)[0] / (n.chunk(2)[0] if loss != "sigmoid" else 1)
        torch.testing.assert_close(metrics["logps/chosen"], chosen, rtol=1e-5, atol=1e-5)
        if loss == "sigmoid":  # the reference's rewards: beta (pi - ref), ref from PEFT's disable_adapter()
            torch.testing.assert_close(metrics["rewards/chosen"], BETA * (policy - ref).chunk(2)[0], rtol=1e-5,
                                       atol=1e-5)

    tags = torch.tensor([True, False])
    with torch.no_grad():
        kto, _ = KtoObjective(pref("sigmoid"), engine, build_reference(pref("sigmoid"), models, engine))(
            {**b, "kto_tags": tags})
    (target, kl_rows), (ref_target, ref_kl) = policy.chunk(2), ref.chunk(2)
    kl = (kl_rows - ref_kl).mean().clamp(min=0)
    ratio = target - ref_target
    golden = torch.cat([1 - torch.sigmoid(BETA * (ratio[tags] - kl)), 1 - torch.sigmoid(BETA * (kl - ratio[~tags]))])
    torch.testing.assert_close(kto.float(), golden.mean(), rtol=1e-5, atol=1e-6)


def test_a_ref_model_beside_a_quantized_policy_is_loaded_unquantized(llama):
    """LLaMA-Factory's create_ref_model loads ref_model with quantization_bit=ref_model_quantization_bit (None: the
    checkpoint's own weights); it was quantized with the policy's quantization_bit."""
    policy_model = build_model(model_args(llama, 4), LORA)
    args = PreferenceArgs(pref_loss="sigmoid", pref_beta=BETA, pref_ftx=0.0, dpo_label_smoothing=0.0,
                          simpo_gamma=GAMMA, ref_model=str(llama))
    reference = build_reference(args, RecipeModel(model_args(llama, 4), LORA), Engine(policy_model))
    kinds = {type(m).__name__ for m in reference.model.modules() if isinstance(m, torch.nn.Linear)}
    assert kinds == {"Linear"}
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in policy_model.modules())


def test_a_qlora_reward_model_trains_its_fp32_score_head_beside_the_frozen_quantized_base(llama):
    """stage rm: the score head is no quantized Linear (transformers' get_keys_to_not_convert leaves the output head
    out) and trains in full beside the adapter (PEFT SEQ_CLS's modules_to_save), in fp32; the base's Linears are
    frozen 4-bit codes."""
    from dataclasses import replace

    model = build_model(replace(model_args(llama, 4), stage="rm"), LORA)
    assert type(model.score).__name__ == "Linear" and model.score.weight.dtype == torch.float32
    assert model.score.weight.requires_grad
    quantized = [m for m in model.modules() if isinstance(m, bnb.nn.Linear4bit)]
    assert len(quantized) == 14 and not any(p.requires_grad for m in quantized for p in m.parameters())
    trained = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trained - {name for name in trained if ".lora." in name} == {"score.weight"}


def test_a_ppo_lora_reward_model_on_the_4bit_base_is_peft_seq_cls_on_transformers_4bit_model(llama, tmp_path):
    """stage ppo, reward_model_type lora: the rm run's adapter (LoRA + its score head) stays beside the policy's 4-bit
    base (LLaMA-Factory swaps it into its quantized policy), since no fold fits a quantized weight (it raised a shape
    error). Its scores are PEFT's SEQ_CLS adapter on transformers' 4-bit AutoModelForSequenceClassification."""
    from dataclasses import replace

    from pipeline.train.ppo import load_reward_model

    rm = build_model(replace(model_args(llama, 4), stage="rm"), LORA).eval()
    with torch.no_grad():
        generator = torch.Generator().manual_seed(5)
        for wrapper in lora_modules(rm).values():
            wrapper.lora.B.normal_(0, 0.3, generator=generator)
        rm.score.weight.normal_(0, 0.3, generator=generator)
    save_adapter(rm, tmp_path / "rm")
    scorer = load_reward_model(str(tmp_path / "rm"), "lora", model_args(llama, 4), "cpu", torch.float32, pad_id=383)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in scorer.model.modules())
    x = torch.randint(1, 383, (2, 8), generator=torch.Generator().manual_seed(6))
    base = reference_path(transformers.AutoModelForSequenceClassification.from_pretrained(
        llama, num_labels=1, quantization_config=bnb_config(4), dtype=torch.float32, device_map="cpu")).eval()
    with torch.no_grad():
        golden = peft.PeftModel.from_pretrained(base, tmp_path / "rm").eval()
        expected = torch.cat([golden(row[None]).logits[:, 0] for row in x])  # a lone row: its last token's score
        torch.testing.assert_close(scorer(x, torch.ones_like(x)), expected, rtol=1e-5, atol=1e-5)
