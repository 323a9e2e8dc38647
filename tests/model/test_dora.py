"""DoRA (use_dora): forward, gradients, adapter files and merge against PEFT's use_dora on transformers models.

Every golden value is PEFT's: get_peft_model(LoraConfig(use_dora=True)) on the same transformers checkpoint our
model loads, holding the same A, B and magnitudes; its forward and backward, and its merge_and_unload.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model import lora as L
from pipeline.model.weights import hf_state_dict, load_model
from tests.acceptance.harness import hf_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# PEFT's target_modules for every Linear but the head, in each family's transformers names (our "all")
TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
RANK, ALPHA = 4, 8


def tokens(seed: int, vocab: int, shape=(2, 10)) -> torch.Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-trivial A, B and magnitudes (a fresh adapter is the base model, which any bug would pass)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for wrapper in L.lora_modules(model).values():
            wrapper.lora.A.copy_(torch.randn(wrapper.lora.A.shape, generator=gen) * 0.2)
            wrapper.lora.B.copy_(torch.randn(wrapper.lora.B.shape, generator=gen) * 0.2)
            wrapper.magnitude.mul_(1 + 0.3 * torch.randn(wrapper.magnitude.shape, generator=gen))


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def pair(request, tmp_path_factory):
    """(family, checkpoint dir, ours with DoRA on every Linear, PEFT's get_peft_model with the same values)."""
    family = request.param
    path = tmp_path_factory.mktemp("dora") / family
    hf_model(family, vocab_size=512, bos_token_id=1, eos_token_id=2).save_pretrained(path)  # small: fast
    ours = load_model(path)
    L.apply_lora(ours, "all", rank=RANK, alpha=ALPHA, use_dora=True, seed=0)
    randomise(ours, seed=1)
    return family, path, ours, peft_dora(family, path, ours)


def trained_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """PEFT's name of every trainable tensor -> its gradient as PEFT stores the tensor."""
    family = L.family_of_model(model)
    return {f"{L.PEFT_PREFIX}{family.to_hf(name)}.{suffix}": (p.grad.t() if transposed else p.grad)
            for name, wrapper in L.lora_modules(model).items()
            for suffix, (p, transposed) in wrapper.peft_params().items()}


def equal_logits_then_backward(ours: torch.nn.Module, theirs: torch.nn.Module,
                               base: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """Our logits equal PEFT's on random tokens (eval mode: the models' dropout draws differ); both models then
    hold the gradients of one cross-entropy; returns (our logits, the base model's)."""
    x, target = tokens(0, ours.cfg.vocab_size), tokens(1, ours.cfg.vocab_size)
    ours.eval().zero_grad()
    theirs.eval().zero_grad()
    mine = ours(x)
    golden = theirs(input_ids=x).logits
    torch.testing.assert_close(mine, golden, rtol=1e-5, atol=1e-5)
    for logits in (mine, golden):
        torch.nn.functional.cross_entropy(logits.flatten(0, 1), target.flatten()).backward()
    return mine, base(x)


def test_logits_and_every_gradient_equal_peft(pair):
    _, path, ours, theirs = pair
    mine, base = equal_logits_then_backward(ours, theirs, load_model(path))
    assert (mine - base).abs().max() > 1e-1  # the adapter does change the output
    grads = trained_grads(ours)
    saved_as = {".default": "", "lora_magnitude_vector.weight": "lora_magnitude_vector"}  # PEFT's save_pretrained
    peft_grads = {}
    for name, param in theirs.named_parameters():
        if param.requires_grad:
            for old, new in saved_as.items():
                name = name.replace(old, new)
            peft_grads[name] = param.grad
    assert set(grads) == set(peft_grads) and any("lora_magnitude_vector" in k for k in grads)
    for key, grad in grads.items():
        scale = peft_grads[key].abs().max().item()  # summation order differs: 1e-5 of the tensor's largest entry
        torch.testing.assert_close(grad, peft_grads[key], rtol=1e-5, atol=1e-5 * scale, msg=f"{key}")
        assert grad.abs().max() > 0, key
    ours.zero_grad()
    theirs.zero_grad()


def peft_dora(family: str, path, ours: torch.nn.Module):
    """PEFT's DoRA model on the checkpoint at `path`, holding `ours`'s A, B and magnitudes."""
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS[family], use_dora=True,
                             fan_in_fan_out=family == "gpt2")
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(path), config)
    loaded = peft.set_peft_model_state_dict(theirs, L.lora_state_dict(ours))
    assert not loaded.unexpected_keys
    assert not [k for k in loaded.missing_keys if "lora_" in k]
    return theirs


