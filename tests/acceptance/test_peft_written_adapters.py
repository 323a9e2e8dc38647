"""LoRA adapters on a sparse MoE model's experts and router that PEFT itself wrote, brought to the CLI as a user brings
an adapter trained elsewhere (LLaMA-Factory's merge recipe: model_name_or_path + adapter_name_or_path + export_dir,
`python -m pipeline export`): merged/ loads in transformers with the logits of PEFT's merge_and_unload() of the same
adapter (fp32, |difference| <= 1e-5; measured ~1e-6).

The adapters: PEFT 0.21's get_peft_model on a transformers-written Qwen3MoeForCausalLM (random lora_A and lora_B, so
the adapter moves the logits), saved with save_pretrained: its conversion onto transformers 5's fused expert tensors
writes target_parameters (gate_up_proj with rank_pattern / alpha_pattern 2r / 2 lora_alpha, down_proj, the router's
gate.weight) and the ParamWrapper keys (mlp.experts[.base_layer].lora_A.weight); and the file PEFT wrote for the same
lora_target on transformers 4, where each expert was its own Linear (mlp.experts.E.gate_proj.lora_A.weight, one rank-r
pair per expert and Linear, no target_parameters), which PEFT 0.21 still loads: its weight conversion
(peft/utils/transformers_weight_conversion.py:470-478, PeftConcatenate, _block_diag_3d) fuses gate and up into one pair
of rank 2r per expert, [A_gate; A_up] and blockdiag(B_gate, B_up), the same update at alpha / r. Under use_rslora that
conversion changes the scale (2 alpha / sqrt(2r), not alpha / sqrt(r): sqrt 2 times the trained update on gate and up),
so such an adapter is refused rather than loaded as either model. The dense kinds LLaMA-Factory users bring (use_rslora,
use_dora, additional_target as modules_to_save, finetuning_type oft), written by PEFT on this model's attention, go the
same way.

PEFT warns "The following rank_pattern keys did not match any targeted module and were ignored" on its own
get_peft_model here (tuners_utils.py:1110-1126 checks the patterns against the targeted modules only, not the targeted
parameters, which _create_and_replace does give the pattern's rank: lora/model.py:309-312); it says the same on
PeftModel.from_pretrained of our adapter, whose adapter_config.json holds the same target_parameters / rank_pattern /
alpha_pattern (tests/model/test_moe_expert_lora.py)."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest

from tests.acceptance.harness import pipeline, refused
from tests.acceptance.test_qwen3_moe_cli import save_pretrained_moe

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# LLaMA-Factory's examples/merge_lora/qwen3_lora_sft.yaml with this test's model and adapter
MERGE = """### model
model_name_or_path: base
adapter_name_or_path: {adapter}
template: {template}
trust_remote_code: true

### export
export_dir: {adapter}-merged
export_size: 5
export_device: cpu
export_legacy_format: false
"""
RANK, ALPHA = 4, 8


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """base/: a tiny Qwen3MoeForCausalLM (2 sparse blocks of 4 experts) as transformers' save_pretrained writes it."""
    root = tmp_path_factory.mktemp("peft_written")
    save_pretrained_moe(root / "base")
    return root


def randomised(model):
    """Every trained tensor (lora_A and lora_B) moved by N(0, 0.1): PEFT's start (B = 0) would change nothing."""
    torch.manual_seed(0)
    with torch.no_grad():
        for param in model.parameters():
            if param.requires_grad:
                param.add_(torch.randn_like(param) * 0.1)
    return model.eval()


def logits(model) -> torch.Tensor:
    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x).logits


def merge_recipe(root: Path, adapter: str, template: str = "qwen3") -> str:
    """LLaMA-Factory's merge recipe naming `adapter`, written to root/<adapter>.yaml; returns its name."""
    (root / f"{adapter}.yaml").write_text(MERGE.format(adapter=adapter, template=template))
    return f"{adapter}.yaml"


def export(root: Path, adapter: str, as_typed: bool = False, template: str = "qwen3") -> Path:
    """`python -m pipeline export` of LLaMA-Factory's merge recipe naming `adapter`; returns the export_dir."""
    merge_recipe(root, adapter, template)
    pipeline("export", f"{adapter}.yaml", cwd=root, as_typed=as_typed)
    return root / f"{adapter}-merged"


