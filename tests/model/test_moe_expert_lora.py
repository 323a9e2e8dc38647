"""LoRA on the experts of a sparse MoE block (pipeline.model.expert_lora), against what LLaMA-Factory 0.9.5 + PEFT
0.21 train for lora_target names of the experts on transformers 5.24's Qwen3MoeForCausalLM and MixtralForCausalLM.

Golden facts from PEFT's source and get_peft_model itself: LLaMA-Factory's adapter.py passes lora_target as
target_modules; PEFT's _convert_peft_config_moe (utils/transformers_weight_conversion.py:391-461) turns gate_proj +
up_proj (Mixtral w1 + w3) into target_parameters gate_up_proj with rank_pattern 2r / alpha_pattern 2 alpha, down_proj
(w2) into down_proj, and raises for one of gate / up alone; ParamWrapper (tuners/lora/layer.py:2334-2580) trains
lora_A (E r', in), lora_B (out, r' E) per parameter. Here PEFT's own get_peft_model on a copy of the model gives the
tensor names and shapes, the config and the trainable count that ours must equal, and PeftModel.from_pretrained
loads our adapter with our logits; merged, transformers loads it with the same logits. Tiny fp32 checkpoints whose
input rows choose every expert of every sparse block."""
from __future__ import annotations

import json

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.config import read_config, trainable_params
from pipeline.model.lora import apply_lora, lora_modules, save_adapter
from pipeline.model.moe import sparse_blocks
from pipeline.model.weights import load_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

COMMON = dict(hidden_size=32, num_hidden_layers=2, vocab_size=128, max_position_embeddings=64,
              num_attention_heads=4, num_key_value_heads=2, num_experts_per_tok=2, tie_word_embeddings=False)
MODELS = {
    # a dense block beside the sparse one (mlp_only_layers): PEFT leaves its gate_proj / up_proj / down_proj alone
    "qwen3_moe": ("Qwen3MoeConfig", "Qwen3MoeForCausalLM",
                  dict(intermediate_size=48, moe_intermediate_size=16, num_experts=4, head_dim=8,
                       mlp_only_layers=[1]), ("gate_proj", "up_proj", "down_proj")),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(intermediate_size=24, num_local_experts=4),
                ("w1", "w3", "w2")),
}
SETS = {"all three": (0, 1, 2), "down alone": (2,), "gate and up": (0, 1)}  # the expert names each set holds


@pytest.fixture(scope="module", params=list(MODELS))
def checkpoint(request, tmp_path_factory):
    """(family, directory, expert names) of a save_pretrained random model (noise on every tensor)."""
    from tests.acceptance.harness import random_model

    config_cls, model_cls, extra, names = MODELS[request.param]
    path = tmp_path_factory.mktemp(request.param)
    random_model(getattr(transformers, model_cls),
                 getattr(transformers, config_cls)(**{**COMMON, **extra})).save_pretrained(path)
    return request.param, path, names


def rows() -> torch.Tensor:
    return torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(3))


def chosen_experts(model, x) -> list[set[int]]:
    """The experts each sparse block's router picks for some token of `x`."""
    picked = []
    for block in sparse_blocks(model):
        block.register_forward_hook(lambda m, args, out: picked.append(set(m.route(
            args[0].reshape(-1, args[0].shape[-1]))[2].flatten().tolist())))
    with torch.no_grad():
        model(x)
    return picked


