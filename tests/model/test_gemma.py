"""Gemma 3's text-only checkpoints (Gemma3ForCausalLM: gemma-3-1b, gemma-3-270m), Gemma 1's (GemmaForCausalLM) and
Gemma 2's (Gemma2ForCausalLM) written by transformers 5.24.

The family tests of tests/model/test_families.py run here on a tiny Gemma 3, Gemma 1 and Gemma 2 (imported below:
pytest collects them in this module, where `checkpoint` is this file's fixture): logits, padded batches, greedy
decoding with and without the KV cache, export read back by AutoModelForCausalLM, PEFT adapters and merging, packing,
fp16 (SKIPPED: which of them the Gemma 1 / 2 checkpoints leave to Gemma 3's).
What the tiny model holds is what Gemma 3 does otherwise (transformers/models/gemma3/modeling_gemma3.py, 5.24):

- RMSNorm in fp32 times (1 + weight), rounded once (Gemma3RMSNorm, :119-133), in the four norms of each block
  (input, post_attention, pre_feedforward, post_feedforward: Gemma3DecoderLayer, :359-403) and the q / k norms (:310)
- token embeddings times sqrt(hidden_size) cast to their dtype (Gemma3TextScaledWordEmbedding, :89-100, :466-469)
- GeGLU: down(gelu_pytorch_tanh(gate) * up) (Gemma3MLP, :103-116)
- head_dim 32 x 4 heads != hidden 64; scores scaled by query_pre_attn_scalar ** -0.5 = 24 ** -0.5, not head_dim's
  (Gemma3Attention.scaling, :290)
- sliding_window_pattern 2: layers 0 and 2 see the last 5 positions (shorter than every sequence here), 1 and 3 all
  (configuration_gemma3.py:100-107), the local layers rotating by rope_local_base_freq 100, the global ones by
  rope_theta 10,000 (Gemma3RotaryEmbedding per layer type, :139-197; configuration_gemma3.py:133-156)
- a tied head (tie_word_embeddings defaults to true)

Gemma 1 (modeling_gemma.py) has the norms (GemmaRMSNorm, :64-80), the embedding scale (:55-61) and GeGLU (:84-93) in
Llama's two-norm block with head_dim ** -0.5 (:226), MQA here.

Which attention path runs: the same as every family's (the dense CPU path, SDPA, the packing buckets); q is scaled by
sqrt(head_dim / query_pre_attn_scalar) before it, so every kernel's own head_dim ** -0.5 gives Gemma's scale.
"""
from __future__ import annotations

import copy
import json

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.config import PRESETS, count_params, read_config
from pipeline.model.weights import load_model, save_hf
from tests.acceptance.harness import random_model
from tests.model.test_families import (  # noqa: F401 (collected here, on this file's checkpoint)
    ids, test_batched_left_padded_generation_equals_one_by_one,
    test_export_loads_in_auto_model, test_fp16_logits_are_as_close_to_fp32_as_transformers_fp16_and_gradients_finite,
    test_greedy_generation_equals_transformers_with_and_without_cache, test_kv_cache_holds_the_key_value_heads_only,
    test_logits_equal_transformers, test_padded_batch_logits_equal_transformers,
    test_peft_loads_our_adapter_and_merge_matches, test_segment_ids_attend_within_each_packed_sequence)

transformers = pytest.importorskip("transformers")

TINY = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=96, vocab_size=512, max_position_embeddings=256,
            num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, sliding_window=5,
            sliding_window_pattern=2, rope_theta=10000.0, rope_local_base_freq=100.0)


def gemma3(seed: int = 0, **changes):
    """A random Gemma3ForCausalLM; every tensor gets N(0, 0.1) noise so that the 0-centred norms leave zero (a norm
    scaled by weight instead of 1 + weight could not pass) and greedy decoding stays varied."""
    return random_model(transformers.Gemma3ForCausalLM, transformers.Gemma3TextConfig(**{**TINY, **changes}), seed=seed)