def assert_merged_is_peft_merge(root: Path, adapter: str, theirs, as_typed: bool = False,
                                template: str = "qwen3") -> None:
    """export's merged/ in transformers computes PEFT's merge_and_unload() of the same adapter, and not the base."""
    merged = transformers.AutoModelForCausalLM.from_pretrained(export(root, adapter, as_typed, template)).eval()
    want = logits(theirs.merge_and_unload().eval())
    assert (logits(merged) - want).abs().max() <= 1e-5
    assert (logits(transformers.AutoModelForCausalLM.from_pretrained(root / "base")) - want).abs().max() > 0.1


def test_experts_router_and_attention_written_by_peft_merge_as_peft_merges_them(root):
    """LLaMA-Factory's lora_target q_proj,v_proj,gate_proj,up_proj,down_proj,gate as PEFT 0.21 writes it, as typed."""
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["q_proj", "v_proj", "gate_proj", "up_proj",
                                                                       "down_proj", "gate"])
    with pytest.warns(RuntimeWarning, match="rank_pattern keys did not match any targeted module and were ignored"):
        theirs = randomised(peft.get_peft_model(base, config))  # PEFT's own warning on its own adapter (see above)
    theirs.save_pretrained(root / "all")
    written = json.loads((root / "all/adapter_config.json").read_text())
    assert (sorted(written["target_modules"]), sorted(written["target_parameters"]), written["rank_pattern"],
            written["alpha_pattern"]) == (["q_proj", "v_proj"], ["down_proj", "gate.weight", "gate_up_proj"],
                                          {r".*\.gate_up_proj": 2 * RANK}, {r".*\.gate_up_proj": 2 * ALPHA})
    assert_merged_is_peft_merge(root, "all", theirs, as_typed=True)


def test_the_experts_and_router_alone_under_rslora_merge_as_peft_merges_them(root):
    """target_modules [] beside target_parameters, as PEFT writes an adapter on the experts and the router only;
    rsLoRA: 2 alpha / sqrt(2r) on gate_up_proj, alpha / sqrt(r) on down_proj and the router, as PEFT scales them."""
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    config = peft.LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules=["gate_proj", "up_proj", "down_proj", "gate"],
                             use_rslora=True)
    theirs = randomised(peft.get_peft_model(base, config))
    theirs.save_pretrained(root / "experts-router-rslora")
    assert json.loads((root / "experts-router-rslora/adapter_config.json").read_text())["target_modules"] == []
    assert_merged_is_peft_merge(root, "experts-router-rslora", theirs)


@pytest.mark.parametrize("config", [
    dict(peft_type="LORA", r=RANK, lora_alpha=ALPHA, use_rslora=True, use_dora=True, target_modules=["q_proj", "v_proj"],
         modules_to_save=["embed_tokens", "lm_head"]),
    dict(peft_type="OFT", r=0, oft_block_size=8, target_modules=["q_proj", "o_proj"], modules_to_save=["norm"]),
], ids=["rslora-dora-modules_to_save", "oft-modules_to_save"])
def test_dense_kinds_written_by_peft_merge_as_peft_merges_them(root, config):
    """The other kinds a LLaMA-Factory user brings (use_rslora, use_dora, additional_target as modules_to_save,
    finetuning_type oft), on this model's attention, written by PEFT itself: until now loaded only in process
    (tests/model/test_dora.py, test_families.py, train/test_ref_model_adapters.py), never through the CLI."""
    base = transformers.AutoModelForCausalLM.from_pretrained(root / "base")
    settings = dict(config)
    make = peft.OFTConfig if settings.pop("peft_type") == "OFT" else peft.LoraConfig
    theirs = randomised(peft.get_peft_model(base, make(**settings)))
    name = "dense-" + make.__name__
    theirs.save_pretrained(root / name)
    assert_merged_is_peft_merge(root, name, theirs)


TARGETS = ("q_proj", "gate_proj", "up_proj", "down_proj", "gate")  # LLaMA-Factory's lora_target on transformers 4


