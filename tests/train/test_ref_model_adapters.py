"""ref_model_adapters (stage dpo / kto): the reference is ref_model with its adapters folded in, as LLaMA-Factory's
create_ref_model loads it (every adapter of an untrainable model merged, in order).

Golden values come from transformers + PEFT on the same checkpoint: the adapters are written by PEFT itself
(get_peft_model with non-trivial initial weights, save_pretrained), the reference log-probabilities are PEFT's
PeftModel forward, and the DPO loss of one step is recomputed from PEFT's and transformers' log-probabilities with
TRL's sigmoid formula, -log sigmoid(beta ((pi_c - ref_c) - (pi_r - ref_r))).
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.acceptance.harness import write_hf_checkpoint

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

IDS = [[5, 17, 42, 99, 120, 7, 33, 2], [8, 31, 76, 140, 12, 55, 250, 2],  # two chosen rows, then the rejected
       [5, 17, 42, 61, 88, 200, 9, 2], [8, 31, 76, 19, 230, 4, 160, 2]]      # ones of the same prompts
PROMPT = 3  # the first three labels are the prompt's (-100)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("ref_adapters") / "llama"
    write_hf_checkpoint(path, "llama", small_vocab=True)
    return path


def peft_adapter(base: Path, out: Path, config) -> Path:
    """An adapter PEFT writes for `base`, with weights that change the model (not PEFT's identity start)."""
    torch.manual_seed(len(str(out)))
    model = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base), config)
    model.save_pretrained(out)
    return out


def lora(base: Path, out: Path) -> Path:
    return peft_adapter(base, out, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"],
                                                   init_lora_weights=False))


def oft(base: Path, out: Path) -> Path:
    return peft_adapter(base, out, peft.OFTConfig(r=0, oft_block_size=8, target_modules=["q_proj", "o_proj"],
                                                  init_weights=False))


def batch() -> dict[str, torch.Tensor]:
    ids = torch.tensor(IDS)
    labels = ids[:, 1:].clone()
    labels[:, :PROMPT] = -100
    return {"input_ids": ids[:, :-1], "attention_mask": torch.ones_like(ids[:, :-1]), "labels": labels}


def hf_logps(model, b: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed log-probabilities of the labelled tokens, per row, from a transformers / PEFT model."""
    with torch.no_grad():
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits.double()
    mask = b["labels"] != -100
    picked = logits.log_softmax(-1).gather(-1, b["labels"].clamp(min=0).unsqueeze(-1)).squeeze(-1)
    return (picked * mask).sum(-1)


def peft_reference(base: Path, adapters: list[Path]):
    """LLaMA-Factory's reference: each adapter loaded with PEFT and merged, in order."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    for adapter in adapters:
        model = peft.PeftModel.from_pretrained(model, adapter).merge_and_unload()
    return model.eval()


def model_args(base: Path):
    from pipeline.model.build import ModelArgs

    return ModelArgs(str(base), seed=0, dropout=0.0, context_length=None, qkv_bias=None, tie_word_embeddings=None)


@pytest.mark.parametrize("kinds", [("lora",), ("oft",), ("lora", "oft")], ids=["lora", "oft", "lora-then-oft"])
def test_the_reference_scores_as_peft_loads_it(checkpoint, tmp_path, kinds):
    """load_ref_model folds the adapters (PEFT-written LoRA, OFT, or several, comma-separated, in order): its
    log-probabilities are those of PEFT's model, and not the bare base's."""
    from pipeline.model.build import load_ref_model
    from pipeline.model.preference import pair_logps
    from pipeline.train.preference import token_nll

    makers = {"lora": lora, "oft": oft}
    adapters = [makers[kind](checkpoint, tmp_path / f"{i}-{kind}") for i, kind in enumerate(kinds)]
    ours = load_ref_model(str(checkpoint), model_args(checkpoint), ",".join(map(str, adapters))).eval()
    b = batch()
    with torch.no_grad():
        got = pair_logps(token_nll(ours, b), b["labels"])
    got = torch.cat([got.chosen, got.rejected]).double()
    golden = hf_logps(peft_reference(checkpoint, adapters), b)
    torch.testing.assert_close(got, golden, rtol=1e-5, atol=1e-4)
    assert not torch.allclose(golden, hf_logps(transformers.AutoModelForCausalLM.from_pretrained(checkpoint), b),
                              atol=1e-3)  # the adapters change what the reference scores


def test_a_dpo_step_against_the_adapted_reference_is_trls_loss(checkpoint, tmp_path):
    """One DPO step (build_reference with ref_model + ref_model_adapters, a full fine-tuning policy that starts as the
    base): the loss is TRL's sigmoid loss over transformers' policy and PEFT's reference log-probabilities."""
    from pipeline.model.build import FinetuneArgs, build_model
    from pipeline.recipe.args import PreferenceArgs, RecipeModel
    from pipeline.train.preference import PreferenceObjective, build_reference

    adapter = lora(checkpoint, tmp_path / "sft")
    base = model_args(checkpoint)
    ft = FinetuneArgs("full", 4, None, 0.0, "all", False, False, None, 2, None, 0)
    policy = build_model(base, ft).eval()

    class Engine:
        module, device = policy, torch.device("cpu")

        def __call__(self, *args, **kwargs):
            return policy(*args, **kwargs)

    beta = 0.1
    pref = PreferenceArgs("sigmoid", beta, 0.0, 0.0, 0.5, str(checkpoint), ref_model_adapters=str(adapter))
    reference = build_reference(pref, RecipeModel(base, ft), Engine())
    assert "ref_model_adapters" in reference.description and not any(p.requires_grad
                                                                    for p in reference.model.parameters())
    losses, _ = PreferenceObjective(pref, Engine(), reference).scores(batch())

    b = batch()
    pi = hf_logps(transformers.AutoModelForCausalLM.from_pretrained(checkpoint).eval(), b)
    ref = hf_logps(peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(checkpoint),
                                                  adapter).eval(), b)
    margin = (pi[:2] - ref[:2]) - (pi[2:] - ref[2:])
    golden = -torch.nn.functional.logsigmoid(beta * margin)
    torch.testing.assert_close(losses.double(), golden, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(golden, torch.full_like(golden, 0.6931471805599453), atol=1e-4)


def test_an_adapter_of_another_model_is_refused_naming_the_tensor(checkpoint, tmp_path):
    """As adapter_name_or_path's: every tensor is checked against ref_model when it is folded in."""
    from pipeline.errors import UserError
    from pipeline.model.build import load_ref_model

    other = tmp_path / "other"
    write_hf_checkpoint(other, "llama", small_vocab=True, intermediate_size=48)
    adapter = lora(other, tmp_path / "other-sft")
    with pytest.raises(UserError) as exc:
        load_ref_model(str(checkpoint), model_args(checkpoint), str(adapter))
    assert "down_proj.lora_A.weight' has shape [4, 48]" in str(exc.value), exc.value
