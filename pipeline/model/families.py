"""Model families as data: Hugging Face architectures, module-name maps and config.json translation.

Torch-free (`plan` and the recipe checks import it). Our decoder (pipeline.model.gpt) has one module
tree whose names follow Llama's HF names, the layout most families share:

    embed_tokens, pos_embed (learned positions only)
    layers.{i}.input_layernorm
    layers.{i}.self_attn.{qkv_proj | q_proj, k_proj, v_proj}, .o_proj, .q_norm, .k_norm (Qwen3)
    layers.{i}.post_attention_layernorm (OLMo 2: the attention branch's output norm; no input_layernorm)
    layers.{i}.post_feedforward_layernorm (OLMo 2: the MLP branch's output norm)
    layers.{i}.attn_output_norm, .mlp_output_norm (sandwich_norms: each branch's output normed before its add, Gemma 2
        / 3's post_attention_layernorm / post_feedforward_layernorm, GLM-4-0414's post_self_attn_layernorm /
        post_mlp_layernorm)
    layers.{i}.mlp.{gate_proj (SwiGLU), up_proj | gate_up_proj (Phi-3's and GLM's fused SwiGLU), down_proj}
    layers.{i}.mlp.gate, .experts.{e}.{gate_proj, up_proj, down_proj} (a sparse MoE block: Qwen3-MoE, Mixtral)
    layers.{i}.mlp.shared_expert.{gate_proj, up_proj, down_proj}, .shared_expert_gate (Qwen2-MoE's shared expert)
    norm, lm_head

A family maps those names to its HF names the way torchtune's convert_weights.py does: a table of
templates (`{i}` is the block index, `{e}` an expert's), read in both directions, plus the modules whose HF weight is a
Conv1D (GPT-2 stores in x out, the transpose of nn.Linear). LoRA targets, additional_target, PEFT
adapters and exports all speak the family's HF names; only the model itself uses ours.

A checkpoint that wraps one of these decoders with other towers (Gemma3ForConditionalGeneration: a vision tower and a
projector around Gemma 3's) is a Wrapper row: its decoder trains, ModelConfig.wrapper names the row, and
ModelConfig.hf is the family in the wrapper's names (its prefix, the other spellings, the towers carried).
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

from pipeline.errors import UserError, article
from pipeline.model.quant_layout import stored_quantization


@dataclass(frozen=True)
class Family:
    """One HF architecture: its names, and which config.json keys mean what."""

    name: str                      # our family name, stored in ModelConfig.family
    architecture: str              # config.json "architectures"[0]
    reward_architecture: str       # the same decoder with transformers' `score` head (num_labels 1): stage rm
    model_type: str                # config.json "model_type"
    prefix: str                    # HF prefix of every module but the heads lm_head / score ("transformer." / "model.")
    modules: tuple[tuple[str, str], ...] = ()  # (ours, HF without prefix) templates; empty = same names
    conv1d: frozenset[str] = frozenset()       # our leaf module names whose HF weight is transposed
    skip: tuple[str, ...] = ()     # HF tensor-name endings that are buffers, not weights (ignored on load)
    # the HF class's modules that hold no weights (HF without prefix, "{i}" a block's index), beyond an MLP's act_fn
    # beside its gate_proj and the rotary_emb, which peft_moe_targets.transformers_names adds itself: GPT-2's dropouts
    # and activation, Phi-3's and GLM's fused MLP's activation_fn, Phi-3's residual dropouts; a PEFT target_modules
    # string can match them (PEFT raises on them). tests/model/test_peft_dense_targets.py holds each dense family's
    # named_modules() to it
    weightless: tuple[str, ...] = ()
    # config.json keys a checkpoint may leave out, with the value transformers' config class then takes, where
    # that is not Llama's (LlamaConfig: head_dim = hidden_size / heads, max_position_embeddings 2048)
    config_defaults: tuple[tuple[str, Any], ...] = ()
    # the HF class's sliding-window attention (read into ModelConfig.layer_windows by layer_windows): "layers" where
    # use_sliding_window picks layers (sliding_window, max_window_layers, layer_types: Qwen2 / Qwen3), "every" where a
    # non-null sliding_window applies to every layer (Mistral, Mixtral), "flag" where use_sliding_window with a
    # sliding_window windows every layer (Qwen3-MoE), "layers_even" as "layers" but without layer_types the
    # even-indexed layers below max_window_layers (Qwen2-MoE), "" none (GPT-2; LlamaForCausalLM ignores those keys)
    sliding_window: str = ""
    # the config.json bias switches the HF class reads (MistralAttention and MistralMLP have no biases at all)
    bias_keys: tuple[str, ...] = ("attention_bias", "mlp_bias")
    qk_norm: bool = False          # per-head q / k RMSNorm (Qwen3Attention, Qwen3MoeAttention)
    # sparse MoE blocks (Qwen3MoeSparseMoeBlock, MixtralSparseMoeBlock, Qwen2MoeSparseMoeBlock): which config.json
    # keys say what (MoeKeys; read by moe_fields, written by moe_config); None: a dense family
    moe: "MoeKeys | None" = None
    # one q|k|v Linear: GPT-2's c_attn, Phi3Attention's qkv_proj (GQA sizes)
    qkv_fused: bool = False
    # one gate|up Linear (gate_up_proj, the gate's rows first): Phi3MLP, GlmMLP, Glm4MLP
    mlp_fused: bool = False
    # attention_bias also biases o_proj (LlamaAttention); False where it biases q / k / v only (GlmAttention)
    o_proj_bias: bool = True
    # RoPE rotates pairs of adjacent dims (2j, 2j+1) by frequency j, cos / sin repeat_interleave'd: GLM's
    # apply_rotary_pos_emb / rotate_half (x[..., 0::2], x[..., 1::2]); else the two halves (Llama's rotate_half)
    rope_interleaved: bool = False
    # an RMSNorm on the attention's and the MLP's outputs before each residual add, four norms per block
    # (ModelConfig.sandwich_norms: Gemma2DecoderLayer / Gemma3DecoderLayer, Glm4DecoderLayer)
    sandwich_norms: bool = False
    # the head's first partial_rotary_factor of dims rotated, the rest passed (Phi3RotaryEmbedding reads the key)
    partial_rotary: bool = False
    # the rope types the class accepts (config.json's rope_type); Phi3Config.validate_rope allows default / longrope
    rope_types: tuple[str, ...] = ()
    # Gemma's generation (0: not Gemma). Every Gemma: RMSNorm x (1 + w), scaled embeddings, GeGLU; 3 adds four norms a
    # block, query_pre_attn_scalar and a RoPE per layer type. gemma_fields reads its keys, gemma_config writes them
    gemma: int = 0
    # GraniteConfig's embedding_multiplier, attention_multiplier, residual_multiplier and logits_scaling (read into
    # the ModelConfig fields of those names, written back); other classes have none of them
    multipliers: bool = False
    # Olmo2DecoderLayer's norms after each branch (ModelConfig.post_norm) and Olmo2Attention's q / k norms over the
    # whole projection (ModelConfig.qk_norm_projection; with qk_norm)
    post_norm: bool = False
    qk_norm_projection: bool = False
    # the config class's default bos / eos / pad ids are rows of its own vocabulary (Phi3Config's pad 32000,
    # Olmo2Config's eos 50279), no row of a smaller one: the export writes null for an id not given
    null_special_ids: bool = False
    # a wrapped checkpoint's decoder (Wrapper.family_of): other writers' prefixes for the decoder's tensors, read as
    # `prefix` / the head (old -> new, transformers' conversion_mapping), and the tensor prefixes of the wrapper's
    # other towers, which are not ours: read past on load, copied unchanged into an export; both empty for a causal LM
    aliases: tuple[tuple[str, str], ...] = ()
    carried: tuple[str, ...] = ()
    # GptOssAttention's sinks: a learned logit per head in each softmax's denominator (ModelConfig.attention_sinks)
    attention_sinks: bool = False
    # GptOssRMSNorm: (weight * x_normed in fp32).to(dtype), the weight applied before the cast (ModelConfig.norm_scale_fp32)
    norm_scale_fp32: bool = False
    # the config.json key switching the per-head q / k norms where the class reads one (Glm4MoeConfig's use_qk_norm;
    # qk_norm then comes from it, not from the flag above)
    qk_norm_key: str = ""
    # the hub's files hold multi-token-prediction layers after the last block (model.layers.{num_hidden_layers}...),
    # which the class ignores on load: read past, not exported (Glm4MoeForCausalLM)
    mtp_layers: bool = False
    # DeepSeek-V3's multi-head latent attention (ModelConfig.kv_lora_rank ...: latent_fields reads its keys)
    latent_attention: bool = False
    # the tensors transformers holds in fp32 in a bf16 / fp16 model (PreTrainedModel._get_dtype_plan, transformers 5.24
    # modeling_utils.py:3844-3858): the class's _keep_in_fp32_modules_strict in both (fp32_strict), its
    # _keep_in_fp32_modules in fp16 only (fp32_in_fp16); patterns as there, searched in the HF tensor name with "." any
    # character (core_model_loading.py:1880-1922, build_glob_alternation). Read through held_fp32 by every load and cast
    # of ours (pipeline.model.gpt.held_dtype); the export writes every tensor in export_dtype, as LLaMA-Factory's
    # model.to(output_dtype) does (train/tuner.py:208)
    fp32_strict: tuple[str, ...] = ()
    fp32_in_fp16: tuple[str, ...] = ()
    _compiled: list[tuple[re.Pattern, str, re.Pattern, str]] = field(default_factory=list, init=False, compare=False,
                                                                    repr=False)
    # held_fp32's patterns per dtype name, compiled once here (every tensor of every load and cast asks): bfloat16
    # fp32_strict, float16 both lists; a dtype without any is absent
    _fp32: dict[str, re.Pattern] = field(default_factory=dict, init=False, compare=False, repr=False)

    def __post_init__(self) -> None:
        for ours, hf in self.modules:
            self._compiled.append((_template(ours), hf, _template(hf), ours))
        for kind, patterns in (("bfloat16", self.fp32_strict), ("float16", (*self.fp32_strict, *self.fp32_in_fp16))):
            if patterns:
                self._fp32[kind] = re.compile("|".join(p.replace("*", ".*") for p in patterns))

    def structure(self) -> dict[str, Any]:
        """The ModelConfig fields this HF class fixes whatever its config.json says (how its modules are laid out and
        wired), from the flags above: one source for decoder_fields (every config read), the presets
        (config._swiglu) and check_exportable (what the class can express)."""
        return dict(qk_norm=self.qk_norm, qk_norm_projection=self.qk_norm_projection, qkv_fused=self.qkv_fused,
                    mlp_fused=self.mlp_fused, rope_interleaved=self.rope_interleaved,
                    sandwich_norms=self.sandwich_norms, post_norm=self.post_norm,
                    norm_unit_offset=bool(self.gemma), scale_embeddings=bool(self.gemma),
                    attention_sinks=self.attention_sinks, router_bias=bool(self.moe and self.moe.router_bias),
                    norm_scale_fp32=self.norm_scale_fp32)

    def held_fp32(self, hf_name: str, dtype: Any) -> bool:
        """Whether transformers' from_pretrained(dtype=dtype) holds the tensor `hf_name` (an HF name) in fp32 rather
        than in `dtype` (a torch dtype or its name: float16 / bfloat16 keep fp32_strict, float16 fp32_in_fp16 too)."""
        pattern = self._fp32.get(str(dtype).removeprefix("torch."))
        return pattern is not None and pattern.search(hf_name) is not None

    # -- module paths ------------------------------------------------------------------------
    def to_hf(self, ours: str) -> str:
        """Our module or parameter path -> the full HF path (prefix included)."""
        if _is_head(ours):
            return ours
        return self.prefix + _rename(ours, [(p, out) for p, out, _, _ in self._compiled])

    def from_hf(self, hf: str) -> str:
        """A full or prefix-less HF path -> ours (unknown names come back unchanged after the prefix)."""
        hf = self.canonical(hf)
        if _is_head(hf):
            return hf
        return _rename(self.strip(hf), [(p, out) for _, _, p, out in self._compiled])

    def alias_of(self, hf: str) -> tuple[str, str] | None:
        """The (old, new) alias a tensor name is spelled in, None where it is the module tree's already (the decoder's
        prefix, a carried tower's or the head: Qwen2-VL's old prefix "model." is also the start of those)."""
        if not self.aliases or hf.startswith((self.prefix, *self.carried)) or _is_head(hf):
            return None
        return next((pair for pair in self.aliases if hf.startswith(pair[0])), None)

    def canonical(self, hf: str) -> str:
        """A tensor name as transformers 5's module tree has it: an alias prefix (a wrapped checkpoint's file
        names, e.g. language_model.model.) replaced by the one it stands for."""
        old = self.alias_of(hf)
        return old[1] + hf[len(old[0]):] if old else hf

    def is_carried(self, hf: str) -> bool:
        """Whether a checkpoint tensor belongs to a wrapper's other tower (not to the decoder): carried, not read."""
        return self.canonical(hf).startswith(self.carried) if self.carried else False

    def is_mtp(self, ours: str, n_layers: int) -> bool:
        """Whether a tensor (our name) belongs to a multi-token-prediction layer after the last block (mtp_layers)."""
        m = re.match(r"layers\.(\d+)\.", ours) if self.mtp_layers else None
        return bool(m) and int(m.group(1)) >= n_layers

    def strip(self, hf: str) -> str:
        return hf[len(self.prefix):] if hf.startswith(self.prefix) else hf

    def is_conv1d(self, ours_param: str) -> bool:
        """Whether this parameter of ours is stored transposed by HF (a Conv1D weight)."""
        module, _, leaf = ours_param.rpartition(".")
        return leaf == "weight" and module.rsplit(".", 1)[-1] in self.conv1d