# Gemma 1 (GemmaForCausalLM, gemma-2b / 7b): Gemma's norms, embedding scale and GeGLU (the releases' hidden_act
# "gelu", read as the tanh form: configuration_gemma.py:87-94) in Llama's two-norm block, MQA, head_dim 32 x 4 != 64
GEMMA1 = dict(hidden_size=64, num_hidden_layers=2, intermediate_size=96, vocab_size=512, max_position_embeddings=256,
              num_attention_heads=4, num_key_value_heads=1, head_dim=32, hidden_act="gelu")


def gemma1(seed: int = 0):
    """N(0, 0.3) on the blocks' tensors: with 0.1 the embeddings, scaled by sqrt(64), outweighed two blocks and greedy
    decoding repeated one token."""
    torch.manual_seed(seed)
    model = transformers.GemmaForCausalLM(transformers.GemmaConfig(**GEMMA1)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.add_(torch.randn_like(p) * (0.1 if "embed" in name else 0.3))
    return model


# Gemma 2 (Gemma2ForCausalLM, gemma-2-2b / 9b / 27b): Gemma 3's four norms and query_pre_attn_scalar without q/k norms
# or a local RoPE; tanh softcapping of the scores and the logits (modeling_gemma2.py:181-206 eager_attention_forward's
# softcap, Gemma2ForCausalLM.forward's final_logit_softcapping), caps small enough here to bind; a window in every
# other layer (Gemma2Config.__post_init__)
GEMMA2 = dict(hidden_size=64, num_hidden_layers=4, intermediate_size=96, vocab_size=512, max_position_embeddings=256,
              num_attention_heads=4, num_key_value_heads=2, head_dim=32, query_pre_attn_scalar=24, sliding_window=5,
              attn_logit_softcapping=2.0, final_logit_softcapping=3.0)
# the family tests each further checkpoint runs: those its differences from Gemma 3's reach
SKIPPED = {"gemma1-mqa": {"test_segment_ids_attend_within_each_packed_sequence",
                          "test_fp16_logits_are_as_close_to_fp32_as_transformers_fp16_and_gradients_finite",
                          "test_batched_left_padded_generation_equals_one_by_one",
                          "test_kv_cache_holds_the_key_value_heads_only"},
           "gemma2-softcap": {"test_batched_left_padded_generation_equals_one_by_one"}}


def saved(factory, name: str, model):
    """(variant, directory, transformers model) saved with save_pretrained."""
    path = factory.mktemp(name)
    model.save_pretrained(path)
    return name, path, model


@pytest.fixture(scope="module")
def gemma3_checkpoint(tmp_path_factory):
    return saved(tmp_path_factory, "gemma3-window-scalar", gemma3())


@pytest.fixture(scope="module")
def gemma1_checkpoint(tmp_path_factory):
    return saved(tmp_path_factory, "gemma1-mqa", gemma1())


@pytest.fixture(scope="module")
def gemma2_checkpoint(tmp_path_factory):
    model = random_model(transformers.Gemma2ForCausalLM, transformers.Gemma2Config(**GEMMA2))
    return saved(tmp_path_factory, "gemma2-softcap", model)


@pytest.fixture(params=["gemma3-window-scalar", "gemma1-mqa", "gemma2-softcap"])
def checkpoint(request):
    """The family tests' fixture: Gemma 3's checkpoint, Gemma 1's and Gemma 2's (the tests their differences reach;
    the mechanisms below the model's function are the same code)."""
    if request.node.originalname in SKIPPED.get(request.param, ()):
        pytest.skip("the Gemma 3 checkpoint covers it")
    return request.getfixturevalue({"gemma3-window-scalar": "gemma3_checkpoint", "gemma1-mqa": "gemma1_checkpoint",
                                    "gemma2-softcap": "gemma2_checkpoint"}[request.param])


def test_gemma1_config_is_read_into_fields(gemma1_checkpoint):
    _, path, _ = gemma1_checkpoint
    cfg = read_config(path)
    expect = dict(family="gemma", mlp="geglu", norm_unit_offset=True, scale_embeddings=True, sandwich_norms=False,
                  qk_norm=False, head_dim=32, kv_heads=1, attention_scores_scalar=None, rope_local_theta=None,
                  layer_windows=(), tie_weights=True)
    assert {k: getattr(cfg, k) for k in expect} == expect
    # the releases' config.json says "gelu" (transformers reads the tanh form; save_pretrained writes that back)
    from pipeline.model.config import from_hf_config
    raw = json.loads((path / "config.json").read_text())
    assert raw["hidden_act"] == "gelu_pytorch_tanh" and from_hf_config({**raw, "hidden_act": "gelu"}) == cfg


def test_gemma2_config_and_loss_on_the_softcapped_logits(gemma2_checkpoint):
    """Gemma 2's fields; the training loss (the head's plain path through SoftcappedHead) is transformers' loss on its
    softcapped logits, and its gradients are finite."""
    _, path, ref = gemma2_checkpoint
    ours = load_model(path)
    expect = dict(family="gemma2", sandwich_norms=True, qk_norm=False, attention_scores_scalar=24,
                  attn_logit_softcapping=2.0, final_logit_softcapping=3.0, layer_windows=(5, None, 5, None),
                  rope_local_theta=None)
    assert {k: getattr(ours.cfg, k) for k in expect} == expect
    x = ids(12, (2, 14))
    labels = torch.cat([x[:, 1:], torch.full((2, 1), -100)], 1)
    with torch.no_grad():
        want = ref(x, labels=x).loss
    loss = ours.train()(x, labels=labels)
    assert torch.allclose(loss, want, atol=1e-5), (loss, want)
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters())


