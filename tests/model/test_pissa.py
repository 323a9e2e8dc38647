"""PiSSA (pissa_init): the starting pairs, the residual base and the converted adapter against PEFT's.

Every golden value is PEFT's: get_peft_model(LoraConfig(init_lora_weights="pissa")) on the same transformers
checkpoint our model loads (its lora_A / lora_B and residual base weights, its logits at step 0), and its
save_pretrained(path_initial_model_for_weight_conversion=...) after both adapters move by the same amount; and
init_lora_weights="pissa_niter_<k>" (pissa_iter k) with the global RNG in the state our seeding gives.
"""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.model import lora as L
from pipeline.model.weights import load_model
from tests.acceptance.harness import hf_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = {"gpt2": ["c_attn", "c_proj", "c_fc"],
           "llama": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]}
RANK, ALPHA = 4, 8


@pytest.fixture(scope="module", params=[("gpt2", False), ("llama", True)], ids=["gpt2", "llama-rslora"])
def pair(request, tmp_path_factory):
    """(checkpoint dir, ours with PiSSA on every Linear, PEFT's with init_lora_weights='pissa', rslora)."""
    family, rslora = request.param
    path = tmp_path_factory.mktemp("pissa") / family
    hf_model(family, vocab_size=512, bos_token_id=1, eos_token_id=2).save_pretrained(path)
    ours = load_model(path).eval()
    L.apply_lora(ours, "all", rank=RANK, alpha=ALPHA, use_rslora=rslora, seed=0, pissa_iter=L.PISSA_EXACT)
    base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS[family], use_rslora=rslora,
                             init_lora_weights="pissa", fan_in_fan_out=family == "gpt2", task_type="CAUSAL_LM")
    return path, ours, peft.get_peft_model(base, config).eval(), rslora


def peft_adapter(theirs) -> dict[str, torch.Tensor]:
    """PEFT's adapter tensors under the keys its save_pretrained writes."""
    return dict(peft.get_peft_model_state_dict(theirs))


def assert_same_start(ours, theirs, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """Our starting lora_A / lora_B equal PEFT's, and our residual base weights (in the HF layout) its base layers."""
    golden = peft_adapter(theirs)
    mine = L.lora_state_dict(ours)
    assert mine.keys() == golden.keys()
    for key, value in golden.items():
        torch.testing.assert_close(mine[key], value, rtol=rtol, atol=atol, msg=key)
    residual = theirs.base_model.model.state_dict()
    family = L.family_of_model(ours)
    for name, wrapper in L.lora_modules(ours).items():
        hf = family.to_hf(name)
        value = L._hf_layout(family, f"{name}.weight", wrapper.linear.weight)
        torch.testing.assert_close(value, residual[f"{hf}.base_layer.weight"], rtol=rtol, atol=atol, msg=hf)


def test_pairs_residual_and_step0_logits_equal_peft(pair):
    path, ours, theirs, _ = pair
    assert_same_start(ours, theirs)
    x = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(0))
    original = load_model(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(x), original(x), rtol=1e-4, atol=1e-4)  # PiSSA starts at the base model
        torch.testing.assert_close(ours(x), theirs(input_ids=x).logits, rtol=1e-4, atol=1e-4)


def test_converted_adapter_equals_peft_and_loads_on_the_original_base(pair, tmp_path):
    """Runs after the step-0 test: it moves both models' adapters (the fixture's) by the same random amount."""
    path, ours, theirs, rslora = pair
    theirs.save_pretrained(tmp_path / "peft_init")  # PEFT needs the starting adapter as files
    init_cfg = json.loads((tmp_path / "peft_init/adapter_config.json").read_text())
    (tmp_path / "peft_init/adapter_config.json").write_text(json.dumps({**init_cfg, "init_lora_weights": True}))
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():  # "training": the same move on both
        for name, param in theirs.named_parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=gen) * 0.05)
        moved = peft_adapter(theirs)
        for name, wrapper in L.lora_modules(ours).items():
            key = L.PEFT_PREFIX + L.family_of_model(ours).to_hf(name)
            wrapper.lora.A.copy_(moved[f"{key}.lora_A.weight"].t())
            wrapper.lora.B.copy_(moved[f"{key}.lora_B.weight"].t())
    theirs.save_pretrained(tmp_path / "peft_conv", path_initial_model_for_weight_conversion=str(tmp_path / "peft_init"))
    L.save_adapter(ours, tmp_path / "ours")
    golden_cfg = json.loads((tmp_path / "peft_conv/adapter_config.json").read_text())
    cfg = json.loads((tmp_path / "ours/adapter_config.json").read_text())
    assert (cfg["r"], cfg["init_lora_weights"], cfg["use_rslora"]) == (2 * RANK, True, rslora)
    assert cfg["lora_alpha"] == pytest.approx(golden_cfg["lora_alpha"])
    from safetensors.torch import load_file

    golden = load_file(tmp_path / "peft_conv/adapter_model.safetensors")
    written = load_file(tmp_path / "ours/adapter_model.safetensors")
    assert written.keys() == golden.keys()
    for key, value in golden.items():
        torch.testing.assert_close(written[key], value, rtol=1e-4, atol=1e-5, msg=key)
    # PEFT loads ours onto the ORIGINAL checkpoint: the model we trained (residual + A B)
    x = torch.randint(0, 512, (2, 9), generator=torch.Generator().manual_seed(2))
    base = transformers.AutoModelForCausalLM.from_pretrained(path).eval()
    loaded = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=x).logits, ours(x), rtol=1e-4, atol=1e-4)
    # the starting pairs come back out of the converted adapter exactly (a resume's residual)
    again = L.pissa_start_of(tmp_path / "ours")
    for key, value in L.pissa_start(ours).items():
        assert torch.equal(again[key], value), key