@dataclass(frozen=True)
class MoeKeys:
    """How a MoE family's config.json describes its sparse blocks (the keys each transformers config class reads)."""

    experts_key: str                  # the expert count's key (transformers 5's attribute_map takes the other spelling)
    expert_width_key: str             # each expert's intermediate width (Mixtral: intermediate_size, no dense MLP)
    defaults: tuple[tuple[str, Any], ...]  # the config class's defaults for absent keys
    # the config.json key saying whether the top-k weights are renormalised to sum 1; "" where they always are
    # (MixtralTopKRouter divides by their sum unconditionally)
    renormalise_key: str = "norm_topk_prob"
    # the top-k weights stay fp32 into the product with the experts' outputs (MixtralTopKRouter, modeling_mixtral.py:
    # 106-110 in transformers 5.24: no cast back), where Qwen2 / Qwen3-MoE's routers cast them to the logits' dtype
    # (modeling_qwen2_moe.py:327, modeling_qwen3_moe.py:266): ModelConfig.router_weights_fp32
    router_weights_fp32: bool = False
    sparse_layers: bool = True        # decoder_sparse_step / mlp_only_layers pick the sparse blocks (else every block)
    shared_expert: bool = False       # Qwen2MoeSparseMoeBlock's shared expert and its sigmoid gate
    # the MLP Linears that are Linears in transformers 5 (the shared expert, shared_expert_gate, a dense block's MLP)
    # take LoRA, as LLaMA-Factory's lora_target: all adapts them; the experts and the router never do
    # (pipeline.model.config.moe_blocked; measured with PEFT 0.21 on Qwen2MoeForCausalLM)
    lora_mlp: bool = False
    # GptOssMLP: a router Linear with a bias (GptOssTopKRouter), each expert's Linears biased, the clamped SwiGLU
    # (config.json's swiglu_alpha / swiglu_limit), and the experts stored fused: mlp.experts.gate_up_proj (E, H, 2I:
    # gate and up columns interleaved), down_proj (E, I, H) and their biases (pipeline.model.weights splits and
    # fuses them)
    router_bias: bool = False
    fused_experts: bool = False
    # moe_aux_loss_coef trains the router's load-balancing loss (transformers' load_balancing_loss_func): false where
    # LLaMA-Factory 0.9.5's configure_moe sets no output_router_logits for the model type (gpt_oss) or the model
    # computes none (DeepSeek-V3 routing: the correction bias balances; glm4_moe, deepseek_v3)
    router_loss: bool = True
    # DeepSeek-V3's MoE keys (Glm4MoeConfig): the first first_k_dense_replace blocks dense (read into mlp_only_layers),
    # n_shared_experts shared experts of the experts' width added ungated (one shared_expert of their summed width),
    # the sigmoid router with its e_score_correction_bias, n_group / topk_group and routed_scaling_factor; no
    # load-balancing loss (the model computes none: router_loss False)
    deepseek: bool = False
    # lora_target may name the experts' Linears (gate_proj / up_proj / down_proj; Mixtral's w1 / w3 / w2) and the
    # router (gate): trained as PEFT 0.21 trains them on transformers 5's fused expert tensors and the router's weight
    # (target_parameters: pipeline.model.expert_lora), where the model
    # type's conversion maps them (transformers' qwen2_moe / mixtral patterns) and PEFT loads the adapter back
    # with our logits (tests/model/test_moe_expert_lora.py)
    expert_lora: bool = False


HEADS = ("lm_head", "score")  # top-level in every HF class (XForCausalLM / XForSequenceClassification): no prefix


def _is_head(path: str) -> bool:
    return path in HEADS or path.startswith(tuple(h + "." for h in HEADS))


def _template(text: str) -> re.Pattern:
    body = re.escape(text).replace(r"\{i\}", r"(?P<i>\d+)").replace(r"\{e\}", r"(?P<e>\d+)")
    return re.compile("^" + body + r"(?P<rest>(\..*)?)$")


def _rename(path: str, table: list[tuple[re.Pattern, str]]) -> str:
    """Longest matching template wins (a block's own path before the block's children)."""
    best: tuple[int, str] | None = None
    for pattern, out in table:
        m = pattern.match(path)
        if m:
            used = len(path) - len(m.group("rest"))
            if best is None or used > best[0]:
                groups = m.groupdict()
                best = (used, out.replace("{i}", groups.get("i") or "").replace("{e}", groups.get("e") or "")
                        + m.group("rest"))
    return best[1] if best else path


GPT2 = Family(
    name="gpt2", architecture="GPT2LMHeadModel", reward_architecture="GPT2ForSequenceClassification", model_type="gpt2", prefix="transformer.",
    modules=(("embed_tokens", "wte"), ("pos_embed", "wpe"), ("layers", "h"), ("layers.{i}", "h.{i}"),
             ("layers.{i}.input_layernorm", "h.{i}.ln_1"), ("layers.{i}.self_attn", "h.{i}.attn"),
             ("layers.{i}.self_attn.qkv_proj", "h.{i}.attn.c_attn"), ("layers.{i}.self_attn.o_proj", "h.{i}.attn.c_proj"),
             ("layers.{i}.post_attention_layernorm", "h.{i}.ln_2"), ("layers.{i}.mlp", "h.{i}.mlp"),
             ("layers.{i}.mlp.up_proj", "h.{i}.mlp.c_fc"), ("layers.{i}.mlp.down_proj", "h.{i}.mlp.c_proj"),
             ("norm", "ln_f")),
    conv1d=frozenset({"qkv_proj", "o_proj", "up_proj", "down_proj"}),
    skip=(".attn.bias", ".attn.masked_bias"), qkv_fused=True,
    weightless=("drop", "h.{i}.attn.attn_dropout", "h.{i}.attn.resid_dropout", "h.{i}.mlp.act", "h.{i}.mlp.dropout"),
)
LLAMA = Family(name="llama", architecture="LlamaForCausalLM", reward_architecture="LlamaForSequenceClassification", model_type="llama", prefix="model.",
               skip=(".rotary_emb.inv_freq",))
_QWEN_WINDOW = (("sliding_window", 4096), ("max_window_layers", 28))  # Qwen2Config / Qwen3Config's defaults
QWEN2 = Family(name="qwen2", architecture="Qwen2ForCausalLM", reward_architecture="Qwen2ForSequenceClassification",
               model_type="qwen2", prefix="model.",
               skip=(".rotary_emb.inv_freq",), config_defaults=(("max_position_embeddings", 32768), *_QWEN_WINDOW),
               sliding_window="layers")
QWEN3 = Family(name="qwen3", architecture="Qwen3ForCausalLM", reward_architecture="Qwen3ForSequenceClassification",
               model_type="qwen3", prefix="model.",
               skip=(".rotary_emb.inv_freq",),
               config_defaults=(("max_position_embeddings", 32768), ("head_dim", 128), *_QWEN_WINDOW),
               sliding_window="layers", qk_norm=True)
# Mistral-7B v0.1 / v0.2 / v0.3: Llama's modules without any bias; MistralConfig's defaults 131,072 positions and a
# 4,096 window in every layer (v0.1's config.json says 4096, v0.2+ null)
MISTRAL = Family(name="mistral", architecture="MistralForCausalLM",
                 reward_architecture="MistralForSequenceClassification", model_type="mistral", prefix="model.",
                 skip=(".rotary_emb.inv_freq",),
                 config_defaults=(("max_position_embeddings", 131072), ("sliding_window", 4096)),
                 sliding_window="every", bias_keys=())
# Qwen3MoeConfig's defaults (transformers 5.24, configuration_qwen3_moe.py): config.json key -> value
MOE_DEFAULTS: dict[str, Any] = {"num_experts": 128, "num_experts_per_tok": 8, "moe_intermediate_size": 768,
                                "norm_topk_prob": False, "decoder_sparse_step": 1, "mlp_only_layers": [],
                                "router_aux_loss_coef": 0.001}


# Qwen3-30B-A3B, Qwen3-235B-A22B, Qwen3-Coder-30B-A3B: Qwen3's attention (q/k norms, attention_bias on all four
# projections) with sparse MoE MLP blocks. The hub (and transformers 5's save_pretrained) stores each expert as
# mlp.experts.{e}.gate_proj / up_proj / down_proj and the router as mlp.gate: our module names, so no map. No
# head_dim default (Qwen3MoeAttention: hidden_size / heads); Qwen3MoeConfig's defaults for the MoE keys (MOE_DEFAULTS).
# Its use_sliding_window windows every layer (no max_window_layers / layer_types): "flag".
QWEN3_MOE = Family(name="qwen3_moe", architecture="Qwen3MoeForCausalLM",
                   reward_architecture="Qwen3MoeForSequenceClassification", model_type="qwen3_moe", prefix="model.",
                   skip=(".rotary_emb.inv_freq",),
                   config_defaults=(("max_position_embeddings", 32768), ("intermediate_size", 6144),
                                    ("sliding_window", 4096)),
                   sliding_window="flag", qk_norm=True, bias_keys=("attention_bias",),
                   moe=MoeKeys("num_experts", "moe_intermediate_size", defaults=tuple(MOE_DEFAULTS.items()),
                               expert_lora=True))
# Mixtral-8x7B / 8x22B (v0.1, Instruct): Mistral's attention (no biases, GQA, sliding_window in every layer when
# set) with a sparse block in every layer: 8 experts of width intermediate_size, top-2 weights always renormalised
# (MixtralTopKRouter). The hub (and transformers 5's save_pretrained: conversion_mapping.py's "mixtral" entry,
# reversed) stores the block as block_sparse_moe, each expert's w1 (gate), w3 (up), w2 (down). MixtralConfig's
# defaults: rope theta 1e6 (default_theta), 131,072 positions, no window, 8 kv heads, rms_norm_eps 1e-5.
MIXTRAL = Family(name="mixtral", architecture="MixtralForCausalLM",
                 reward_architecture="MixtralForSequenceClassification", model_type="mixtral", prefix="model.",
                 modules=(("layers.{i}.mlp", "layers.{i}.block_sparse_moe"),
                          ("layers.{i}.mlp.experts.{e}.gate_proj", "layers.{i}.block_sparse_moe.experts.{e}.w1"),
                          ("layers.{i}.mlp.experts.{e}.up_proj", "layers.{i}.block_sparse_moe.experts.{e}.w3"),
                          ("layers.{i}.mlp.experts.{e}.down_proj", "layers.{i}.block_sparse_moe.experts.{e}.w2")),
                 skip=(".rotary_emb.inv_freq",),
                 config_defaults=(("max_position_embeddings", 131072), ("sliding_window", None),
                                  ("rope_theta", 1000000.0), ("num_key_value_heads", 8), ("rms_norm_eps", 1e-5),
                                  ("intermediate_size", 14336)),
                 sliding_window="every", bias_keys=(),
                 moe=MoeKeys("num_local_experts", "intermediate_size", renormalise_key="", sparse_layers=False,
                             router_weights_fp32=True, expert_lora=True,
                             defaults=(("num_local_experts", 8), ("num_experts_per_tok", 2),
                                       ("router_aux_loss_coef", 0.001))))
# Qwen1.5-MoE-A2.7B, Qwen2-57B-A14B: Qwen2's attention (q/k/v biases: qkv_bias, true where absent) with sparse blocks
# that add a shared expert (a SwiGLU of shared_expert_intermediate_size) to every token's output, gated by
# sigmoid(shared_expert_gate(x)); norm_topk_prob false in the released configs. Module names as ours. Its
# use_sliding_window windows layer_types' layers, else the even-indexed ones below max_window_layers
# (Qwen2MoeConfig.__post_init__): "layers_even". Qwen2MoeConfig's defaults (16 kv heads, a dense MLP of 5632).
QWEN2_MOE = Family(name="qwen2_moe", architecture="Qwen2MoeForCausalLM",
                   reward_architecture="Qwen2MoeForSequenceClassification", model_type="qwen2_moe", prefix="model.",
                   skip=(".rotary_emb.inv_freq",),
                   config_defaults=(("max_position_embeddings", 32768), ("intermediate_size", 5632),
                                    ("num_key_value_heads", 16), *_QWEN_WINDOW),
                   sliding_window="layers_even", bias_keys=("qkv_bias",),
                   moe=MoeKeys("num_experts", "moe_intermediate_size", shared_expert=True, lora_mlp=True,
                               defaults=(("num_experts", 60), ("num_experts_per_tok", 4),
                                         ("moe_intermediate_size", 1408), ("shared_expert_intermediate_size", 5632),
                                         ("norm_topk_prob", False), ("decoder_sparse_step", 1),
                                         ("mlp_only_layers", []), ("router_aux_loss_coef", 0.001))))
# microsoft/phi-4, Phi-4-mini-instruct, Phi-3.5-mini-instruct, Phi-3-mini-4k / 128k-instruct: Llama's block with one
# fused qkv_proj (q | k | v rows, GQA sizes) and one fused gate_up_proj (gate rows, then up), no bias anywhere (the
# hub's names are ours: no map); Phi3Config's defaults (4,096 positions, rms_norm_eps 1e-5, sliding_window null: a
# non-null one windows every layer, Phi3Model's create_sliding_window_causal_mask); partial_rotary_factor (Phi-4-mini
# 0.75); rope default or longrope (Phi3Config.convert_rope_params_to_dict reads "su" and "yarn" as longrope)
PHI3 = Family(name="phi3", architecture="Phi3ForCausalLM", reward_architecture="Phi3ForSequenceClassification",
              model_type="phi3", prefix="model.", skip=(".rotary_emb.inv_freq",),
              config_defaults=(("max_position_embeddings", 4096), ("rms_norm_eps", 1e-5),
                               ("original_max_position_embeddings", 4096)),
              sliding_window="every", bias_keys=(), qkv_fused=True, mlp_fused=True, partial_rotary=True,
              rope_types=("default", "longrope"), null_special_ids=True,
              weightless=("layers.{i}.mlp.activation_fn", "layers.{i}.resid_attn_dropout",
                          "layers.{i}.resid_mlp_dropout"))
# Gemma 3's text-only checkpoints (gemma-3-1b, gemma-3-270m): Gemma3TextConfig's defaults for absent keys
# (transformers 5.24, configuration_gemma3.py:73-95). Its post_attention_layernorm normalises the attention output
# and pre_feedforward_layernorm is the MLP's input norm (ours: post_attention_layernorm, Llama's place for it).
# Sliding windows: layer_types, else every layer but each sliding_window_pattern-th ("pattern").
_SANDWICH = (("layers.{i}.post_attention_layernorm", "layers.{i}.pre_feedforward_layernorm"),
             ("layers.{i}.attn_output_norm", "layers.{i}.post_attention_layernorm"),
             ("layers.{i}.mlp_output_norm", "layers.{i}.post_feedforward_layernorm"))