def transformers4_adapter(root: Path, name: str, rslora: bool = False, base: str = "base",
                          targets: tuple[str, ...] = TARGETS, leave_out: str | None = None) -> Path:
    """The adapter PEFT wrote for `targets` on root/base's model under transformers 4, written by hand in that layout
    with random tensors. There each sparse block's expert was three nn.Linear (mlp.experts.E.gate_proj / up_proj /
    down_proj: transformers 5 fuses them into mlp.experts.gate_up_proj (E, 2I, H) and down_proj (E, H, I)) and a
    Qwen-MoE router an nn.Linear (transformers 5's mlp.gate.weight (E, H) in a TopKRouter; GLM-4.5's and
    DeepSeek-V3's routers were no Linear there, so those targets leave `gate` out); every other Linear of a target's
    name (attention, shared experts, a dense block's MLP) took LoRA too. PEFT's LoraLayer keys:
    base_model.model.<module>.lora_A.weight (r x in), lora_B.weight (out x r). leave_out: a regular expression; the
    modules whose path it finds are left out of the file."""
    cfg = transformers.AutoConfig.from_pretrained(root / base)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    shapes = {n: (m.in_features, m.out_features) for n, m in model.named_modules()
              if isinstance(m, torch.nn.Linear) and n.rsplit(".", 1)[-1] in targets and n != "lm_head"}
    for param, value in model.named_parameters():
        module, leaf = param.rsplit(".", 1)[0], param.rsplit(".", 2)[-2:]
        if leaf == ["experts", "gate_up_proj"] or leaf == ["experts", "down_proj"]:
            experts, out, fan_in = value.shape
            linears = {"gate_proj": (fan_in, out // 2), "up_proj": (fan_in, out // 2)} \
                if leaf[1] == "gate_up_proj" else {"down_proj": (fan_in, out)}
            shapes |= {f"{module}.{e}.{linear}": shape for e in range(experts) for linear, shape in linears.items()
                       if linear in targets}
        elif leaf == ["gate", "weight"] and "gate" in targets:
            shapes[module] = (value.shape[1], value.shape[0])
    g = torch.Generator().manual_seed(2)
    tensors = {}
    for module, (fan_in, fan_out) in sorted(shapes.items()):  # drawn for every module: the same values either way
        pair = torch.randn(RANK, fan_in, generator=g) * 0.2, torch.randn(fan_out, RANK, generator=g) * 0.2
        if not (leave_out and re.search(leave_out, module)):
            tensors[f"base_model.model.{module}.lora_A.weight"], tensors[f"base_model.model.{module}.lora_B.weight"] = pair
    directory = root / name
    shutil.rmtree(directory, ignore_errors=True)
    directory.mkdir()
    from safetensors.torch import save_file

    save_file(tensors, str(directory / "adapter_model.safetensors"), metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": cfg.architectures[0], "r": RANK,
        "lora_alpha": ALPHA, "lora_dropout": 0.0, "use_rslora": rslora, "use_dora": False, "bias": "none",
        "target_modules": list(targets), "modules_to_save": None, "fan_in_fan_out": False,
        "init_lora_weights": True, "peft_version": "0.17.1"}))
    return directory


def test_a_transformers_4_adapter_on_the_experts_merges_as_peft_0_21_loads_it(root):
    """PEFT 0.21 loads the per-expert file onto transformers 5's fused experts; so does export, with its logits. Under
    use_rslora, exit 2 with one message at adapter_name_or_path, nothing written."""
    transformers4_adapter(root, "v4")
    theirs = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(root / "base"),
                                            root / "v4")
    assert theirs.peft_config["default"].rank_pattern == {r".*\.gate_up_proj": 2 * RANK}  # PEFT converted it
    assert_merged_is_peft_merge(root, "v4", theirs)

    transformers4_adapter(root, "v4-rslora", rslora=True)
    err = refused("export", merge_recipe(root, "v4-rslora"), cwd=root, as_typed=False)
    assert err.count("error:") == 1 and "v4-rslora/adapter_model.safetensors: one LoRA per expert" in err, err
    assert "use_rslora: true" in err and not (root / "v4-rslora-merged").exists(), err