def test_resume_start_gives_the_same_residual_bit_for_bit(pair, tmp_path):
    path, ours, _, rslora = pair
    L.save_adapter(ours, tmp_path / "a")
    resumed = load_model(path).eval()
    L.apply_lora(resumed, "all", rank=RANK, alpha=ALPHA, use_rslora=rslora, seed=0,
                 pissa_start=L.pissa_start_of(tmp_path / "a"))
    first, second = ours.state_dict(), resumed.state_dict()
    for key, value in first.items():
        if ".lora." not in key:
            assert torch.equal(second[key], value), key


@pytest.mark.parametrize("family,tol", [("llama", 0.0), ("gpt2", 1e-4)], ids=["llama", "gpt2"])
def test_randomized_svd_equals_peft_given_the_same_rng_state(tmp_path, monkeypatch, family, tol):
    """pissa_iter k >= 0: PEFT's init_lora_weights="pissa_niter_<k>" calls torch.svd_lowrank on the global RNG,
    in a state left by whatever ran before (its own lora_A / lora_B constructions draw from it too); ours reseeds
    it with `seed` before each weight's call. Given that same state (PEFT's svd_lowrank call wrapped to seed
    first, as pissa_pair does), PEFT's pairs and residual bases are ours: bit for bit on Llama's Linears; on
    GPT-2 to 1e-4, because PEFT runs svd_lowrank on the transposed view of a Conv1D weight and we on the same
    values stored contiguously, so the products round differently, and the power iterations, not converged in a
    few steps, turn ~1e-7 into ~3e-5 where two singular values are close (0.8300 / 0.8265 here)."""
    niter, seed = 3, 5
    hf_model(family, vocab_size=512, bos_token_id=1, eos_token_id=2).save_pretrained(tmp_path)
    ours = load_model(tmp_path).eval()
    L.apply_lora(ours, "all", rank=RANK, alpha=ALPHA, seed=seed, pissa_iter=niter)

    def seeded_svd_lowrank(*args, **kwargs):
        torch.manual_seed(seed)
        return torch.svd_lowrank(*args, **kwargs)

    monkeypatch.setattr(peft.tuners.lora.layer, "svd_lowrank", seeded_svd_lowrank)
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=TARGETS[family], fan_in_fan_out=family == "gpt2",
                             init_lora_weights=f"pissa_niter_{niter}", task_type="CAUSAL_LM")
    base = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert_same_start(ours, peft.get_peft_model(base, config), rtol=tol, atol=tol)


def test_randomized_svd_is_seeded():
    gen = torch.Generator().manual_seed(0)
    low = torch.randn(24, 4, generator=gen) @ torch.randn(4, 16, generator=gen)
    weight = low + 1e-3 * torch.randn(24, 16, generator=gen)  # near rank 4: the randomized SVD finds that part
    torch.manual_seed(123)
    a1, b1 = L.pissa_pair(weight, 4, 2.0, niter=2, seed=7)
    torch.manual_seed(456)  # the global RNG plays no part, and is left as it was
    state = torch.get_rng_state()
    a2, b2 = L.pissa_pair(weight, 4, 2.0, niter=2, seed=7)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(a1, a2) and torch.equal(b1, b2)
    exact_a, exact_b = L.pissa_pair(weight, 4, 2.0, niter=L.PISSA_EXACT)
    torch.testing.assert_close(b1 @ a1, exact_b @ exact_a, rtol=1e-2, atol=1e-2)


def test_dora_is_refused():
    model = torch.nn.Sequential(torch.nn.Linear(8, 8))
    with pytest.raises(ValueError, match="PiSSA and DoRA"):
        L.apply_lora(model, "all", rank=2, use_dora=True, pissa_iter=-1)