GEMMA3 = Family(name="gemma3", architecture="Gemma3ForCausalLM",
                reward_architecture="Gemma3TextForSequenceClassification", model_type="gemma3_text", prefix="model.",
                modules=_SANDWICH,
                skip=(".rotary_emb.inv_freq", ".embed_scale"),
                config_defaults=(("max_position_embeddings", 131072), ("head_dim", 256), ("num_key_value_heads", 4),
                                 ("sliding_window", 4096), ("tie_word_embeddings", True),
                                 ("query_pre_attn_scalar", 256), ("hidden_activation", "gelu_pytorch_tanh")),
                sliding_window="pattern", bias_keys=("attention_bias",), qk_norm=True, sandwich_norms=True, gemma=3)
# Gemma 1 (gemma-2b / 7b, CodeGemma, ...): Llama's block with Gemma's norms, embedding scale and GeGLU (its hidden_act;
# the releases' "gelu" is read as the tanh form, GemmaConfig.__post_init__, configuration_gemma.py:87-94); GemmaConfig's
# defaults (:63-85): head_dim 256, 16 key/value heads, 8,192 positions, tied
GEMMA = Family(name="gemma", architecture="GemmaForCausalLM", reward_architecture="GemmaForSequenceClassification",
               model_type="gemma", prefix="model.", skip=(".rotary_emb.inv_freq", ".embed_scale"),
               config_defaults=(("max_position_embeddings", 8192), ("head_dim", 256), ("num_key_value_heads", 16),
                                ("tie_word_embeddings", True), ("hidden_act", "gelu_pytorch_tanh")),
               bias_keys=("attention_bias",), gemma=1)
# Gemma 2 (gemma-2-2b / 9b / 27b): Gemma 3's block without q/k norms, one RoPE, tanh softcapping of the attention
# scores (50) and the logits (30); a window in every other layer (layer_types, else alternating: Gemma2Config.
# __post_init__, configuration_gemma2.py:92-97, which reads no sliding_window_pattern); Gemma2Config's defaults (:67-90)
GEMMA2 = Family(name="gemma2", architecture="Gemma2ForCausalLM", reward_architecture="Gemma2ForSequenceClassification",
                model_type="gemma2", prefix="model.", modules=_SANDWICH, skip=(".rotary_emb.inv_freq", ".embed_scale"),
                config_defaults=(("max_position_embeddings", 8192), ("head_dim", 256), ("num_key_value_heads", 4),
                                 ("sliding_window", 4096), ("tie_word_embeddings", True),
                                 ("query_pre_attn_scalar", 256), ("hidden_activation", "gelu_pytorch_tanh"),
                                 ("attn_logit_softcapping", 50.0), ("final_logit_softcapping", 30.0)),
                sliding_window="pattern", bias_keys=("attention_bias",), sandwich_norms=True, gemma=2)
# ibm-granite/granite-3.3-8b-instruct, granite-3.1-2b-instruct (GraniteForCausalLM): Llama's modules and names (biases
# where attention_bias / mlp_bias: o_proj's with q/k/v's) with four multipliers (GraniteConfig, modeling_granite.py):
# embeddings times embedding_multiplier (GraniteModel.forward), attention_multiplier as the score scale
# (GraniteAttention.scaling), each branch times residual_multiplier (GraniteDecoderLayer.forward), logits divided by
# logits_scaling (GraniteForCausalLM.forward). GraniteConfig's defaults are all 1.0 (attention_multiplier too, not
# 1 / sqrt(head_dim)). transformers 5.24 has no GraniteForSequenceClassification: stage rm cannot export one.
GRANITE = Family(name="granite", architecture="GraniteForCausalLM", reward_architecture="",
                 model_type="granite", prefix="model.", skip=(".rotary_emb.inv_freq",),
                 config_defaults=(("embedding_multiplier", 1.0), ("attention_multiplier", 1.0),
                                  ("residual_multiplier", 1.0), ("logits_scaling", 1.0)),
                 multipliers=True)
# allenai/OLMo-2-1124-7B(-Instruct), OLMo-2-0425-1B (Olmo2ForCausalLM): Llama's modules without input_layernorm, the
# norms after each branch (post_attention_layernorm on the attention's output, post_feedforward_layernorm on the
# MLP's: Olmo2DecoderLayer.forward), q_norm / k_norm over the whole q / k projection before the split into heads
# (Olmo2Attention: RMSNorm(num_attention_heads * head_dim), RMSNorm(num_key_value_heads * head_dim)), o_proj biased
# with q/k/v where attention_bias, no MLP bias; Olmo2Config's rms_norm_eps 1e-5.
OLMO2 = Family(name="olmo2", architecture="Olmo2ForCausalLM", reward_architecture="Olmo2ForSequenceClassification",
               model_type="olmo2", prefix="model.", skip=(".rotary_emb.inv_freq",),
               config_defaults=(("rms_norm_eps", 1e-5),), bias_keys=("attention_bias",), qk_norm=True,
               post_norm=True, qk_norm_projection=True, null_special_ids=True)
# THUDM / zai-org's GLM-4: Llama's block with q / k / v biases (attention_bias, true by default; none on o_proj), one
# fused gate_up_proj (the gate's rows first), no MLP bias, half of each head rotated (partial_rotary_factor 0.5 by
# default) in adjacent pairs (the interleaved rotation). The hub's names are ours (no map). GlmConfig / Glm4Config's
# defaults (transformers 5.24, configuration_glm4.py:55-79): head_dim 128, 131,072 positions, rms_norm_eps 1.5625e-7,
# 2 kv heads. Glm4ForCausalLM (GLM-4-9B-0414, GLM-4-32B-0414, GLM-Z1-*-0414) adds post_self_attn_layernorm and
# post_mlp_layernorm to each block (four norms); GlmForCausalLM (glm-4-9b-chat-hf) is the same model without them.
_GLM_DEFAULTS = (("max_position_embeddings", 131072), ("head_dim", 128), ("rms_norm_eps", 1.5625e-07),
                 ("num_key_value_heads", 2), ("attention_bias", True), ("partial_rotary_factor", 0.5))
_GLM_WEIGHTLESS = ("layers.{i}.mlp.activation_fn",)  # GlmMLP's, beside its fused gate_up_proj
GLM4 = Family(name="glm4", architecture="Glm4ForCausalLM", reward_architecture="Glm4ForSequenceClassification",
              model_type="glm4", prefix="model.", skip=(".rotary_emb.inv_freq",), config_defaults=_GLM_DEFAULTS,
              modules=(("layers.{i}.attn_output_norm", "layers.{i}.post_self_attn_layernorm"),
                       ("layers.{i}.mlp_output_norm", "layers.{i}.post_mlp_layernorm")),
              bias_keys=("attention_bias",), mlp_fused=True, o_proj_bias=False, partial_rotary=True,
              rope_interleaved=True, sandwich_norms=True, null_special_ids=True, weightless=_GLM_WEIGHTLESS)
GLM = Family(name="glm", architecture="GlmForCausalLM", reward_architecture="GlmForSequenceClassification",
             model_type="glm", prefix="model.", skip=(".rotary_emb.inv_freq",), config_defaults=_GLM_DEFAULTS,
             bias_keys=("attention_bias",), mlp_fused=True, o_proj_bias=False, partial_rotary=True,
             rope_interleaved=True, null_special_ids=True, weightless=_GLM_WEIGHTLESS)
GLM_FAMILIES = (GLM4, GLM)
# openai/gpt-oss-20b, gpt-oss-120b (GptOssForCausalLM, transformers 5.24 models/gpt_oss): Mixtral's sparse block in
# every layer with a biased router (mlp.router: ours mlp.gate), top-k then softmax over the chosen logits (the same
# weights as softmax, top-k, renormalised: norm_topk_prob), biased experts with the clamped SwiGLU stored fused
# (MoeKeys.fused_experts); q / k / v / o biases (attention_bias, true by default), a learned sink logit per head
# (self_attn.sinks, our name too), a 128-token window in every other layer (layer_types, else the even-indexed
# layers: GptOssConfig.__post_init__, configuration_gpt_oss.py:84-87), YaRN, untied. GptOssConfig's defaults
# (configuration_gpt_oss.py:51-77; theta 150,000 as default_theta, the YaRN dict of :89-97)
GPT_OSS = Family(name="gpt_oss", architecture="GptOssForCausalLM", reward_architecture="GptOssForSequenceClassification",
                 model_type="gpt_oss", prefix="model.", modules=(("layers.{i}.mlp.gate", "layers.{i}.mlp.router"),),
                 skip=(".rotary_emb.inv_freq",),
                 config_defaults=(("max_position_embeddings", 131072), ("head_dim", 64), ("num_key_value_heads", 8),
                                  ("sliding_window", 128), ("rms_norm_eps", 1e-5), ("attention_bias", True),
                                  ("intermediate_size", 2880), ("rope_theta", 150000.0),
                                  ("rope_parameters", {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0,
                                                       "beta_slow": 1.0, "truncate": False,
                                                       "original_max_position_embeddings": 4096})),
                 sliding_window="pattern", bias_keys=("attention_bias",), attention_sinks=True, norm_scale_fp32=True,
                 fp32_in_fp16=("post_attention_layernorm", "input_layernorm", "norm"),  # modeling_gpt_oss.py:390
                 moe=MoeKeys("num_local_experts", "intermediate_size", renormalise_key="", sparse_layers=False,
                             router_bias=True, fused_experts=True, router_loss=False,
                             defaults=(("num_local_experts", 128), ("num_experts_per_tok", 4),
                                       ("router_aux_loss_coef", 0.001), ("swiglu_alpha", 1.702),
                                       ("swiglu_limit", 7.0))))

# Glm4MoePreTrainedModel's and DeepseekV3PreTrainedModel's _keep_in_fp32_modules_strict (modeling_glm4_moe.py:460,
# modeling_deepseek_v3.py:551): the router's weight and correction bias stay fp32 in a bf16 / fp16 model
_ROUTER_FP32 = ("e_score_correction_bias", "gate.weight")
# zai-org/GLM-4.5, GLM-4.5-Air, GLM-4.6 (Glm4MoeForCausalLM, transformers 5.24 models/glm4_moe): Llama's attention with
# q / k / v biases (attention_bias; none on o_proj), per-head q / k norms where use_qk_norm (GLM-4.5 / 4.6, not Air),
# half of each head rotated in halves (not GLM-4's interleaved pairs); the first first_k_dense_replace blocks dense
# (Glm4MoeMLP of intermediate_size), the rest DeepSeek-V3 sparse blocks (MoeKeys.deepseek). The hub and
# save_pretrained (conversion_mapping's qwen2_moe entry, reversed) name each expert mlp.experts.{e}.gate_proj /
# up_proj / down_proj, the router mlp.gate (its weight and e_score_correction_bias), the shared experts
# mlp.shared_experts (ours: shared_expert). The hub's files hold num_nextn_predict_layers multi-token-prediction
# layers after the last block (model.layers.46.* in GLM-4.5-Air), which Glm4MoeForCausalLM ignores on load
# (_keys_to_ignore_on_load_unexpected, modeling_glm4_moe.py:461): mtp_layers, read past here too. LoRA as on
# Qwen3-MoE (no lora_mlp, expert_lora): PEFT 0.21 maps glm4_moe (and deepseek_v3) to transformers' qwen2_moe
# conversion, which re-targets the names gate_proj / up_proj / down_proj onto the fused experts (target_parameters)
# and drops them from the Linears of the dense block and the shared experts: the bare names adapt the routed experts
# (tests/model/test_expert_lora_more.py), any other MLP path is refused, and lora_target: all adapts the attention.
# Glm4MoeConfig's defaults (configuration_glm4_moe.py:96-126).
# deepseek-ai/DeepSeek-V3, moonshotai/Moonlight-16B-A3B (DeepseekV3ForCausalLM, transformers 5.24 models/deepseek_v3):
# multi-head latent attention (DeepseekV3Attention) on GLM-4.5's routing (DeepseekV3TopkRouter is Glm4MoeTopkRouter,
# DeepseekV3MoE Glm4MoeMoE), RoPE on adjacent pairs (rope_interleave, true by default), no biases, MTP layers after
# the last block (model.layers.61.*, _keys_to_ignore_on_load_unexpected). DeepseekV3Config's defaults
# (configuration_deepseek_v3.py); its config.json's head_dim is qk_rope_head_dim (DeepseekV3Config.__post_init__).
DEEPSEEK_V3 = Family(name="deepseek_v3", architecture="DeepseekV3ForCausalLM", reward_architecture="",
                     model_type="deepseek_v3", prefix="model.", skip=(".rotary_emb.inv_freq",),
                     modules=(("layers.{i}.mlp.shared_expert", "layers.{i}.mlp.shared_experts"),),
                     config_defaults=(("max_position_embeddings", 4096), ("rms_norm_eps", 1e-6),
                                      ("intermediate_size", 18432), ("q_lora_rank", 1536), ("kv_lora_rank", 512),
                                      ("qk_rope_head_dim", 64), ("qk_nope_head_dim", 128), ("v_head_dim", 128),
                                      ("rope_interleave", True)),
                     bias_keys=("attention_bias",), rope_interleaved=True, mtp_layers=True, latent_attention=True,
                     fp32_strict=_ROUTER_FP32,
                     moe=MoeKeys("n_routed_experts", "moe_intermediate_size", sparse_layers=False, deepseek=True,
                                 router_loss=False, expert_lora=True,
                                 defaults=(("n_routed_experts", 256), ("num_experts_per_tok", 8),
                                           ("moe_intermediate_size", 2048), ("n_shared_experts", 1),
                                           ("routed_scaling_factor", 2.5), ("n_group", 8), ("topk_group", 4),
                                           ("first_k_dense_replace", 3), ("norm_topk_prob", True),
                                           ("router_aux_loss_coef", 0.0))))
