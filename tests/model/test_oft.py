"""OFT (finetuning_type: oft): forward, gradients, adapter files and merge against PEFT's OFT on transformers models.

Every golden value is PEFT's: get_peft_model(OFTConfig(...)) as LLaMA-Factory 0.9.5 builds it (r, oft_block_size,
target_modules, module_dropout; PEFT's defaults for the rest) on the same transformers checkpoint our model loads,
holding the same oft_R weights; its forward and backward, its merge_and_unload, the files its save_pretrained writes,
its Cayley-Neumann blocks and its block-size adjustment.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model import lora as L
from pipeline.model import oft as O
from pipeline.model.config import oft_blocks, trainable_params
from pipeline.model.weights import hf_state_dict, load_model
from tests.acceptance.harness import hf_model
from tests.model.test_dora import equal_logits_then_backward, tokens

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]  # our "all", HF names
# (oft_rank, oft_block_size): blocks of 8; 12, which divides neither 32 nor 64 (PEFT moves it: 8 and 16); 4 blocks
SETTINGS = [(0, 8), (0, 12), (4, 0)]


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Non-zero rotations (a fresh adapter is the base model, which any bug would pass)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for wrapper in L.lora_modules(model).values():
            wrapper.oft.weight.copy_(torch.randn(wrapper.oft.weight.shape, generator=gen) * 0.1)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    path = tmp_path_factory.mktemp("oft") / "llama"
    hf_model("llama", vocab_size=512, bos_token_id=1, eos_token_id=2).save_pretrained(path)  # small: fast
    return path


@pytest.fixture(scope="module", params=SETTINGS, ids=lambda s: f"r{s[0]}-b{s[1]}")
def pair(request, checkpoint):
    """(settings, ours with OFT on every Linear, PEFT's get_peft_model with the same oft_R)."""
    rank, size = request.param
    ours = load_model(checkpoint)
    O.apply_oft(ours, "all", rank=rank, block_size=size)
    randomise(ours, seed=1)
    return request.param, ours, peft_oft(checkpoint, ours, rank, size)


def peft_oft(path, ours: torch.nn.Module, rank: int, size: int):
    """PEFT's OFT model on the checkpoint at `path`, as LLaMA-Factory configures it, holding `ours`'s oft_R."""
    config = peft.OFTConfig(task_type="CAUSAL_LM", r=rank, oft_block_size=size, target_modules=TARGETS,
                            module_dropout=0.0)
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(path), config)
    loaded = peft.set_peft_model_state_dict(theirs, L.lora_state_dict(ours))
    assert not loaded.unexpected_keys
    assert not [k for k in loaded.missing_keys if "oft_" in k]
    return theirs


def test_logits_and_every_gradient_equal_peft(pair, checkpoint):
    _, ours, theirs = pair
    mine, base = equal_logits_then_backward(ours, theirs, load_model(checkpoint))
    assert (mine - base).abs().max() > 1e-2  # the rotations do change the output
    family = L.family_of_model(ours)
    grads = {f"{L.PEFT_PREFIX}{family.to_hf(name)}.oft_R.weight": wrapper.oft.weight.grad
             for name, wrapper in L.lora_modules(ours).items()}
    peft_grads = {n.replace(".default", ""): p.grad for n, p in theirs.named_parameters() if p.requires_grad}
    assert set(grads) == set(peft_grads) and len(grads) == 2 * len(TARGETS)
    for key, grad in grads.items():
        scale = peft_grads[key].abs().max().item()
        torch.testing.assert_close(grad, peft_grads[key], rtol=1e-5, atol=1e-5 * scale, msg=key)
        assert grad.abs().max() > 0, key


def test_merged_weights_equal_peft_merge_and_unload(pair, checkpoint):
    (rank, size), ours, _ = pair
    model = copy.deepcopy(ours).eval()
    L.merge_lora(model)
    got = hf_state_dict(model)
    want = peft_oft(checkpoint, ours, rank, size).merge_and_unload().state_dict()
    base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint).state_dict()
    for key, value in got.items():
        torch.testing.assert_close(value, want[key], rtol=1e-5, atol=1e-6, msg=key)
    assert sum(not torch.equal(value, base[key]) for key, value in got.items()) == 2 * len(TARGETS)