def test_gemma2_attention_scales_its_scores_once_as_transformers_eager_attention(gemma2_checkpoint):
    """Gemma2Attention runs eager_attention_forward (modeling_gemma2.py:181-206, 5.24): q k^T * query_pre_attn_scalar
    ** -0.5, softcap, mask, softmax, @ v. In bf16 our block-0 attention on transformers' own input is that bitwise
    (every position 0: RoPE is the identity in both, so only the scaling can differ). Failed before (0.016 apart): q
    was first multiplied by sqrt(head_dim / query_pre_attn_scalar) for the kernels' head_dim ** -0.5, a rounding and a
    multiply per layer that the explicit path, which scales the scores itself, does not need."""
    _, path, ref = gemma2_checkpoint
    ours, ref = load_model(path).eval().to(torch.bfloat16), copy.deepcopy(ref).eval().to(torch.bfloat16)  # not the
    # module's model, which the other tests read in fp32
    x = ref.model.embed_tokens(ids(13, (2, 9))) * 8.0  # hidden 64: Gemma's sqrt(hidden) scale, exact in bf16
    zeros = torch.zeros(2, 9, dtype=torch.long)
    causal = torch.full((9, 9), torch.finfo(torch.bfloat16).min).triu(1).to(torch.bfloat16)[None, None]
    with torch.no_grad():
        theirs = ref.model.layers[0].self_attn(ref.model.layers[0].input_layernorm(x), attention_mask=causal,
                                               position_embeddings=ref.model.rotary_emb(x, zeros))[0]
        block = ours.layers[0]
        mine = block.self_attn(block.input_layernorm(x), None, None, ours._rope(zeros, x.dtype))
    assert torch.equal(mine, theirs), (mine.float() - theirs.float()).abs().max()
    assert block.self_attn.q_scale == 1.0


@pytest.mark.parametrize("cap", [None, 2.0])
def test_activation_bytes_count_what_a_gemma2_block_keeps_for_the_backward(cap):
    """plan's activation estimate (config.activation_bytes) of a Gemma 2 block, against what autograd keeps of one
    bf16 training forward (tests/model/test_moe.py's saved_bytes_per_token), within its 15%: the softcapped explicit
    path keeps ~11 bytes per score (the tanh output, the fp32 softmax, its cast, the masks) where the estimate counted
    the kernels' 5. Failed before with the cap (6,272 estimated per token, 9,752 measured); without it, it passed."""
    from pipeline.model.config import ModelConfig, activation_bytes
    from pipeline.model.gpt import TransformerBlock, rope_cos_sin
    from pipeline.model.rope import rope_inv_freq
    from tests.model.test_moe import saved_bytes_per_token

    cfg = ModelConfig(family="gemma2", vocab_size=8, context_length=256, emb_dim=64, n_layers=1, n_heads=4,
                      n_kv_heads=2, head_size=32, mlp="geglu", norm="rmsnorm", positions="rope", mlp_bias=False,
                      qkv_fused=False, norm_unit_offset=True, scale_embeddings=True, sandwich_norms=True,
                      attention_scores_scalar=24, attn_logit_softcapping=cap)
    block, rope = TransformerBlock(cfg), rope_cos_sin(rope_inv_freq(cfg), torch.arange(128)[None], torch.bfloat16)
    measured = saved_bytes_per_token(_Applied(lambda x: block(x, None, None, rope), block), 128)
    assert 0.85 * measured <= activation_bytes(cfg, 128, 1) / 128 <= 1.15 * measured, measured