GLM4_MOE = Family(name="glm4_moe", architecture="Glm4MoeForCausalLM", reward_architecture="",
                  model_type="glm4_moe", prefix="model.", skip=(".rotary_emb.inv_freq",),
                  modules=(("layers.{i}.mlp.shared_expert", "layers.{i}.mlp.shared_experts"),),
                  config_defaults=(("max_position_embeddings", 131072), ("rms_norm_eps", 1e-5),
                                   ("num_key_value_heads", 8), ("intermediate_size", 10944),
                                   ("partial_rotary_factor", 0.5)),
                  bias_keys=("attention_bias",), o_proj_bias=False, partial_rotary=True, qk_norm_key="use_qk_norm",
                  mtp_layers=True, fp32_strict=_ROUTER_FP32,
                  moe=MoeKeys("n_routed_experts", "moe_intermediate_size", sparse_layers=False,
                              deepseek=True, router_loss=False, expert_lora=True,
                              defaults=(("n_routed_experts", 128), ("num_experts_per_tok", 8),
                                        ("moe_intermediate_size", 1408), ("n_shared_experts", 1),
                                        ("routed_scaling_factor", 1.0), ("n_group", 1), ("topk_group", 1),
                                        ("first_k_dense_replace", 1), ("norm_topk_prob", True),
                                        ("router_aux_loss_coef", 0.0))))
FAMILIES: dict[str, Family] = {f.name: f for f in (GPT2, LLAMA, QWEN2, QWEN3, MISTRAL, QWEN3_MOE)}
FAMILIES.update((f.name, f) for f in (MIXTRAL, QWEN2_MOE))  # the MoE families beside Qwen3-MoE
FAMILIES[PHI3.name] = PHI3
FAMILIES[GEMMA3.name] = GEMMA3
FAMILIES[GEMMA.name] = GEMMA
FAMILIES[GEMMA2.name] = GEMMA2
FAMILIES.update((f.name, f) for f in (GRANITE, OLMO2))
FAMILIES.update((f.name, f) for f in GLM_FAMILIES)
FAMILIES[GPT_OSS.name] = GPT_OSS
FAMILIES[GLM4_MOE.name] = GLM4_MOE
FAMILIES[DEEPSEEK_V3.name] = DEEPSEEK_V3
BY_ARCHITECTURE = {f.architecture: f for f in FAMILIES.values()}
BY_REWARD_ARCHITECTURE = {f.reward_architecture: f for f in FAMILIES.values() if f.reward_architecture}
BY_MODEL_TYPE = {f.model_type: f for f in FAMILIES.values()}
DEFAULT_ROPE_TYPES = ("default", "linear", "dynamic", "llama3", "yarn")  # a family whose rope_types is ()
ROPE_TYPES = (*DEFAULT_ROPE_TYPES, "longrope")


@dataclass(frozen=True)
class Wrapper:
    """An architecture that wraps one of our decoders with other towers (an image-text model: a vision tower and a
    projector around the language model), trained here as its text decoder. One row per wrapping architecture: where
    its text config lives, where the decoder's tensors are, which tensors are the other towers'. Those are carried:
    never read into the model, copied bit for bit into an export, whose config.json stays the wrapper's.

    Text-only training is what LLaMA-Factory does on text data: its vision tower and projector stay frozen
    (freeze_vision_tower / freeze_multi_modal_projector default true, model_utils/visual.py), never run."""

    architecture: str                     # config.json "architectures"[0]
    model_type: str                       # config.json "model_type"
    family: str                           # the decoder's family (FAMILIES), read from the text config
    text_config: str                      # the config.json key holding the decoder's config
    prefix: str                           # the decoder's modules in transformers 5's module tree (PEFT's names)
    # other writers' tensor prefixes -> transformers 5's module tree (transformers' conversion_mapping)
    aliases: tuple[tuple[str, str], ...]
    carried: tuple[str, ...]              # the other towers' prefixes (in the module tree's names)
    # the text config class's defaults for the keys the hub's sparse text_config leaves out (beside the family's own
    # config_defaults); and the decoder settings the wrapper's config holds at its top level, with its class's default
    text_defaults: tuple[tuple[str, Any], ...] = ()
    top_level: tuple[tuple[str, Any], ...] = ()
    ignored: tuple[str, ...] = ()         # text-config keys the wrapper's forward does not apply: read as null
    files: tuple[str, ...] = ()           # the wrapper's own files beside the tokenizer's, copied into an export
    # transformers' class scoring with the whole wrapper (a score head on the image-text model: Gemma 3's
    # Gemma3ForSequenceClassification, modeling_gemma3.py:1069), "" where transformers has none; stage rm writes a
    # decoder's XForSequenceClassification, so neither is written here (reward_refusal says so)
    reward_architecture: str = ""
    # the text config the wrapper's config class builds where config.json has none (Mistral3Config's SubConfigSpec
    # init_kwargs: the 24B's); empty: a config.json without one is refused
    absent_text: tuple[tuple[str, Any], ...] = ()
    # the text config's own model_type where the wrapper has a text class of its own (Qwen2_5_VLTextConfig's
    # "qwen2_5_vl_text"); "" where it is the family's (Gemma3TextConfig's gemma3_text, MistralConfig's mistral)
    text_model_type: str = ""
    # an older config.json may hold the text keys at its top level, without a text config (Qwen2-VL / Qwen2.5-VL as
    # the hub has them: Qwen2_5_VLConfig.__post_init__ then reads them from there); the export keeps that form
    flat_text: bool = False
    # multimodal RoPE (Qwen2-VL's mrope_section, Qwen3-VL's interleaved one): the rope keys that place the three
    # position streams (time, height, width) on the rotary pairs. On text the three streams are one position, so the
    # rotation is the plain 1-D RoPE of the decoder's family; the keys are read past and carried into an export
    mrope: tuple[str, ...] = ()
    # a text config's tie_word_embeddings true ties too, the top level's being false (Qwen2VLConfig.__post_init__,
    # configuration_qwen2_vl.py:184-188: pre-v5 saves kept it there)
    tie_in_text: bool = False

    def family_of(self) -> Family:
        """The decoder's family as this wrapper names it: its architecture and model_type, its module prefix, the
        aliases and the carried towers (LoRA targets, PEFT adapters, exports and messages then speak its names)."""
        import dataclasses

        return dataclasses.replace(FAMILIES[self.family], architecture=self.architecture, model_type=self.model_type,
                                   reward_architecture="", prefix=self.prefix, aliases=self.aliases,
                                   carried=self.carried)

    def text_raw(self, raw: Mapping[str, Any], path: Any) -> dict[str, Any]:
        """The decoder's config.json keys: the text config over the class's defaults, the top-level settings."""
        family = FAMILIES[self.family]
        model_type = self.text_model_type or family.model_type
        sub = raw.get(self.text_config)
        if sub is None and self.absent_text:
            sub = dict(self.absent_text)
        if sub is None and self.flat_text:
            sub = {k: v for k, v in raw.items() if k not in ("architectures", "model_type", "vision_config")}
        if not isinstance(sub, dict):
            raise UserError(f"{path}: {self.text_config} is {sub!r}; {article(self.architecture)} {self.architecture} config.json holds its"
                            f" language model's config (model_type {model_type}) there as an object")
        if sub.get("model_type", model_type) not in (model_type, family.model_type):
            raise UserError(f"{path}: {self.text_config}.model_type is {sub['model_type']!r}; {article(self.architecture)} {self.architecture}"
                            f" is read here with {article(family.architecture)} {family.architecture} inside (model_type {model_type})")
        text = {**dict(self.text_defaults), **sub, **{key: raw.get(key, default) for key, default in self.top_level}}
        if self.tie_in_text and sub.get("tie_word_embeddings") is True:
            text["tie_word_embeddings"] = True
        return {**text, **{key: None for key in self.ignored}, **self.plain_rope(text)}

    def plain_rope(self, text: Mapping[str, Any]) -> dict[str, Any]:
        """The text config's rope dicts with the multimodal keys taken out and "mrope" read as "default"
        (Qwen2_5_VLTextConfig.convert_rope_params_to_dict): the 1-D rotation text positions get."""
        if not self.mrope:
            return {}
        out = {}
        for key in ("rope_scaling", "rope_parameters"):
            params = text.get(key)
            if isinstance(params, dict):
                params = {k: v for k, v in params.items() if k not in self.mrope}
                for kind in ("rope_type", "type"):
                    if params.get(kind) == "mrope":
                        params[kind] = "default"
                out[key] = params or None
        return out

    def multimodal_rope(self, source_text: Mapping[str, Any], decoder: Mapping[str, Any]) -> dict[str, Any]:
        """The decoder's rope dicts (an export's text config) with the source's multimodal keys put back, so that
        transformers' wrapper finds its mrope_section again."""
        kept = {}
        for key in ("rope_scaling", "rope_parameters"):
            if isinstance(source_text.get(key), dict):
                kept = {k: v for k, v in source_text[key].items() if k in self.mrope} or kept
        return {key: {**decoder[key], **kept} for key in ("rope_scaling", "rope_parameters")
                if kept and isinstance(decoder.get(key), dict)}


# Gemma 3 4B / 12B / 27B (google/gemma-3-4b-it ...): a SigLIP vision tower and a projector around a Gemma 3 text
# decoder (transformers 5.24 modeling_gemma3.py:747-911: model.vision_tower, model.multi_modal_projector,
# model.language_model, lm_head tied to the embedding by the top-level tie_word_embeddings). The hub's files and
# transformers 5's save_pretrained name the decoder language_model.model.* (its "llava" conversion mapping,
# conversion_mapping.py:812-817). Gemma3ForConditionalGeneration.forward applies no final_logit_softcapping (:998).
# The hub's text_config is sparse (4B: hidden_size, intermediate_size, num_hidden_layers, rope_scaling,
# sliding_window): Gemma3TextConfig's defaults fill it (configuration_gemma3.py:73-95).
GEMMA3_VLM = Wrapper(
    architecture="Gemma3ForConditionalGeneration", model_type="gemma3", family="gemma3", text_config="text_config",
    prefix="model.language_model.",
    aliases=(("language_model.model.", "model.language_model."), ("language_model.lm_head.", "lm_head."),
             ("vision_tower.", "model.vision_tower."), ("multi_modal_projector.", "model.multi_modal_projector.")),
    carried=("model.vision_tower.", "model.multi_modal_projector."),
    text_defaults=(("vocab_size", 262208), ("hidden_size", 2304), ("intermediate_size", 9216),
                   ("num_hidden_layers", 26), ("num_attention_heads", 8), ("rms_norm_eps", 1e-6),
                   ("bos_token_id", 2), ("eos_token_id", 1), ("pad_token_id", 0)),
    top_level=(("tie_word_embeddings", True),), ignored=("final_logit_softcapping",),
    files=("preprocessor_config.json", "processor_config.json"), reward_architecture="Gemma3ForSequenceClassification")
WRAPPERS: dict[str, Wrapper] = {GEMMA3_VLM.architecture: GEMMA3_VLM}
# Mistral Small 3.1 / 3.2 (mistralai/Mistral-Small-3.1-24B-Instruct-2503): a Pixtral vision tower and a projector
# (with its patch merger) around a MistralForCausalLM's decoder (transformers 5.24 modeling_mistral3.py:180-317: the
# same module tree as Gemma 3's, the same "llava" spellings); Mistral3Config's top-level tie_word_embeddings defaults
# to true (configuration_mistral3.py:98). A text_config given (the hub's is complete) builds MistralConfig over its own
# defaults, however sparse (configuration_utils.py:227-268, SubConfigSpec.create_subconfig: a dict goes to the
# model_type's class as it is); Mistral3Config's init_kwargs (configuration_mistral3.py:52-72, the 24B's decoder) only
# stand in for an absent one.
MISTRAL3_VLM = Wrapper(
    architecture="Mistral3ForConditionalGeneration", model_type="mistral3", family="mistral", text_config="text_config",
    prefix=GEMMA3_VLM.prefix, aliases=GEMMA3_VLM.aliases, carried=GEMMA3_VLM.carried,
    text_defaults=(("vocab_size", 32000), ("hidden_size", 4096), ("intermediate_size", 14336),
                   ("num_hidden_layers", 32), ("num_attention_heads", 32), ("num_key_value_heads", 8),
                   ("bos_token_id", 1), ("eos_token_id", 2)),  # MistralConfig's (configuration_mistral.py:62-79)
    absent_text=(("head_dim", 128), ("hidden_size", 5120), ("intermediate_size", 32768),
                 ("max_position_embeddings", 131072), ("num_attention_heads", 32), ("num_hidden_layers", 40),
                 ("num_key_value_heads", 8), ("rms_norm_eps", 1e-05), ("rope_theta", 1000000000.0),
                 ("sliding_window", None), ("vocab_size", 131072)),
    top_level=(("tie_word_embeddings", True),), files=GEMMA3_VLM.files)
WRAPPERS[MISTRAL3_VLM.architecture] = MISTRAL3_VLM
# Qwen2-VL / Qwen2.5-VL (Qwen/Qwen2.5-VL-7B-Instruct ...): a vision transformer with its patch merger (model.visual)
# around a Qwen2 decoder (transformers 5.24 modeling_qwen2_5_vl.py:866-876, :1260-1269: model.visual,
# model.language_model, lm_head; Qwen2_5_VLTextModel's blocks are Qwen2's: q / k / v biased, o_proj not, Qwen2's
# sliding-window keys). The hub's files and transformers 5's save_pretrained spell the decoder model.* and the tower
# visual.* (conversion_mapping.py:1074-1080, reversed on save; Qwen2.5-VL maps to Qwen2-VL's at :142-143). The hub's
# config.json holds the text keys at its top level (Qwen2_5_VLConfig.__post_init__ reads them from there when there
# is no text_config); rope_scaling {"type": "mrope", "mrope_section": [16, 24, 24]} is read as "default"
# (configuration_qwen2_5_vl.py convert_rope_params_to_dict). tie_word_embeddings at the top level, default false (the
# 3B ties). Qwen2_5_VLTextConfig's defaults (the 72B's) for the keys a text_config leaves out.
_QWEN2_VL = dict(
    family="qwen2", text_config="text_config", prefix="model.language_model.",
    aliases=(("visual.", "model.visual."), ("model.", "model.language_model.")), carried=("model.visual.",),
    text_defaults=(("vocab_size", 152064), ("hidden_size", 8192), ("intermediate_size", 29568),
                   ("num_hidden_layers", 80), ("num_attention_heads", 64), ("num_key_value_heads", 8),
                   ("max_position_embeddings", 32768), ("rms_norm_eps", 1e-5), ("rope_theta", 1000000.0),
                   ("sliding_window", 4096), ("max_window_layers", 80), ("bos_token_id", 151643),
                   ("eos_token_id", 151645)),
    top_level=(("tie_word_embeddings", False),), flat_text=True, mrope=("mrope_section",), tie_in_text=True,
    files=("preprocessor_config.json", "video_preprocessor_config.json"))