def test_merged_weights_equal_peft_merge_and_unload(pair):
    family, path, ours, _ = pair
    model = copy.deepcopy(ours).eval()
    L.merge_lora(model)
    got = hf_state_dict(model)
    want = peft_dora(family, path, ours).merge_and_unload().state_dict()
    base = transformers.AutoModelForCausalLM.from_pretrained(path).state_dict()
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-6, msg=key)
    assert sum(not torch.equal(value, base[key]) for key, value in got.items()) >= 2 * len(TARGETS[family])


def test_adapter_files_round_trip_and_say_use_dora(pair, tmp_path):
    """adapter_config.json says use_dora; PEFT's loader and ours read the magnitudes back; an adapter PEFT wrote
    loads too; a LoRA model refuses a DoRA adapter (another model), naming the recipe key."""
    _, path, ours, theirs = pair
    L.save_adapter(ours, tmp_path / "adapter")
    assert json.loads((tmp_path / "adapter" / L.ADAPTER_CONFIG).read_text())["use_dora"] is True
    x = tokens(2, ours.cfg.vocab_size)
    base = transformers.AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():
        golden = peft.PeftModel.from_pretrained(base, tmp_path / "adapter").eval()(input_ids=x).logits
        again = load_model(path).eval()
        L.load_adapter(again, tmp_path / "adapter")
        assert all(isinstance(w, L.LinearWithDoRA) for w in L.lora_modules(again).values())
        torch.testing.assert_close(again(x), golden, rtol=1e-5, atol=1e-5)
        theirs.save_pretrained(tmp_path / "peft")
        written_by_peft = load_model(path).eval()
        L.load_adapter(written_by_peft, tmp_path / "peft")
        torch.testing.assert_close(written_by_peft(x), golden, rtol=1e-5, atol=1e-5)
    plain = load_model(path)
    L.apply_lora(plain, "all", rank=RANK, alpha=ALPHA)
    with pytest.raises(UserError, match="use_dora is True but the model's LoRA uses False .*use_dora"):
        L.load_adapter(plain, tmp_path / "adapter")


def test_dropout_in_training_as_peft():
    """With lora_dropout in training PEFT multiplies W by the dropped input a second time; the same mask (same
    seed, one draw each) must give the same output and gradients."""
    torch.manual_seed(0)
    base = torch.nn.Sequential(torch.nn.Linear(6, 5))
    ours = L.LinearWithDoRA(copy.deepcopy(base[0]), rank=2, alpha=4, dropout=0.5).train()
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.5,
                                                                     target_modules=["0"], use_dora=True)).train()
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        ours.lora.A.copy_(torch.randn(6, 2, generator=gen))
        ours.lora.B.copy_(torch.randn(2, 5, generator=gen))
        ours.magnitude.mul_(1.5)
    peft.set_peft_model_state_dict(theirs, {f"base_model.model.0.{k}": (p.detach().t() if t else p.detach())
                                            for k, (p, t) in ours.peft_params().items()})
    x = torch.randn(3, 6, generator=gen)
    torch.manual_seed(2)
    mine = ours(x)
    torch.manual_seed(2)
    golden = theirs(x)
    torch.testing.assert_close(mine, golden, rtol=1e-5, atol=1e-6)
    mine.square().sum().backward()
    golden.square().sum().backward()
    layer = theirs.base_model.model[0]
    torch.testing.assert_close(ours.magnitude.grad, layer.lora_magnitude_vector["default"].weight.grad, rtol=1e-5,
                               atol=1e-6)
    torch.testing.assert_close(ours.lora.A.grad.t(), layer.lora_A["default"].weight.grad, rtol=1e-5, atol=1e-6)


def test_fresh_dora_is_the_base_and_counts_its_magnitudes():
    """m starts at the norms of W's rows: the output is unchanged; the trainable count (plan's estimate) adds one
    magnitude per output feature."""
    from pipeline.model.config import PRESETS, trainable_params
    from pipeline.model.gpt import GPTModel

    cfg = PRESETS["tiny"].replace(context_length=32)
    model = GPTModel(cfg, seed=0).eval()
    x = tokens(3, cfg.vocab_size)
    before = model(x).detach()
    L.apply_lora(model, "all", rank=RANK, use_dora=True, seed=0)
    torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    assert L.trainable_report(model)[0] == trainable_params(cfg, "lora", RANK, "all", use_dora=True)
    assert trainable_params(cfg, "lora", RANK, "all", use_dora=True) > trainable_params(cfg, "lora", RANK, "all")