class _Applied(torch.nn.Module):
    """`function` as a module holding `module` (saved_bytes_per_token casts it and leaves its parameters out)."""

    def __init__(self, function, module: torch.nn.Module):
        super().__init__()
        self.function, self.module = function, module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.function(x)


def test_config_is_read_into_fields(gemma3_checkpoint):
    _, path, _ = gemma3_checkpoint
    cfg = read_config(path)
    expect = dict(family="gemma3", mlp="geglu", norm="rmsnorm", norm_unit_offset=True, scale_embeddings=True,
                  sandwich_norms=True, qk_norm=True, head_dim=32, kv_heads=2, attention_scores_scalar=24,
                  rope_theta=10000.0, rope_local_theta=100.0, rope_scaling=None, layer_windows=(5, None, 5, None),
                  tie_weights=True, qkv_bias=False, o_bias=False, mlp_bias=False)
    assert {k: getattr(cfg, k) for k in expect} == expect
    assert [cfg.local_rope(i) for i in range(4)] == [True, False, True, False]


def test_module_names_are_gemma3s(gemma3_checkpoint):
    """The four norms: ours keep Llama's post_attention_layernorm as the MLP's input norm, which Gemma 3 calls
    pre_feedforward_layernorm; its post_attention_layernorm normalises the attention output (our attn_output_norm)."""
    _, path, ref = gemma3_checkpoint
    ours = load_model(path)
    hf = ours.cfg.hf
    names = {hf.to_hf(n) for n, _ in ours.named_parameters()}
    assert names == {n for n, _ in ref.named_parameters()}
    assert hf.to_hf("layers.1.post_attention_layernorm") == "model.layers.1.pre_feedforward_layernorm"
    assert hf.from_hf("model.layers.1.post_attention_layernorm.weight") == "layers.1.attn_output_norm.weight"


def test_old_spelling_and_linear_rope_scaling_on_the_global_layers(gemma3_checkpoint, tmp_path):
    """A transformers 4.x config.json (rope_theta, rope_local_base_freq, rope_scaling: what the hub's Gemma 3 files
    say; the 4B+ checkpoints scale the global layers' RoPE linearly by 8): transformers 5 reads the scaling into the
    full-attention layers only, and so do we."""
    _, path, base = gemma3_checkpoint
    config = json.loads((path / "config.json").read_text())
    config.pop("rope_parameters")
    config.pop("layer_types")
    config.update(rope_theta=10000.0, rope_local_base_freq=100.0, rope_scaling={"rope_type": "linear", "factor": 8.0})
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "model.safetensors").symlink_to(path / "model.safetensors")
    ref = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    ours = load_model(tmp_path).eval()
    assert ours.cfg.rope_scaling == {"type": "linear", "factor": 8.0} and ours.cfg.rope_local_theta == 100.0
    x = ids(11, (2, 14))
    with torch.no_grad():
        want = ref(x).logits
        assert torch.allclose(ours(x), want, atol=1e-4, rtol=0)
        assert (ref(x).logits - base(x).logits).abs().max() > 1e-3  # the scaling changed something
    save_hf(ours, tmp_path / "out")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "out").eval()
    with torch.no_grad():
        assert torch.allclose(back(x).logits, want, atol=1e-5, rtol=0)