def randomise(model, seed: int = 1) -> None:
    """Every LoRA B (zero at the start) drawn, so that each expert's update is real."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("lora.B"):
                param.copy_(torch.randn(param.shape, generator=gen) * 0.1)


@pytest.mark.parametrize("which", list(SETS))
def test_peft_trains_loads_and_merges_what_we_train(checkpoint, tmp_path, which):
    """For LLaMA-Factory's target_modules (q_proj, v_proj and the set's expert names): PEFT's get_peft_model trains
    tensors of exactly our adapter file's names and shapes, its count is plan's, its saved config is ours; PEFT loads
    our adapter with our logits, our loader reads it back, and the merge loads in transformers with them. The sets
    with one fused tensor (its wrapper not nested) run on Qwen3-MoE only: the layout is the same on Mixtral."""
    family, path, names = checkpoint
    if family == "mixtral" and which != "all three":
        pytest.skip("one fused tensor: run on qwen3_moe")
    assert_peft_trains_what_we_train(path, ["q_proj", "v_proj"] + [names[i] for i in SETS[which]], tmp_path)


def assert_peft_trains_what_we_train(path, targets: list[str], tmp_path) -> None:
    """test_peft_trains_loads_and_merges_what_we_train's checks on the checkpoint `path` for `targets`: rows() choose
    every expert of every sparse block; PEFT's get_peft_model trains our file's tensors (names, shapes), plan's count,
    our config's keys; PEFT loads our adapter with our logits, our loader reads it back, the merge loads in
    transformers with them (assert_adapter_agrees)."""
    from safetensors.torch import load_file

    from tests.model.test_families import assert_adapter_agrees

    ours = load_model(path).eval()
    assert all(picked == set(range(ours.cfg.n_experts)) for picked in chosen_experts(ours, rows()))
    apply_lora(ours, targets, rank=2, alpha=4)
    randomise(ours)
    save_adapter(ours, tmp_path / "adapter", {"base_model_name_or_path": str(path)})

    fresh = transformers.AutoModelForCausalLM.from_pretrained(path)
    theirs = peft.get_peft_model(fresh, peft.LoraConfig(r=2, lora_alpha=4, target_modules=list(targets)))
    trained = {n.replace(".default", ""): tuple(p.shape) for n, p in theirs.named_parameters() if p.requires_grad}
    written = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    assert {k: tuple(v.shape) for k, v in written.items()} == trained
    assert trainable_params(read_config(path), "lora", 2, targets) == sum(
        p.numel() for p in theirs.parameters() if p.requires_grad)
    theirs.save_pretrained(tmp_path / "peft")
    config, want = (json.loads((tmp_path / d / "adapter_config.json").read_text()) for d in ("adapter", "peft"))
    for key in ("target_parameters", "rank_pattern", "alpha_pattern", "target_modules", "r", "lora_alpha"):
        same = sorted if isinstance(want[key], list) else (lambda v: v)
        assert same(config[key]) == same(want[key]), key
    assert_adapter_agrees(peft, ours, path, tmp_path / "adapter", rows())


def test_one_fused_pair_of_rank_2r_over_gate_and_up(checkpoint):
    """gate_up_proj's LoRA is one pair per expert over both halves (A shared, B dense, scale 2 alpha / 2r: alpha / r;
    rsLoRA 2 alpha / sqrt(2r)), as ParamWrapper.get_delta_weight computes it (einsum "o r e, e r i -> e o i" times
    scaling): an update of rank up to 2r that separate rank-r pairs on gate_proj and up_proj (rank r each, B block-
    diagonal) could not give."""
    family, path, names = checkpoint
    for use_rslora, scaling in ((False, 4 / 2), (True, 8 / 4 ** 0.5)):
        ours = load_model(path).eval()
        apply_lora(ours, list(names[:2]), rank=2, alpha=4, use_rslora=use_rslora)
        randomise(ours)
        gate, up = (ours.get_submodule(f"layers.0.mlp.experts.1.{n}") for n in ("gate_proj", "up_proj"))
        a, b = gate.lora.A, gate.lora.B  # (hidden, 4), (4, 2 x width)
        assert tuple(a.shape) == (32, 4) and tuple(b.shape)[0] == 4 and not hasattr(up, "lora")
        delta = scaling * (a @ b).t()
        width = gate.linear.out_features
        assert torch.allclose(gate.merged_weight(), gate.linear.weight + delta[:width])
        assert torch.allclose(up.merged_weight(), up.linear.weight + delta[width:])
        assert torch.linalg.matrix_rank(delta[width:]) == 4


@pytest.mark.parametrize("targets,words", [
    (["gate_proj"], "lora_target: 'gate_proj' without 'up_proj'"),
    (["q_proj", "up_proj", "down_proj"], "lora_target: 'up_proj' without 'gate_proj'"),
    (["experts.0.down_proj"], "lora_target: 'experts.0.down_proj' picks MLP modules"),
    (["mlp.down_proj"], "lora_target: 'mlp.down_proj' picks MLP modules"),
    (["mlp.gate"], "lora_target: 'mlp.gate' picks MLP modules"),
    (["layers.1.mlp.up_proj"], "lora_target: 'layers.1.mlp.up_proj' picks MLP modules"),
])
def test_sets_peft_mishandles_are_refused_with_the_sets_that_work(tmp_path, targets, words):
    """gate_proj or up_proj alone (PEFT raises "Cannot convert PEFT target(s) gate_proj without also targeting
    up_proj"), a path reaching some experts (PEFT's conversion adapts every expert for it), the router by a path and
    a dense block's MLP: one message each, naming the sets that work."""
    from tests.acceptance.harness import random_model

    random_model(transformers.Qwen3MoeForCausalLM, transformers.Qwen3MoeConfig(
        **{**COMMON, **MODELS["qwen3_moe"][2]})).save_pretrained(tmp_path)
    with pytest.raises(UserError) as err:
        trainable_params(read_config(tmp_path), "lora", 2, targets)
    assert len(err.value.messages) == 1 and err.value.messages[0].startswith(words), err.value.messages
    assert "gate_proj, up_proj and down_proj together, down_proj alone, or gate_proj and up_proj together" \
        in err.value.messages[0]


def test_expert_lora_takes_no_dropout_nor_dora(checkpoint):
    """PEFT's ParamWrapper raises for lora_dropout != 0 and use_dora (tuners/lora/layer.py:2366-2373)."""
    _, path, names = checkpoint
    for settings in (dict(dropout=0.1), dict(use_dora=True)):
        with pytest.raises(ValueError, match="no lora_dropout and no DoRA"):
            apply_lora(load_model(path), [names[2]], rank=2, **settings)
    assert not lora_modules(load_model(path))