def test_adapter_files_are_peft_s_and_round_trip(pair, checkpoint, tmp_path):
    """Our adapter_config.json holds what PEFT's save_pretrained writes for the same model (every key both write,
    same value); PeftModel loads our files and gives our logits; an adapter PEFT wrote loads here."""
    (rank, size), ours, theirs = pair
    L.save_adapter(ours, tmp_path / "ours")
    theirs.save_pretrained(tmp_path / "peft")
    mine = json.loads((tmp_path / "ours" / L.ADAPTER_CONFIG).read_text())
    peft_written = json.loads((tmp_path / "peft" / L.ADAPTER_CONFIG).read_text())
    ignored = {"base_model_name_or_path", "revision", "peft_version", "target_modules", "auto_mapping"}
    differ = {k: (v, peft_written[k]) for k, v in mine.items() if k in peft_written and k not in ignored
              and v != peft_written[k]}
    assert differ == {} and mine["peft_type"] == "OFT" and (mine["r"], mine["oft_block_size"]) == (rank, size)
    assert sorted(mine["target_modules"]) == sorted(peft_written["target_modules"])
    from safetensors.torch import load_file

    ours_tensors, peft_tensors = load_file(tmp_path / "ours" / L.ADAPTER_WEIGHTS), \
        load_file(tmp_path / "peft" / L.ADAPTER_WEIGHTS)
    assert {k: v.shape for k, v in ours_tensors.items()} == {k: v.shape for k, v in peft_tensors.items()}
    x = tokens(2, ours.cfg.vocab_size)
    with torch.no_grad():
        base = transformers.AutoModelForCausalLM.from_pretrained(checkpoint)
        golden = peft.PeftModel.from_pretrained(base, tmp_path / "ours").eval()(input_ids=x).logits
        torch.testing.assert_close(ours.eval()(x), golden, rtol=1e-5, atol=1e-5)
        again = load_model(checkpoint).eval()
        L.load_adapter(again, tmp_path / "peft")
        assert all(isinstance(w, O.LinearWithOFT) for w in L.lora_modules(again).values())
        torch.testing.assert_close(again(x), golden, rtol=1e-5, atol=1e-5)


def test_a_model_of_another_method_or_setting_refuses_the_adapter(pair, checkpoint, tmp_path):
    (rank, size), ours, _ = pair
    L.save_adapter(ours, tmp_path / "adapter")
    plain = load_model(checkpoint)
    L.apply_lora(plain, "all", rank=4)
    with pytest.raises(UserError, match="peft_type is OFT but the model trains LORA .*finetuning_type: oft"):
        L.load_adapter(plain, tmp_path / "adapter")
    other = load_model(checkpoint)
    O.apply_oft(other, "all", rank=0, block_size=16)
    with pytest.raises(UserError, match="set the recipe's oft_"):
        L.load_adapter(other, tmp_path / "adapter")


def test_cayley_neumann_blocks_are_peft_s():
    """PEFT's own _cayley_batch for every number of terms, and for 5 (its default) I + 2Q + 2Q^2 + 2Q^3 + Q^4 by
    hand; the exact Cayley transform (use_cayley_neumann: false) is orthogonal."""
    from peft.tuners.oft.layer import OFTRotationModule

    weight = torch.randn(3, 6, generator=torch.Generator().manual_seed(0)) * 0.2
    for terms in range(1, 8):
        layer = O.OFTLayer(12, 3, 4, neumann_terms=terms)
        module = OFTRotationModule(3, 6, 4, 12, num_cayley_neumann_terms=terms)
        torch.testing.assert_close(layer.rotation(weight), module._cayley_batch(weight, 4, True, terms),
                                   rtol=0, atol=0)
    q = torch.zeros(3, 4, 4)
    rows, cols = torch.triu_indices(4, 4, 1)
    q[:, rows, cols] = weight
    q = q - q.transpose(1, 2)
    eye = torch.eye(4).expand(3, 4, 4)
    by_hand = eye + 2 * q + 2 * q @ q + 2 * q @ q @ q + q @ q @ q @ q
    torch.testing.assert_close(O.OFTLayer(12, 3, 4).rotation(weight), by_hand, rtol=1e-6, atol=1e-6)
    exact = O.OFTLayer(12, 3, 4, neumann_terms=None).rotation(weight)
    torch.testing.assert_close(exact @ exact.transpose(1, 2), eye, rtol=1e-5, atol=1e-5)