def test_layer_types_and_the_default_pattern(tmp_path):
    """layer_types wins over sliding_window_pattern; without either, every sixth layer is global."""
    config = gemma3(num_hidden_layers=7).config.to_dict()
    config.pop("layer_types")
    config.pop("sliding_window_pattern")
    config.pop("_sliding_window_pattern", None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_config(tmp_path).layer_windows == (5, 5, 5, 5, 5, None, 5)
    config["layer_types"] = ["full_attention"] * 6 + ["sliding_attention"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    assert read_config(tmp_path).layer_windows == (None,) * 6 + (5,)


@pytest.mark.parametrize("changes, words", [
    ({"attn_logit_softcapping": -1.0}, "attn_logit_softcapping is -1.0; expected a positive number or null"),
    ({"use_bidirectional_attention": True}, "use_bidirectional_attention is true"),
    ({"hidden_activation": "silu"}, "hidden_activation 'silu' is not supported; expected 'gelu_pytorch_tanh'"),
    ({"rope_parameters": {"full_attention": {"rope_type": "default", "rope_theta": 1e6},
                          "sliding_attention": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}}},
     "rope_parameters.sliding_attention.rope_type 'linear' is not implemented"),
])
def test_what_is_not_implemented_is_refused_with_the_key(tmp_path, changes, words):
    config = {**gemma3(num_hidden_layers=2).config.to_dict(), **changes}
    (tmp_path / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
    with pytest.raises(UserError) as err:
        read_config(tmp_path)
    assert any(m.startswith(f"{tmp_path / 'config.json'}: ") and words in m for m in err.value.messages), \
        err.value.messages


@pytest.mark.parametrize("name, total", [("gemma-3-1b", 999_885_952), ("gemma-3-270m", 268_098_176)])
def test_presets_count_what_transformers_builds(name, total):
    """Hand count, 1B: embeddings 262,144 x 1,152 = 301,989,888; per layer q / o 1,152 x 1,024 each, k / v 1,152 x
    256 each, q / k norms 256 each, MLP 3 x 1,152 x 6,912, four norms of 1,152: 26,842,112, x 26 = 697,894,912; final
    norm 1,152: 999,885,952 (the card's "1B"). 270M: 167,772,160 + 18 x 5,573,632 + 640 = 268,098,176."""
    cfg = PRESETS[name]
    hub = dict(vocab_size=262144, max_position_embeddings=32768, hidden_size=cfg.emb_dim, num_hidden_layers=cfg.n_layers,
               intermediate_size=cfg.hidden_dim, num_attention_heads=4, num_key_value_heads=1, head_dim=256,
               query_pre_attn_scalar=256, sliding_window=512, rope_theta=1000000.0, rope_local_base_freq=10000.0,
               sliding_window_pattern=6)
    with torch.device("meta"):
        ref = transformers.Gemma3ForCausalLM(transformers.Gemma3TextConfig(**hub))
    assert count_params(cfg) == sum(p.numel() for p in ref.parameters()) == total
    from pipeline.model.config import from_hf_config
    assert from_hf_config({"architectures": ["Gemma3ForCausalLM"], **ref.config.to_dict()}) == cfg


def test_a_fresh_model_is_the_identity_norms_of_transformers_init():
    """Our init writes the 0-centred norm weights as zeros (scale 1), as Gemma3PreTrainedModel._init_weights does."""
    from pipeline.model.gpt import GPTModel

    model = GPTModel(PRESETS["gemma-3-270m"].replace(n_layers=1, vocab_size=64, layer_windows=(512,)), seed=0)
    norms = [p for n, p in model.named_parameters() if n.endswith("norm.weight")]
    assert len(norms) == 1 * 6 + 1 and all(torch.equal(p, torch.zeros_like(p)) for p in norms)


def test_expand_refuses_gemma3_with_what_it_expands(gemma3_checkpoint):
    from pipeline.model.expand import checkpoint_family

    _, path, _ = gemma3_checkpoint
    with pytest.raises(UserError, match="Gemma3ForCausalLM is not expanded .* it expands .*LlamaForCausalLM"):
        checkpoint_family(json.loads((path / "config.json").read_text()), path)