QWEN2_5_VLM = Wrapper(architecture="Qwen2_5_VLForConditionalGeneration", model_type="qwen2_5_vl",
                      text_model_type="qwen2_5_vl_text", **_QWEN2_VL)
QWEN2_VLM = Wrapper(architecture="Qwen2VLForConditionalGeneration", model_type="qwen2_vl",
                    text_model_type="qwen2_vl_text", **_QWEN2_VL)
# Qwen3-VL (Qwen/Qwen3-VL-8B-Instruct ...): the same tower around a Qwen3 decoder (modeling_qwen3_vl.py:853-861,
# :1252: q_norm / k_norm, no biases, no sliding window); the hub's files are spelled as the module tree (no
# conversion mapping) and its config.json has a complete text_config. Its RoPE interleaves the three streams
# (mrope_interleaved) and its deepstack adds the tower's features to the first layers' hidden states at the image
# tokens only (_deepstack_process, visual_pos_masks): on text both leave Qwen3's decoder. Qwen3VLTextConfig's
# defaults (rope_theta 500,000, 128,000 positions) for the keys a text_config leaves out; it reads no window keys.
QWEN3_VLM = Wrapper(
    architecture="Qwen3VLForConditionalGeneration", model_type="qwen3_vl", text_model_type="qwen3_vl_text",
    family="qwen3", text_config="text_config", prefix="model.language_model.", aliases=(), carried=("model.visual.",),
    text_defaults=(("vocab_size", 151936), ("hidden_size", 4096), ("intermediate_size", 22016),
                   ("num_hidden_layers", 32), ("num_attention_heads", 32), ("head_dim", 128),
                   ("max_position_embeddings", 128000), ("rms_norm_eps", 1e-6), ("rope_theta", 500000.0)),
    top_level=(("tie_word_embeddings", False),), ignored=("use_sliding_window", "sliding_window", "layer_types"),
    mrope=("mrope_section", "mrope_interleaved"), files=_QWEN2_VL["files"])
WRAPPERS.update((w.architecture, w) for w in (QWEN2_5_VLM, QWEN2_VLM, QWEN3_VLM))
WRAPPERS_BY_MODEL_TYPE = {w.model_type: w for w in WRAPPERS.values()}
SUPPORTED = ", ".join([*BY_ARCHITECTURE, *WRAPPERS])


@functools.lru_cache(maxsize=None)
def wrapped_family(family: str, wrapper: str | None) -> Family:
    """ModelConfig.hf: the family, as the wrapping architecture names it where the checkpoint was one."""
    return WRAPPERS[wrapper].family_of() if wrapper else FAMILIES[family]


def wrapper_of(raw: Mapping[str, Any]) -> Wrapper | None:
    """The Wrapper a config.json describes (architectures first, then model_type), else None."""
    archs = raw.get("architectures")
    if isinstance(archs, list) and archs:
        return WRAPPERS.get(str(archs[0]))
    return WRAPPERS_BY_MODEL_TYPE.get(str(raw.get("model_type")))


def family_of(raw: Mapping[str, Any], path: Any) -> Family:
    """The family a HF config.json describes (architectures first, then model_type), or a UserError."""
    archs = raw.get("architectures")
    if isinstance(archs, list) and archs:
        family = BY_ARCHITECTURE.get(str(archs[0])) or BY_REWARD_ARCHITECTURE.get(str(archs[0]))
        if family is None:
            raise UserError(f"{path}: architectures {archs!r} is not supported; supported architectures:"
                            f" {SUPPORTED}")
        if raw.get("model_type", family.model_type) != family.model_type:
            raise UserError(f"{path}: model_type '{raw['model_type']}' does not match architectures {archs!r}"
                            f" (expected model_type '{family.model_type}'); supported architectures: {SUPPORTED}")
        return family
    model_type = raw.get("model_type", "gpt2" if "n_embd" in raw else None)
    family = BY_MODEL_TYPE.get(str(model_type))
    if family is None:
        raise UserError(f"{path}: model_type '{model_type}' is not supported (no \"architectures\" given either);"
                        f" supported architectures: {SUPPORTED} (model_type"
                        f" {', '.join([*BY_MODEL_TYPE, *WRAPPERS_BY_MODEL_TYPE])})")
    return family


# ---------------------------------------------------------------------------------------------
# config.json <-> ModelConfig fields, per family
# ---------------------------------------------------------------------------------------------

def _need(raw: Mapping[str, Any], path: Any, keys: tuple[str, ...]) -> list[str]:
    kind = raw.get('model_type', 'HF')
    return [f"{path}: missing key '{k}' ({article(kind)} {kind} config.json has it)" for k in keys if k not in raw]


def _positive_int(raw: Mapping[str, Any], key: str, path: Any, problems: list[str]) -> None:
    value = raw.get(key)
    if value is not None and (type(value) is not int or value < 1):
        problems.append(f"{path}: {key} is {value!r}; expected a positive integer")


def gpt2_fields(raw: Mapping[str, Any], path: Any) -> dict[str, Any]:
    """GPT2Config keys (n_embd, n_layer, ...) -> ModelConfig fields; refuse variants we do not implement."""
    problems = _need(raw, path, ("n_embd", "n_layer", "n_head"))
    activation = raw.get("activation_function", "gelu_new")
    if activation not in ("gelu_new", "gelu_pytorch_tanh"):
        problems.append(f"{path}: activation_function '{activation}' is not supported; expected one of"
                        " gelu_new, gelu_pytorch_tanh (GPT-2's tanh GELU)")
    for key, ok in (("scale_attn_weights", True), ("scale_attn_by_inverse_layer_idx", False),
                    ("add_cross_attention", False), ("reorder_and_upcast_attn", False)):
        if key in raw and bool(raw[key]) != ok:
            problems.append(f"{path}: {key}={raw[key]!r} is not supported (GPT-2 uses {ok})")
    for key in ("n_embd", "n_layer", "n_head", "vocab_size", "n_positions"):
        _positive_int(raw, key, path, problems)
    if not problems and raw["n_embd"] % raw["n_head"]:
        problems.append(f"{path}: n_embd {raw['n_embd']} is not divisible by n_head {raw['n_head']}")
    if problems:
        raise UserError(problems)
    return dict(
        family="gpt2", vocab_size=int(raw.get("vocab_size", 50257)),
        context_length=int(raw.get("n_positions", raw.get("n_ctx", 1024))),
        emb_dim=int(raw["n_embd"]), n_heads=int(raw["n_head"]), n_layers=int(raw["n_layer"]),
        drop_rate=float(raw.get("resid_pdrop", 0.0) or 0.0), qkv_bias=True,
        tie_weights=bool(raw.get("tie_word_embeddings", True)), ffn_dim=raw.get("n_inner") or None,
        norm_eps=float(raw.get("layer_norm_epsilon", 1e-5)),
    )


def _rope(raw: Mapping[str, Any], path: Any, problems: list[str], family: Family | None = None,
          ) -> tuple[float, dict[str, Any] | None]:
    """(theta, scaling) as transformers reads them: a non-empty rope_scaling first, else rope_parameters.

    transformers 5 takes `rope_scaling or rope_parameters` (modeling_rope_utils.convert_rope_params_to_dict),
    the theta then from that dict's rope_theta or the top-level one; 4 reads only rope_scaling / rope_theta.
    Our merged config.json writes both spellings, so a user's edit of rope_scaling there (Qwen2.5's YaRN
    recipe, a llama3 factor) is what transformers runs: reading rope_parameters first ignored it silently.
    """
    params, key, before = raw.get("rope_scaling"), "rope_scaling", len(problems)
    if params and not isinstance(params, dict):
        problems.append(f"{path}: rope_scaling is {params!r}; expected an object or null")
        return 10000.0, None
    if not params:
        params, key = raw.get("rope_parameters"), "rope_parameters"
        params = params if isinstance(params, dict) else {}
    theta = float(params.get("rope_theta", raw.get("rope_theta", 10000.0)))
    kind = params.get("rope_type", params.get("type", "default")) or "default"
    allowed = family.rope_types if family is not None and family.rope_types else DEFAULT_ROPE_TYPES
    if family is not None and family.rope_types and kind in ("su", "yarn"):
        kind = "longrope"  # Phi3Config.convert_rope_params_to_dict: Phi-3's older spellings of LongRoPE
    if kind not in allowed:
        problems.append(f"{path}: {key}.rope_type '{kind}' is not implemented"
                        f"{' for ' + family.architecture if family is not None and family.rope_types else ''};"
                        f" supported: {', '.join(allowed)}")
        return theta, None
    if kind == "default":
        return theta, None
    if kind == "longrope":
        return theta, _longrope(raw, params, key, path, problems)
    if kind == "yarn":
        params = _yarn_window(raw, params)
    wanted = _ROPE_KEYS[kind]
    missing = [k for k in wanted if not _number(params.get(k))]
    problems += [f"{path}: {key}.{k} is missing or not a number (rope_type {kind} needs it)" for k in missing]
    optional = {k: params[k] for k in _ROPE_OPTIONAL.get(kind, ()) if params.get(k) is not None}
    problems += [f"{path}: {key}.{k} is {v!r}; expected a number" for k, v in optional.items()
                 if k != "truncate" and not _number(v)]
    if not isinstance(optional.get("truncate", True), bool):
        problems.append(f"{path}: {key}.truncate is {optional['truncate']!r}; expected true or false")
    if len(problems) > before:
        return theta, None
    return theta, {"type": kind, **{k: params[k] for k in wanted}, **optional}


_ROPE_KEYS = {"linear": ("factor",), "dynamic": ("factor",), "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                                                "original_max_position_embeddings"),
              "yarn": ("factor", "original_max_position_embeddings")}
# dynamic: transformers scales over max_position_embeddings and never reads the window LLaMA-Factory writes beside
# it, but the key is kept so that merged/config.json says what LLaMA-Factory's does and a second rope_scaling on
# merged/ measures the same window (pipeline.model.rope_recipe)
_ROPE_OPTIONAL = {"yarn": ("attention_factor", "beta_fast", "beta_slow", "mscale", "mscale_all_dim", "truncate"),
                  "dynamic": ("original_max_position_embeddings",)}