def test_block_sizes_are_peft_s_adjustment():
    from peft.tuners.oft.layer import OFTLayer

    for in_features in (12, 32, 64, 96, 100):
        for wanted in (1, 5, 7, 12, 24, 32, 33, 200):
            size = OFTLayer.adjust_oft_parameters(None, in_features, wanted)
            assert oft_blocks(in_features, 0, wanted) == (in_features // size, size), (in_features, wanted)
            assert oft_blocks(in_features, wanted, 0) == (size, in_features // size), (in_features, wanted)
    with pytest.raises(UserError, match="either oft_rank .* or oft_block_size"):
        oft_blocks(32, 4, 32)


def test_fresh_oft_is_the_base_and_its_count_is_plan_s(checkpoint):
    model = load_model(checkpoint).eval()
    x = tokens(3, model.cfg.vocab_size)
    before = model(x).detach()
    O.apply_oft(model, "all", rank=0, block_size=12)
    torch.testing.assert_close(model(x), before, rtol=1e-6, atol=1e-6)
    assert L.trainable_report(model)[0] == trainable_params(model.cfg, "oft", lora_target="all", oft=(0, 12))


def test_gpt2_and_unsupported_peft_settings_are_refused(tmp_path, checkpoint):
    gpt2 = tmp_path / "gpt2"
    hf_model("gpt2", vocab_size=512).save_pretrained(gpt2)
    with pytest.raises(UserError, match="Conv1D .* PEFT's OFT cannot wrap"):
        O.apply_oft(load_model(gpt2), "all")
    ours = load_model(checkpoint)
    O.apply_oft(ours, "all", block_size=16)
    L.save_adapter(ours, tmp_path / "adapter")
    config_path = tmp_path / "adapter" / L.ADAPTER_CONFIG
    config = json.loads(config_path.read_text())
    config_path.write_text(json.dumps({**config, "coft": True}))
    with pytest.raises(UserError, match="coft is true"):
        L.read_adapter_config(tmp_path / "adapter")


def test_a_module_in_additional_target_takes_no_rotation_as_in_peft(checkpoint):
    """lora_target and additional_target both naming v_proj (LLaMA-Factory passes them to PEFT as they are): PEFT's
    OFT rotates q_proj only and trains v_proj in full (modules_to_save), and so do we; plan counts what PEFT trains.
    Before, v_proj took a rotation and trained in full as well."""
    config = peft.OFTConfig(task_type="CAUSAL_LM", r=0, oft_block_size=8, target_modules=["q_proj", "v_proj"],
                            modules_to_save=["v_proj"], module_dropout=0.0)
    theirs = peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(checkpoint), config)
    ours = load_model(checkpoint)
    O.apply_oft(ours, ["q_proj", "v_proj"], block_size=8, additional_targets=["v_proj"])
    assert sorted(L.lora_modules(ours)) == ["layers.0.self_attn.q_proj", "layers.1.self_attn.q_proj"]
    trained, _ = theirs.get_nb_trainable_parameters()
    assert L.trainable_report(ours)[0] == trained == trainable_params(
        ours.cfg, "oft", lora_target=["q_proj", "v_proj"], additional_target=["v_proj"], oft=(0, 8))
    with pytest.raises(UserError, match="lora_target: every module it picks .*self_attn.v_proj.* is also in "
                                        "additional_target"):
        O.apply_oft(load_model(checkpoint), ["v_proj"], block_size=8, additional_targets=["v_proj"])