def _longrope(raw: Mapping[str, Any], params: Mapping[str, Any], key: str, path: Any,
              problems: list[str]) -> dict[str, Any] | None:
    """LongRoPE's keys as Phi3Config standardises them (modeling_rope_utils.standardize_rope_params): short_factor and
    long_factor (one number per rotary pair), original_max_position_embeddings from the top-level key first (Phi-3's
    spelling, which Phi3Config always has: 4,096 by default), else the rope dict's; factor and attention_factor when
    given (pipeline.model.rope.rope_attention_factor derives the rest)."""
    before = len(problems)
    for name in ("short_factor", "long_factor"):
        value = params.get(name)
        if not (isinstance(value, list) and value and all(_number(v) for v in value)):
            problems.append(f"{path}: {key}.{name} is {value!r}; expected a list of numbers, one per rotary pair"
                            " (rope_type longrope needs it)")
    window = raw.get("original_max_position_embeddings", params.get("original_max_position_embeddings"))
    if type(window) is not int or window < 1:
        problems.append(f"{path}: original_max_position_embeddings is {window!r}; expected a positive integer"
                        " (rope_type longrope switches to long_factor past it)")
    optional = {k: params[k] for k in ("factor", "attention_factor") if params.get(k) is not None}
    problems += [f"{path}: {key}.{k} is {v!r}; expected a number" for k, v in optional.items() if not _number(v)]
    if len(problems) > before:
        return None
    return {"type": "longrope", "short_factor": list(params["short_factor"]), "long_factor": list(params["long_factor"]),
            "original_max_position_embeddings": window, **optional}


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _yarn_window(raw: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """YaRN's original_max_position_embeddings as transformers 5 standardises it: a top-level key of that name
    wins (Phi-3's spelling), then the rope dict's, then max_position_embeddings (a factor-only Qwen2.5 edit)."""
    window = raw.get("original_max_position_embeddings", params.get("original_max_position_embeddings"))
    return {**params, "original_max_position_embeddings": window or raw.get("max_position_embeddings")}


def _sliding_layers(raw: Mapping[str, Any], even_below: bool = False) -> list[int]:
    """The layers transformers gives sliding-window attention (Qwen2Config.__post_init__, Qwen3's alike).

    Only with use_sliding_window and a sliding_window: the layers layer_types calls "sliding_attention" where
    config.json lists them, else those from max_window_layers on (max_window_layers >= num_hidden_layers: none,
    a plain full-attention model); even_below (Qwen2-MoE): else the even-indexed layers below max_window_layers.
    """
    if not raw.get("use_sliding_window") or raw.get("sliding_window") is None:
        return []
    layers = range(raw["num_hidden_layers"] if type(raw.get("num_hidden_layers")) is int else 0)
    kinds = raw.get("layer_types")
    if isinstance(kinds, list):
        return [i for i in layers if i < len(kinds) and kinds[i] == "sliding_attention"]
    first = raw.get("max_window_layers")
    if even_below:  # Qwen2MoeConfig: `bool((i + 1) % 2) and i < self.max_window_layers`
        return [i for i in layers if i % 2 == 0 and (type(first) is not int or i < first)]
    return [i for i in layers if type(first) is not int or i >= first]


def _pattern_layers(raw: Mapping[str, Any], layers: int, generation: int) -> list[int]:
    """Gemma 2 / 3's sliding layers (Gemma3TextConfig.__post_init__, configuration_gemma3.py:100-107): those
    layer_types calls "sliding_attention", else every layer i with (i + 1) % pattern != 0: Gemma 3's
    sliding_window_pattern (default 6: five local layers, then a global one), Gemma 2's 2 always."""
    kinds = raw.get("layer_types")
    if isinstance(kinds, list):
        return [i for i in range(layers) if i < len(kinds) and kinds[i] == "sliding_attention"]
    pattern = raw.get("sliding_window_pattern", 6) if generation == 3 else 2  # Gemma 2, GPT-OSS: alternating
    return [i for i in range(layers) if type(pattern) is not int or pattern < 1 or (i + 1) % pattern]


def layer_windows(family: Family, raw: Mapping[str, Any], path: Any, problems: list[str]) -> tuple[int | None, ...]:
    """Each layer's sliding window as the family's transformers class gives it (ModelConfig.layer_windows): Mistral's
    sliding_window in every layer (null: none), Qwen3-MoE's in every layer under use_sliding_window, Qwen2 / Qwen3's
    in the layers _sliding_layers names; () where no
    layer slides. A window that is no positive integer is a problem (only where a layer would use it)."""
    layers = raw.get("num_hidden_layers")
    if not family.sliding_window or type(layers) is not int or layers < 1:
        return ()
    window = raw.get("sliding_window")
    flag = family.sliding_window == "flag" and raw.get("use_sliding_window")
    sliding = range(layers) if window is not None and (family.sliding_window == "every" or flag) else \
        _sliding_layers(raw, family.sliding_window == "layers_even") \
        if family.sliding_window in ("layers", "layers_even") else \
        _pattern_layers(raw, layers, family.gemma) if family.sliding_window == "pattern" else []
    if not sliding:
        return ()
    if type(window) is not int or window < 1:
        problems.append(f"{path}: sliding_window is {window!r}; expected a positive integer or null")
        return ()
    return tuple(window if i in sliding else None for i in range(layers))


def hf_window(cfg: Any) -> int | None:
    """The one sliding_window config.json holds for the windowed layers (check_exportable refuses several)."""
    return max((w for w in cfg.layer_windows if w), default=None)


def decoder_fields(family: Family, raw: Mapping[str, Any], path: Any) -> dict[str, Any]:
    """LlamaConfig / Qwen2Config / Qwen3Config / MistralConfig / Qwen3MoeConfig keys -> ModelConfig fields."""
    raw = {**dict(family.config_defaults), **raw}
    problems = _need(raw, path, ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                 "vocab_size"))
    for key in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads", "intermediate_size",
                "vocab_size", "max_position_embeddings", "head_dim"):
        _positive_int(raw, key, path, problems)
    act = raw.get("hidden_act", "silu")
    if act != "silu" and not family.gemma:
        problems.append(f"{path}: hidden_act '{act}' is not supported; expected 'silu' (SwiGLU)")
    windows = layer_windows(family, raw, path, problems)
    if raw.get("pretraining_tp", 1) not in (1, None):
        problems.append(f"{path}: pretraining_tp {raw['pretraining_tp']!r} is not supported; expected 1")
    gemma = gemma_fields(family.gemma, raw, path, problems) if family.gemma else {}
    theta, scaling = _rope(gemma.pop("rope", raw), path, problems, family)
    moe = moe_fields(family.moe, raw, path, problems) if family.moe else {}
    rotary = _partial_rotary(family, raw, path, problems)
    if family is PHI3:
        problems += _phi3_dropout(raw, path)
    multipliers = _multipliers(raw, path, problems) if family.multipliers else {}
    quantization = raw.get("quantization_config")
    if isinstance(quantization, dict) and not dequantized_at_load(quantization, family) \
            and not read_as_stored(quantization, family):
        problems.append(_quantized(quantization, path, family))
    latent = latent_fields(raw, path, problems) if family.latent_attention else {}
    if problems:
        raise UserError(problems)
    heads = raw["num_attention_heads"]
    kv = raw.get("num_key_value_heads") or heads
    head_dim = raw.get("head_dim")
    if heads % kv:
        problems.append(f"{path}: num_attention_heads {heads} is not divisible by num_key_value_heads {kv}")
    if head_dim is None and raw["hidden_size"] % heads:
        problems.append(f"{path}: hidden_size {raw['hidden_size']} is not divisible by num_attention_heads {heads}"
                        " (and no head_dim is given)")
    if scaling and scaling["type"] == "longrope":
        pairs = int((head_dim or raw["hidden_size"] // heads) * rotary) // 2
        problems += [f"{path}: rope_scaling.{k} has {len(scaling[k])} numbers; expected {pairs}, one per rotary pair"
                     for k in ("short_factor", "long_factor") if len(scaling[k]) != pairs]
    if problems:
        raise UserError(problems)
    bias = "attention_bias" in family.bias_keys and bool(raw.get("attention_bias", False))
    return dict(
        family=family.name, vocab_size=raw["vocab_size"], context_length=int(raw.get("max_position_embeddings", 2048)),
        emb_dim=raw["hidden_size"], n_heads=heads, n_layers=raw["num_hidden_layers"], n_kv_heads=kv,
        head_size=None if head_dim is None or head_dim * heads == raw["hidden_size"] else head_dim,
        drop_rate=float(raw.get("attention_dropout", 0.0) or 0.0), norm="rmsnorm",
        norm_eps=float(raw.get("rms_norm_eps", 1e-6)), positions="rope", rope_theta=theta, rope_scaling=scaling,
        mlp="swiglu", mlp_bias="mlp_bias" in family.bias_keys and bool(raw.get("mlp_bias", False)),
        ffn_dim=raw["intermediate_size"],
        # Qwen2 always has q/k/v biases, Qwen2-MoE where qkv_bias (absent: true); neither an o_proj bias
        qkv_bias=True if family is QWEN2 else bool(raw.get("qkv_bias", True)) if "qkv_bias" in family.bias_keys
        else bias, o_bias=False if family is QWEN2 or "qkv_bias" in family.bias_keys else bias and family.o_proj_bias,
        partial_rotary_factor=rotary, tie_weights=bool(raw.get("tie_word_embeddings", False)), layer_windows=windows,
        **family.structure(), **multipliers,
    ) | moe | gemma | ({"qk_norm": bool(raw.get(family.qk_norm_key, False))} if family.qk_norm_key else {}) | latent



def dequantized_at_load(quantization: Mapping[str, Any], family: Family) -> bool:
    """Whether a checkpoint's quantization_config is one the weight reader dequantizes: gpt-oss's MXFP4 experts
    (pipeline.model.weights.dequantize_mxfp4), the form the hub ships openai/gpt-oss-20b in."""
    return quantization.get("quant_method") == "mxfp4" and bool(family.moe and family.moe.fused_experts)


def read_as_stored(quantization: Mapping[str, Any], family: Family) -> bool:
    """Whether the weight reader loads this checkpoint's quantized Linears as they are stored: bitsandbytes 4-bit
    (the hub's unsloth/*-bnb-4bit) or 8-bit (pipeline.model.quantize.stored_layer), of a dense family (a sparse MoE's
    experts are no bnb Linears in transformers 5: pipeline.model.quant_layout.SPARSE_MOE_REFUSED)."""
    return stored_quantization(quantization) is not None and family.moe is None


def _quantized(quantization: Mapping[str, Any], path: Any, family: Family) -> str:
    """Why a pre-quantized checkpoint (GPTQ, AWQ, FP8, a bitsandbytes sparse MoE) is refused, with
    the fix: its files hold packed integer codes under the Linears' names, not the weights. Said once, here, where
    every path that reads a config.json passes (the recipe's model rules before a run included), instead of a shape
    mismatch for every Linear when the weights are read. On a sparse MoE the fix is the unquantized checkpoint alone:
    quantization_bit is refused there too (quant_layout.SPARSE_MOE_REFUSED), so naming it would send the user from
    this refusal to that one (every bitsandbytes checkpoint that reaches here is a MoE's: read_as_stored)."""
    method = quantization.get("quant_method", "unknown")
    bits = 4 if quantization.get("load_in_4bit") else 8 if quantization.get("load_in_8bit") else quantization.get("bits")
    fix = "point model_name_or_path at the unquantized checkpoint it was made from" + (
        ", trained unquantized (quantization_bit does not quantize a sparse MoE model here either)" if family.moe
        else " (quantization_bit quantizes it with bitsandbytes at load)")
    read = ("only GptOssForCausalLM's MXFP4 experts are dequantized at load, and bitsandbytes 4-bit / 8-bit"
            " checkpoints of dense models are read as stored")
    return (f"{path}: a pre-quantized checkpoint (quantization_config: quant_method {method}"
            + (f", {bits}-bit" if bits else "") + f"), whose stored quantized weights are not read here ({read});"
            f" {fix}")


def _gemma_rope(raw: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(global, local) RoPE parameters as transformers 5 reads a Gemma 3 config.json
    (Gemma3TextConfig.convert_rope_params_to_dict, configuration_gemma3.py:133-156): rope_parameters per layer type
    ("full_attention", "sliding_attention"); a rope_scaling updates the global one; the global theta defaults to
    rope_theta (else 1e6), the local one to rope_local_base_freq (else 1e4)."""
    nested = raw.get("rope_parameters")
    nested = nested if isinstance(nested, dict) else {}
    full = dict(nested.get("full_attention") or {"rope_type": "default"})
    local = dict(nested.get("sliding_attention") or {"rope_type": "default"})
    if isinstance(raw.get("rope_scaling"), dict):
        full.update(raw["rope_scaling"])
    full.setdefault("rope_theta", raw.get("rope_theta", 1000000.0))
    local.setdefault("rope_theta", raw.get("rope_local_base_freq", 10000.0))
    return full, local


def gemma_fields(generation: int, raw: Mapping[str, Any], path: Any, problems: list[str]) -> dict[str, Any]:
    """GemmaConfig's / Gemma2Config's / Gemma3TextConfig's own keys -> ModelConfig fields, and under "rope" the config
    decoder_fields' _rope reads (Gemma 3: its global layers'). What they can switch on that is not implemented
    (bidirectional attention, a scaled RoPE in Gemma 3's local layers) is a problem naming the key."""
    key = "hidden_act" if generation == 1 else "hidden_activation"
    act = raw.get(key)
    if act not in ("gelu_pytorch_tanh", "gelu" if generation == 1 else "gelu_pytorch_tanh"):
        problems.append(f"{path}: {key} '{act}' is not supported; expected 'gelu_pytorch_tanh' (GeGLU)")
    if raw.get("use_bidirectional_attention"):
        problems.append(f"{path}: use_bidirectional_attention is true (an encoder); expected false (causal decoding)")
    common = dict(mlp="geglu")  # the norms and the embedding scale: Family.structure
    if generation == 1:
        return dict(rope=raw, **common)
    caps = {name: raw.get(name) for name in ("attn_logit_softcapping", "final_logit_softcapping")}
    for name, cap in caps.items():
        if cap is not None and (not _number(cap) or cap <= 0):
            problems.append(f"{path}: {name} is {cap!r}; expected a positive number or null")
            caps[name] = None
    common.update(**{k: float(v) if v is not None else None for k, v in caps.items()})
    scalar = raw.get("query_pre_attn_scalar")
    if not _number(scalar) or scalar <= 0:
        problems.append(f"{path}: query_pre_attn_scalar is {scalar!r}; expected a positive number")
        scalar = None
    if generation == 2:
        return dict(rope=raw, **common, attention_scores_scalar=scalar)
    full, local = _gemma_rope(raw)
    if (local.get("rope_type") or "default") != "default":
        problems.append(f"{path}: rope_parameters.sliding_attention.rope_type '{local['rope_type']}' is not"
                        " implemented; expected 'default' (Gemma 3 scales the global layers' RoPE only)")
    if not _number(local.get("rope_theta")):
        problems.append(f"{path}: the local RoPE theta is {local.get('rope_theta')!r}; expected a number")
    return dict(rope={"max_position_embeddings": raw.get("max_position_embeddings"), "rope_parameters": full},
                **common, attention_scores_scalar=scalar,
                rope_local_theta=float(local["rope_theta"]) if _number(local.get("rope_theta")) else None)


def gemma_config(cfg: Any, scaling: Mapping[str, Any] | None) -> dict[str, Any]:
    """The keys of a GemmaForCausalLM / Gemma2ForCausalLM / Gemma3ForCausalLM config.json beside decoder_config's;
    Gemma 2 / 3: the window in the layers layer_types names, the attention scalar, the softcapping; Gemma 3 both RoPE
    spellings too (transformers 5's rope_parameters per layer type; 4.x's rope_theta, rope_local_base_freq,
    rope_scaling)."""
    generation = FAMILIES[cfg.family].gemma
    if generation == 1:
        return {"hidden_act": "gelu_pytorch_tanh", "attention_bias": cfg.qkv_bias}
    out = {"hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": cfg.attention_scores_scalar or cfg.head_dim,
           "sliding_window": hf_window(cfg), "layer_types": ["sliding_attention" if w else "full_attention" for w in
                                                             cfg.layer_windows] or ["full_attention"] * cfg.n_layers,
           "attn_logit_softcapping": cfg.attn_logit_softcapping,
           "final_logit_softcapping": cfg.final_logit_softcapping, "attention_bias": cfg.qkv_bias}
    if generation == 2:
        return out
    full = {"rope_type": "default", "rope_theta": cfg.rope_theta, **(scaling or {})}
    local_theta = cfg.rope_local_theta or cfg.rope_theta  # None: the local layers rotate as the global ones
    local = {"rope_type": "default", "rope_theta": local_theta}
    return {**out, "rope_parameters": {"full_attention": full, "sliding_attention": local},
            "rope_local_base_freq": local_theta, "use_bidirectional_attention": False}


MULTIPLIERS = ("embedding_multiplier", "attention_multiplier", "residual_multiplier", "logits_scaling")


def _multipliers(raw: Mapping[str, Any], path: Any, problems: list[str]) -> dict[str, float]:
    """GraniteConfig's four multipliers (the family's config_defaults fill absent ones with 1.0), each a positive
    number (logits_scaling divides, the others scale)."""
    out = {}
    for key in MULTIPLIERS:
        value = raw[key]
        if not _number(value) or value <= 0:
            problems.append(f"{path}: {key} is {value!r}; expected a positive number")
        else:
            out[key] = float(value)
    return out


def _partial_rotary(family: Family, raw: Mapping[str, Any], path: Any, problems: list[str]) -> float:
    """The fraction of each head's dims RoPE rotates (Phi-4-mini 0.75), where the family's class reads it: the rope
    dict's partial_rotary_factor first, then the top-level key (Phi3Config.convert_rope_params_to_dict), else 1."""
    if not family.partial_rotary:
        return 1.0
    params = raw.get("rope_scaling") or raw.get("rope_parameters")
    params = params if isinstance(params, dict) else {}
    value = params.get("partial_rotary_factor", raw.get("partial_rotary_factor", 1.0))
    value = 1.0 if value is None else value
    if not _number(value) or not 0 < value <= 1:
        problems.append(f"{path}: partial_rotary_factor is {value!r}; expected a number in (0, 1]")
        return 1.0
    return float(value)


def _phi3_dropout(raw: Mapping[str, Any], path: Any) -> list[str]:
    """Phi3 drops out attention weights (attention_dropout) and each residual branch (resid_pdrop), never the
    embeddings (Phi3Model does not read embd_pdrop); our one drop_rate also drops the embeddings, so only the rates
    every published Phi-3 / Phi-4 config.json has, 0, are read exactly."""
    return [f"{path}: {k} is {raw[k]!r}; only 0 is supported for {PHI3.architecture} (every published Phi-3 / Phi-4"
            f" config.json has 0; this pipeline's one dropout rate would also drop the embeddings, which Phi3Model"
            f" does not): set it to 0.0" for k in ("attention_dropout", "resid_pdrop", "embd_pdrop")
            if raw.get(k) not in (None, 0, 0.0)]


def moe_fields(keys: MoeKeys, raw: Mapping[str, Any], path: Any, problems: list[str]) -> dict[str, Any]:
    """A MoE config class's keys (`keys`: Qwen3MoeConfig, MixtralConfig, Qwen2MoeConfig) -> ModelConfig fields. The
    expert count has two spellings (num_experts / num_local_experts: transformers 5's attribute_map, which its
    save_pretrained writes); the family's own wins where both are given."""
    alias = "num_experts" if keys.experts_key == "num_local_experts" else "num_local_experts"
    given = raw
    raw = {**dict(keys.defaults), **raw}
    experts = given.get(keys.experts_key, given.get(alias, raw[keys.experts_key]))
    values = {keys.experts_key: experts, "num_experts_per_tok": raw["num_experts_per_tok"],
              keys.expert_width_key: raw[keys.expert_width_key]}
    if keys.sparse_layers:
        values["decoder_sparse_step"] = raw["decoder_sparse_step"]
    if keys.shared_expert:
        values["shared_expert_intermediate_size"] = raw["shared_expert_intermediate_size"]
    if keys.deepseek:
        values.update({k: raw[k] for k in ("n_shared_experts", "n_group", "topk_group")})
    for key, value in values.items():
        if type(value) is not int or value < 1:
            problems.append(f"{path}: {key} is {value!r}; expected a positive integer")
    if type(experts) is int and type(values["num_experts_per_tok"]) is int and values["num_experts_per_tok"] > experts:
        problems.append(f"{path}: num_experts_per_tok {values['num_experts_per_tok']} is more than"
                        f" {keys.experts_key} {experts}; expected at most {keys.experts_key}")
    only = (raw["mlp_only_layers"] or []) if keys.sparse_layers else []
    deepseek = _deepseek_fields(raw, path, problems, values, experts) if keys.deepseek else {}
    if deepseek:
        only = list(range(deepseek.pop("dense_layers")))
    if not isinstance(only, list) or any(type(i) is not int or i < 0 for i in only):
        problems.append(f"{path}: mlp_only_layers is {only!r}; expected a list of layer indices")
        only = []
    coef = raw["router_aux_loss_coef"]
    if not _number(coef):
        problems.append(f"{path}: router_aux_loss_coef is {coef!r}; expected a number")
    if raw.get("router_jitter_noise"):  # MixtralSparseMoeBlock: training multiplies the block's input by noise
        problems.append(f"{path}: router_jitter_noise {raw['router_jitter_noise']!r} is not supported; expected 0"
                        " (the released Mixtral configs' value: the router sees the input as it is)")
    return dict(n_experts=experts, experts_per_token=values["num_experts_per_tok"],
                moe_ffn_dim=values[keys.expert_width_key],
                norm_topk_prob=bool(raw[keys.renormalise_key]) if keys.renormalise_key else True,
                router_weights_fp32=keys.router_weights_fp32,
                decoder_sparse_step=values.get("decoder_sparse_step", 1), mlp_only_layers=tuple(sorted(set(only))),
                router_aux_loss_coef=float(coef) if _number(coef) else 0.0,
                **{"shared_expert_dim": values.get("shared_expert_intermediate_size"), **deepseek}) \
        | _gpt_oss_experts(keys, raw, path, problems)


def _gpt_oss_experts(keys: MoeKeys, raw: Mapping[str, Any], path: Any, problems: list[str]) -> dict[str, Any]:
    """GptOssExperts' fields: biased Linears, the clamped SwiGLU's swiglu_alpha / swiglu_limit (positive numbers)."""
    if not keys.fused_experts:
        return {}
    for key in ("swiglu_alpha", "swiglu_limit"):
        if not _number(raw[key]) or raw[key] <= 0:
            problems.append(f"{path}: {key} is {raw[key]!r}; expected a positive number")
    ok = all(_number(raw[k]) and raw[k] > 0 for k in ("swiglu_alpha", "swiglu_limit"))
    return dict(mlp_bias=True, swiglu_alpha=float(raw["swiglu_alpha"]) if ok else 1.702,
                swiglu_limit=float(raw["swiglu_limit"]) if ok else 7.0)



def latent_fields(raw: Mapping[str, Any], path: Any, problems: list[str]) -> dict[str, Any]:
    """DeepseekV3Config's attention keys -> ModelConfig fields (head_size: qk_nope_head_dim + qk_rope_head_dim, the
    config.json's head_dim being the rotated part); what DeepseekV3Attention can switch that is not implemented
    (biases, RoPE in halves, fewer key / value heads than queries, whose eager path does not fit) is a problem."""
    keys = ("kv_lora_rank", "qk_rope_head_dim", "qk_nope_head_dim", "v_head_dim")
    for key in keys:
        _positive_int({key: raw[key]}, key, path, problems)
    if raw["q_lora_rank"] is not None:
        _positive_int(raw, "q_lora_rank", path, problems)
    for key, value, want in (("attention_bias", raw.get("attention_bias", False), False),
                             ("rope_interleave", raw["rope_interleave"], True),
                             ("num_key_value_heads", raw.get("num_key_value_heads") or raw["num_attention_heads"],
                              raw["num_attention_heads"])):
        if value != want:
            problems.append(f"{path}: {key} is {value!r}; only {want!r} is supported here (DeepSeek-V3's and"
                            " Moonlight's value)")
    if problems:
        return {}
    return dict(q_lora_rank=raw["q_lora_rank"], kv_lora_rank=raw["kv_lora_rank"],
                qk_rope_head_dim=raw["qk_rope_head_dim"], v_head_dim=raw["v_head_dim"], n_kv_heads=None,
                head_size=raw["qk_nope_head_dim"] + raw["qk_rope_head_dim"], qkv_bias=False, o_bias=False)


def latent_config(cfg: Any) -> dict[str, Any]:
    """The attention keys of a DeepseekV3ForCausalLM config.json."""
    return dict(q_lora_rank=cfg.q_lora_rank, kv_lora_rank=cfg.kv_lora_rank, qk_rope_head_dim=cfg.qk_rope_head_dim,
                qk_nope_head_dim=cfg.head_dim - cfg.qk_rope_head_dim, v_head_dim=cfg.v_head_dim,
                head_dim=cfg.qk_rope_head_dim, rope_interleave=True, attention_bias=False)


def _deepseek_fields(raw: Mapping[str, Any], path: Any, problems: list[str], values: Mapping[str, Any],
                     experts: Any) -> dict[str, Any]:
    """DeepSeek-V3's MoE keys (Glm4MoeConfig) -> ModelConfig fields: the sigmoid router with its correction bias,
    n_group / topk_group, routed_scaling_factor, the ungated shared experts (n_shared_experts of the experts' width:
    Glm4MoeMoE's one Glm4MoeMLP of moe_intermediate_size x n_shared_experts), and under dense_layers the
    first_k_dense_replace blocks that keep a dense MLP (Glm4MoeDecoderLayer: layer_idx >= first_k_dense_replace is
    sparse). Bad values are problems naming the key."""
    dense, scaling = raw["first_k_dense_replace"], raw["routed_scaling_factor"]
    if type(dense) is not int or dense < 0:
        problems.append(f"{path}: first_k_dense_replace is {dense!r}; expected a non-negative integer")
        dense = 0
    if not _number(scaling) or scaling <= 0:
        problems.append(f"{path}: routed_scaling_factor is {scaling!r}; expected a positive number")
        scaling = 1.0
    groups, chosen = values["n_group"], values["topk_group"]
    if all(type(v) is int and v > 0 for v in (groups, chosen, experts)) and not (
            chosen <= groups and experts % groups == 0 and experts // groups >= 2):
        problems.append(f"{path}: n_group {groups} / topk_group {chosen} do not fit {experts} experts; expected"
                        " n_group dividing the experts into groups of two or more and topk_group <= n_group")
    shared, width = values["n_shared_experts"], values.get("moe_intermediate_size")
    return dict(router_scoring="sigmoid", router_correction_bias=True, n_group=groups, topk_group=chosen,
                routed_scaling_factor=float(scaling), shared_expert_gated=False, dense_layers=dense,
                shared_expert_dim=shared * width if type(shared) is int and type(width) is int else None)


def moe_config(keys: MoeKeys, cfg: Any) -> dict[str, Any]:
    """The MoE keys of the family's config.json (the hub's spellings: Qwen's num_experts, Mixtral's
    num_local_experts and intermediate_size, the one width of its experts)."""
    out = {keys.experts_key: cfg.n_experts, "num_experts_per_tok": cfg.experts_per_token,
           keys.expert_width_key: cfg.moe_ffn_dim, "router_aux_loss_coef": cfg.router_aux_loss_coef,
           "output_router_logits": False}
    if keys.renormalise_key:
        out[keys.renormalise_key] = cfg.norm_topk_prob
    if keys.sparse_layers:
        out.update(decoder_sparse_step=cfg.decoder_sparse_step, mlp_only_layers=list(cfg.mlp_only_layers))
    if keys.shared_expert:
        out["shared_expert_intermediate_size"] = cfg.shared_expert_dim
    if keys.deepseek:  # Glm4MoeConfig: no aux loss coefficient; the dense blocks are the first ones (check_exportable)
        del out["router_aux_loss_coef"]
        out.update(n_shared_experts=(cfg.shared_expert_dim or 0) // cfg.moe_ffn_dim, n_group=cfg.n_group,
                   topk_group=cfg.topk_group, routed_scaling_factor=cfg.routed_scaling_factor,
                   first_k_dense_replace=len(cfg.mlp_only_layers))
    if not keys.renormalise_key:  # MixtralConfig
        out["router_jitter_noise"] = 0.0
    if keys.fused_experts:  # GptOssConfig
        out.update(swiglu_alpha=cfg.swiglu_alpha, swiglu_limit=cfg.swiglu_limit)
    return out


def hf_fields(raw: Mapping[str, Any], path: Any) -> dict[str, Any]:
    wrapper = wrapper_of(raw)
    if wrapper is not None:  # its decoder, read from the text config; the other towers are carried
        text = wrapper.text_raw(raw, path)
        return {**decoder_fields(FAMILIES[wrapper.family], text, f"{path}: {wrapper.text_config}"), "num_labels": 0,
                "wrapper": wrapper.architecture}
    family = family_of(raw, path)
    fields = gpt2_fields(raw, path) if family is GPT2 else decoder_fields(family, raw, path)
    return {**fields, "num_labels": num_labels(family, raw, path)}


def num_labels(family: Family, raw: Mapping[str, Any], path: Any) -> int:
    """0 for the causal LM class; 1 for XForSequenceClassification with one label (a reward model, stage rm).
    transformers writes the label count as id2label (num_labels only when given so); its default is 2."""
    archs = raw.get("architectures")
    if not (isinstance(archs, list) and archs and archs[0] == family.reward_architecture):
        return 0
    labels = raw.get("id2label")
    count = len(labels) if isinstance(labels, dict) else raw.get("num_labels", 2)
    if count != 1:
        raise UserError(f"{path}: {archs[0]} with {count} labels is not supported; only a reward model"
                        " (num_labels 1: one score per sequence) is")
    return 1


def reward_refusal(family: Family) -> tuple[str, str]:
    """(why stage rm cannot write this model's reward model, what to do instead) for a family without
    reward_architecture: a causal LM transformers has no sequence-classification class for (Granite), or an image-text
    checkpoint's decoder (Wrapper.family_of): stage rm writes a decoder's XForSequenceClassification, and transformers
    has either no class for the wrapper (Mistral3, the Qwen-VLs) or one over the whole image-text model (Gemma 3's)."""
    wrapper = WRAPPERS.get(family.architecture)
    if wrapper is None:
        others = sorted(f.name for f in FAMILIES.values() if f.reward_architecture)
        return (f"transformers has no sequence-classification class for this {family.architecture} (model_type"
                f" {family.model_type})", f"another family ({', '.join(others)})")
    decoder = FAMILIES[wrapper.family]
    theirs = (f"transformers' {wrapper.reward_architecture} scores with the whole image-text model, which is not"
              " written here" if wrapper.reward_architecture else
              f"transformers has no sequence-classification class for {wrapper.architecture} (model_type"
              f" {wrapper.model_type})")
    return (f"stage rm writes a text decoder's reward model and this {wrapper.architecture} is an image-text"
            f" checkpoint ({theirs})", f"a text-only {decoder.architecture} checkpoint (its reward model is a"
            f" {decoder.reward_architecture})")


def head_config(family: Family, cfg: Any) -> dict[str, Any]:
    """config.json's architectures, and for a reward model its one label (as transformers writes num_labels=1)."""
    if not cfg.num_labels:
        return {"architectures": [family.architecture]}
    if not family.reward_architecture:
        why, instead = reward_refusal(family)
        raise UserError(f"export: {article(family.architecture)} {family.architecture} reward model (stage rm) cannot be written: {why}; train"
                        f" stage rm on {instead}")
    return {"architectures": [family.reward_architecture], "id2label": {"0": "LABEL_0"}, "label2id": {"LABEL_0": 0}}


def gpt2_config(cfg: Any, dtype: str, special: Mapping[str, int | None]) -> dict[str, Any]:
    """The config.json transformers' GPT2LMHeadModel reads (GPT-2 has no switch for qkv bias: it is always on)."""
    return {
        **head_config(GPT2, cfg), "model_type": GPT2.model_type, "vocab_size": cfg.vocab_size,
        "n_positions": cfg.context_length, "n_ctx": cfg.context_length, "n_embd": cfg.emb_dim,
        "n_layer": cfg.n_layers, "n_head": cfg.n_heads, "n_inner": cfg.ffn_dim, "activation_function": "gelu_new",
        "resid_pdrop": cfg.drop_rate, "embd_pdrop": cfg.drop_rate, "attn_pdrop": cfg.drop_rate,
        "layer_norm_epsilon": cfg.norm_eps, "initializer_range": 0.02, "scale_attn_weights": True,
        "use_cache": True, **special, "tie_word_embeddings": cfg.tie_weights, "torch_dtype": dtype,
    }


def decoder_config(cfg: Any, dtype: str, special: Mapping[str, int | None]) -> dict[str, Any]:
    """config.json for LlamaForCausalLM / Qwen2ForCausalLM / Qwen3ForCausalLM / MistralForCausalLM /
    Qwen3MoeForCausalLM (both rope spellings)."""
    family = FAMILIES[cfg.family]
    scaling = None
    if cfg.rope_scaling:
        scaling = {("rope_type" if k == "type" else k): v for k, v in cfg.rope_scaling.items()}
    out = {
        **head_config(family, cfg), "model_type": family.model_type, "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.emb_dim, "intermediate_size": cfg.hidden_dim, "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.kv_heads, "head_dim": cfg.head_dim,
        "hidden_act": "silu", "max_position_embeddings": cfg.context_length, "rms_norm_eps": cfg.norm_eps,
        "rope_theta": cfg.rope_theta, "rope_scaling": scaling,
        "rope_parameters": {"rope_theta": cfg.rope_theta, "rope_type": "default", **(scaling or {})},
        "attention_dropout": cfg.drop_rate, "tie_word_embeddings": cfg.tie_weights, "use_cache": True,
        "initializer_range": 0.02, **special, "torch_dtype": dtype,
    }
    if family.gemma:
        out.pop("hidden_act")  # Gemma 1 writes it back as "gelu_pytorch_tanh", Gemma 3 as hidden_activation
        out.update(gemma_config(cfg, scaling))
    elif not family.sliding_window:  # LlamaConfig, GraniteConfig, Olmo2Config, GlmConfig / Glm4Config: no window keys, their bias switches
        out.update({key: cfg.mlp_bias if key == "mlp_bias" else cfg.qkv_bias for key in family.bias_keys})
        if family is LLAMA:
            out["pretraining_tp"] = 1
    elif family.sliding_window == "every":
        out["sliding_window"] = hf_window(cfg)  # null is full attention (MistralConfig's default is 4096)
    elif family.sliding_window == "pattern":  # GptOssConfig: the windowed layers by layer_types, no switch
        out.update(sliding_window=hf_window(cfg), layer_types=["sliding_attention" if w else "full_attention"
                                                               for w in cfg.layer_windows] or
                   ["full_attention"] * cfg.n_layers)
    elif family.sliding_window == "flag":  # Qwen3MoeConfig: use_sliding_window windows every layer
        out.update(use_sliding_window=any(cfg.layer_windows), sliding_window=hf_window(cfg))
    elif any(cfg.layer_windows):  # layer_types as transformers 5 reads it; max_window_layers for older readers
        windowed = [i for i, w in enumerate(cfg.layer_windows) if w]
        out.update(use_sliding_window=True, sliding_window=hf_window(cfg),
                   max_window_layers=windowed[-1] + 1 if family.sliding_window == "layers_even" else windowed[0],
                   layer_types=["sliding_attention" if w else "full_attention" for w in cfg.layer_windows])
    else:
        out.update(use_sliding_window=False, sliding_window=None, max_window_layers=cfg.n_layers)
    if family.qk_norm:
        out["attention_bias"] = cfg.qkv_bias
    if family.qk_norm_key:
        out[family.qk_norm_key] = cfg.qk_norm
    if family.latent_attention:
        out.update(latent_config(cfg))
    if "qkv_bias" in family.bias_keys:
        out["qkv_bias"] = cfg.qkv_bias
    if family.moe:
        out.update(moe_config(family.moe, cfg))
        if "attention_bias" in family.bias_keys:  # Qwen3MoeConfig, GptOssConfig: q / k / v / o biases
            out["attention_bias"] = cfg.qkv_bias
    if family.partial_rotary:  # Phi3Config: both spellings, the rope dict's read first
        out["partial_rotary_factor"] = out["rope_parameters"]["partial_rotary_factor"] = cfg.partial_rotary_factor
    if family.multipliers:  # GraniteConfig: attention_multiplier is the score scale itself (1 / sqrt(head_dim) spelled)
        out.update({key: float(getattr(cfg, key)) for key in MULTIPLIERS}, attention_multiplier=cfg.attention_scale)
    if family.null_special_ids:  # Phi3Config's / Olmo2Config's / GlmConfig's defaults are their vocabulary's ids
        for key in ("bos_token_id", "eos_token_id", "pad_token_id"):
            out.setdefault(key, None)
    if scaling and "original_max_position_embeddings" in scaling and family is PHI3:
        # Phi3Config reads the top-level key before the rope dict's (standardize_rope_params)
        out["original_max_position_embeddings"] = scaling["original_max_position_embeddings"]
    return out


_WINDOWS_EXPRESSED = {"": "none", "every": "one sliding_window in every layer",
                      "pattern": "one sliding_window, in the layers layer_types names",
                      "flag": "one sliding_window in every layer, with use_sliding_window",
                      "layers": "one sliding_window, in the layers layer_types names",
                      "layers_even": "one sliding_window, in the layers layer_types names"}

HF_CONFIG: dict[str, Callable[[Any, str, Mapping[str, int | None]], dict[str, Any]]] = {
    "gpt2": gpt2_config, "llama": decoder_config, "qwen2": decoder_config, "qwen3": decoder_config,
    "mistral": decoder_config, "qwen3_moe": decoder_config, "mixtral": decoder_config, "qwen2_moe": decoder_config}
HF_CONFIG["phi3"] = decoder_config
HF_CONFIG["gemma3"] = HF_CONFIG["gemma"] = HF_CONFIG["gemma2"] = decoder_config
HF_CONFIG.update(granite=decoder_config, olmo2=decoder_config)
HF_CONFIG.update((f.name, decoder_config) for f in GLM_FAMILIES)
HF_CONFIG[GPT_OSS.name] = decoder_config
HF_CONFIG[GLM4_MOE.name] = HF_CONFIG[DEEPSEEK_V3.name] = decoder_config


def _deepseek_blocks(cfg: Any) -> dict[str, Any]:
    """What Glm4MoeConfig / DeepseekV3Config can say of the blocks: the dense ones first (first_k_dense_replace), the
    shared expert n_shared_experts x the experts' width."""
    shared = cfg.moe_ffn_dim * max(1, (cfg.shared_expert_dim or 0) // cfg.moe_ffn_dim) if cfg.moe_ffn_dim else None
    return dict(decoder_sparse_step=1, mlp_only_layers=tuple(range(len(cfg.mlp_only_layers))), shared_expert_dim=shared)


def check_exportable(cfg: Any) -> list[str]:
    """What the family's HF class cannot express (our config allows more combinations than each HF class)."""
    family = FAMILIES[cfg.family]
    want: dict[str, Any] = {  # beside the fields the Family fixes (Family.structure, added below)
        "gpt2": dict(norm="layernorm", positions="learned", mlp="gelu", o_bias=True, mlp_bias=True,
                     kv_heads=cfg.n_heads),
        "llama": dict(norm="rmsnorm", positions="rope", mlp="swiglu", o_bias=cfg.qkv_bias),
        "qwen2": dict(norm="rmsnorm", positions="rope", mlp="swiglu", o_bias=False, mlp_bias=False, qkv_bias=True),
        "qwen3": dict(norm="rmsnorm", positions="rope", mlp="swiglu", o_bias=cfg.qkv_bias, mlp_bias=False),
        "mistral": dict(norm="rmsnorm", positions="rope", mlp="swiglu", qkv_bias=False, o_bias=False, mlp_bias=False),
        "qwen3_moe": dict(norm="rmsnorm", positions="rope", mlp="swiglu", o_bias=cfg.qkv_bias, mlp_bias=False),
        # every block sparse, its experts intermediate_size wide, the top-k weights renormalised
        "mixtral": dict(norm="rmsnorm", positions="rope", mlp="swiglu", qkv_bias=False, o_bias=False, mlp_bias=False,
                        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=(), moe_ffn_dim=cfg.hidden_dim),
        "qwen2_moe": dict(norm="rmsnorm", positions="rope", mlp="swiglu", o_bias=False, mlp_bias=False),
        "phi3": dict(norm="rmsnorm", positions="rope", mlp="swiglu", qkv_bias=False, o_bias=False, mlp_bias=False),
        "gemma3": dict(norm="rmsnorm", positions="rope", mlp="geglu", o_bias=cfg.qkv_bias, mlp_bias=False),
        "gemma2": dict(norm="rmsnorm", positions="rope", mlp="geglu", o_bias=cfg.qkv_bias, mlp_bias=False,
                       rope_local_theta=None),
        "gemma": dict(norm="rmsnorm", positions="rope", mlp="geglu", o_bias=cfg.qkv_bias, mlp_bias=False,
                      attention_scores_scalar=None, rope_local_theta=None, attn_logit_softcapping=None,
                      final_logit_softcapping=None),
        "granite": dict(norm="rmsnorm", positions="rope", mlp="swiglu", o_bias=cfg.qkv_bias),
        "olmo2": dict(norm="rmsnorm", positions="rope", mlp="swiglu", o_bias=cfg.qkv_bias, mlp_bias=False),
        **{f.name: dict(norm="rmsnorm", positions="rope", mlp="swiglu", o_bias=False, mlp_bias=False)
           for f in GLM_FAMILIES},
        # every block sparse, experts intermediate_size wide with biases, weights renormalised over the top-k
        "gpt_oss": dict(norm="rmsnorm", positions="rope", mlp="swiglu", o_bias=cfg.qkv_bias, mlp_bias=True,
                        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=(), moe_ffn_dim=cfg.hidden_dim),
        "deepseek_v3": dict(norm="rmsnorm", positions="rope", mlp="swiglu", o_bias=False, mlp_bias=False,
                            qkv_bias=False, **_deepseek_blocks(cfg)),
        "glm4_moe": dict(norm="rmsnorm", positions="rope", mlp="swiglu", o_bias=False, mlp_bias=False,
                         **_deepseek_blocks(cfg)),
    }[family.name] | family.structure()
    if family.qk_norm_key:  # the config.json says (use_qk_norm)
        del want["qk_norm"]
    deepseek = bool(family.moe and family.moe.deepseek)  # the router the class runs (Glm4MoeTopkRouter or a softmax)
    want.update(router_scoring="sigmoid" if deepseek else "softmax", router_correction_bias=deepseek,
                shared_expert_gated=not deepseek)
    if not deepseek:
        want.update(n_group=1, topk_group=1, routed_scaling_factor=1.0)
    if not family.latent_attention:  # only DeepseekV3Attention has latent attention
        want.update(kv_lora_rank=None)
    elif cfg.kv_lora_rank is None:
        want.update(kv_lora_rank="a rank")
    if not (family.moe and family.moe.fused_experts):
        want["swiglu_limit"] = None  # only GptOssExperts clamps its SwiGLU
    if not family.multipliers:  # only GraniteForCausalLM scales embeddings, scores, branches and logits
        want.update(embedding_multiplier=1.0, attention_multiplier=None, residual_multiplier=1.0, logits_scaling=1.0)
    if not (family.moe and (family.moe.shared_expert or family.moe.deepseek)) and cfg.shared_expert_dim:
        want["shared_expert_dim"] = None  # only Qwen2MoeSparseMoeBlock has a shared expert
    if not family.partial_rotary:
        want["partial_rotary_factor"] = 1.0
    if not family.moe and cfg.n_experts:
        want["n_experts"] = 0  # a dense class has no sparse blocks
    if not family.gemma:  # Gemma's decoder fields: no other class has them
        want.update(attention_scores_scalar=None, rope_local_theta=None, attn_logit_softcapping=None,
                    final_logit_softcapping=None)
    problems = [f"{family.architecture} cannot express {k}={getattr(cfg, k)!r} (it has {v!r})"
                for k, v in want.items() if getattr(cfg, k) != v]
    kind = dict(cfg.rope_scaling or {}).get("type", "default")
    if kind not in (family.rope_types or DEFAULT_ROPE_TYPES):
        problems.append(f"{family.architecture} cannot express rope_scaling type {kind!r} (it runs"
                        f" {', '.join(family.rope_types or DEFAULT_ROPE_TYPES)})")
    widths = {w for w in cfg.layer_windows if w}
    if widths and (len(widths) > 1 or not family.sliding_window
                   or (family.sliding_window in ("every", "flag") and None in cfg.layer_windows)):
        problems.append(f"{family.architecture} cannot express layer_windows {list(cfg.layer_windows)!r} (its"
                        f" sliding windows: {_WINDOWS_EXPRESSED[family.sliding_window]})")
    return problems
