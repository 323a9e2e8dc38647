"""PEFT adapters whose target_modules is a STRING, brought to LLaMA-Factory's merge recipe (`python -m pipeline
export`): PEFT reads such a string as a regular expression that must match a module's whole name
(peft/tuners/tuners_utils.py check_target_module_exists -> utils/other.py match_target_against_key:
`re.fullmatch(target_modules, key)`, key e.g. model.layers.0.self_attn.q_proj), as transformers-4-era adapters and
LLaMA-Factory users write them ("model.layers.*.self_attn.(q_proj|v_proj)").

Golden values: PEFT 0.21's own get_peft_model(..., LoraConfig(target_modules=<the string>)) on a transformers-written
tiny Llama, saved with save_pretrained (random lora_A and lora_B: init_lora_weights=False), and its
merge_and_unload(); the export loaded by transformers computes those logits (fp32, |difference| <= 1e-5).

Failed before: the string was read as one module name, which matches none ("lora_target: '...' matches no module",
exit 2).
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.acceptance.harness import pipeline, refused

peft = pytest.importorskip("peft")
torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

# LLaMA-Factory's examples/merge_lora/llama3_lora_sft.yaml with this test's model and adapter
MERGE = """### model
model_name_or_path: {base}
adapter_name_or_path: {adapter}
template: llama3
trust_remote_code: true

### export
export_dir: {adapter}-merged
export_size: 5
export_device: cpu
export_legacy_format: false
"""
# the attention's q / v of every block (the form LLaMA-Factory users write), one block's MLP beside block 0's o_proj (a
# choice no list of name endings makes without naming each module), and PEFT's shorthand for every Linear but the head
# (PEFT expands it before it saves: written back into adapter_config.json as a hand-written config holds it)
PATTERNS = {"attention": "model.layers.*.self_attn.(q_proj|v_proj)",
            "one_block": r"model\.layers\.1\.mlp\.(gate|up|down)_proj|model\.layers\.0\.self_attn\.o_proj",
            "all_linear": "all-linear"}


def logits(model) -> torch.Tensor:
    x = torch.randint(0, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        return model(x).logits


def peft_adapter(base: Path, folder: Path, target_modules: str):
    """PEFT's own adapter with `target_modules` on `base`, saved to `folder`; returns PEFT's model of it."""
    model = transformers.AutoModelForCausalLM.from_pretrained(base)
    config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=target_modules, init_lora_weights=False)
    theirs = peft.get_peft_model(model, config).eval()
    theirs.save_pretrained(folder)
    return theirs


def export(root: Path, base: Path, adapter: str) -> Path:
    """`python -m pipeline export <adapter>.yaml` (LLaMA-Factory's merge recipe naming it) as main(argv) in this
    process: the export of a PEFT-written adapter runs as typed in test_peft_written_adapters, and a fresh
    interpreter proves nothing more about reading target_modules (3-4 CPU-s a run)."""
    (root / f"{adapter}.yaml").write_text(MERGE.format(base=base, adapter=adapter))
    pipeline("export", f"{adapter}.yaml", cwd=root, as_typed=False)
    return root / f"{adapter}-merged"


@pytest.mark.parametrize("case", sorted(PATTERNS))
def test_a_regex_target_modules_merges_as_peft_merges_it(tmp_path, hf_checkpoint, case):
    """The adapter_config.json keeps the string as written; export writes a model whose logits are PEFT's
    merge_and_unload()'s, and not the base's; the modules PEFT adapted are the ones merged."""
    base = hf_checkpoint("llama", small_vocab=True)
    theirs = peft_adapter(base, tmp_path / case, PATTERNS[case])
    config = json.loads((tmp_path / case / "adapter_config.json").read_text())
    if case == "all_linear":  # PEFT saved the list it expanded the shorthand to: the shorthand put back
        assert isinstance(config["target_modules"], list)
        (tmp_path / case / "adapter_config.json").write_text(json.dumps({**config, "target_modules": "all-linear"}))
    else:
        assert config["target_modules"] == PATTERNS[case]
    adapted = sorted(name.removeprefix("base_model.model.") for name, module in theirs.named_modules()
                     if isinstance(module, peft.tuners.lora.Linear))
    merged = transformers.AutoModelForCausalLM.from_pretrained(export(tmp_path, base, case))
    want = logits(theirs.merge_and_unload().eval())
    assert (logits(merged.eval()) - want).abs().max() <= 1e-5
    plain = transformers.AutoModelForCausalLM.from_pretrained(base)
    assert (logits(plain.eval()) - want).abs().max() > 1e-3
    changed = sorted(name.removesuffix(".weight") for name, p in merged.state_dict().items()
                     if not torch.equal(p, plain.state_dict()[name]))
    assert changed == adapted, (changed, adapted)


def test_a_regex_that_matches_no_module_or_does_not_compile_is_one_message(tmp_path, hf_checkpoint):
    """A pattern PEFT would find no module with (a bare name: re.fullmatch needs the whole path) and one that is no
    regular expression: exit 2, one message naming the file, the value and the rule, nothing exported."""
    base = hf_checkpoint("llama", small_vocab=True)
    peft_adapter(base, tmp_path / "adapter", PATTERNS["attention"])
    config = tmp_path / "adapter" / "adapter_config.json"
    for pattern, says in (("q_proj", "matches none of this model's Linears"), ("model.(q_proj", "does not compile")):
        config.write_text(json.dumps({**json.loads(config.read_text()), "target_modules": pattern}))
        (tmp_path / "m.yaml").write_text(MERGE.format(base=base, adapter="adapter"))
        said = refused("export", "m.yaml", cwd=tmp_path, as_typed=False)
        assert f"adapter/adapter_config.json: target_modules is {json.dumps(pattern)}, a string, which PEFT reads as" \
               " a regular expression" in said and says in said, said
        assert len([line for line in said.splitlines() if line.startswith("error:")]) == 1, said
        assert not (tmp_path / "adapter-merged").exists()


# strings that match modules PEFT cannot adapt, on a Llama (and on GPT-2, whose MLP's activation and dropouts are
# modules of their own): (the Linears among them, which PEFT's adapter is saved with, what the refusal names:
# transformers' names, our types)
UNSUPPORTED = {r"model\.norm|.*v_proj": (r".*v_proj", "model.norm (RMSNorm)"),  # the final norm beside every v_proj
               r"model\.layers\.0\.self_attn": (r".*v_proj", "model.layers.0.self_attn (MultiHeadAttention)"),
               r".*\.mlp\..*": (r".*\.mlp\..*_proj",
                                "model.layers.0.mlp.act_fn (activation), model.layers.1.mlp.act_fn (activation)"),
               r".*\.h\.\d\.mlp\..*": (r".*\.mlp\.c_.*", "transformer.h.0.mlp.act (GELU), transformer.h.1.mlp.act"
                                      " (GELU), transformer.h.0.mlp.dropout (dropout), transformer.h.1.mlp.dropout"
                                      " (dropout)")}
GPT2_ONLY = r".*\.h\."  # the patterns on GPT-2's names (transformer.h.0.mlp.c_fc)


@pytest.mark.parametrize("pattern", sorted(UNSUPPORTED))
def test_a_regex_that_matches_a_module_peft_cannot_adapt_is_one_message(tmp_path, hf_checkpoint, pattern):
    """A string that fullmatches a norm, an attention block or an MLP's activation of the transformers model: PEFT
    0.21's get_peft_model raises ValueError ("Target module LlamaRMSNorm(...) is not supported"), the golden here;
    the export of PEFT's adapter of the Linears among them, its config holding that string, says so in one message
    naming those modules and their types, exit 2, nothing exported. Failed before: the norm and the activations were
    dropped silently (v_proj / the MLP's Linears alone merged, exit 0), the block refused as "matches none of this
    model's Linears"."""
    linears, named = UNSUPPORTED[pattern]
    gpt2 = pattern.startswith(GPT2_ONLY)
    base = hf_checkpoint("gpt2") if gpt2 else hf_checkpoint("llama", small_vocab=True)
    with pytest.raises(ValueError, match="is not supported"):
        peft.get_peft_model(transformers.AutoModelForCausalLM.from_pretrained(base),
                            peft.LoraConfig(r=4, target_modules=pattern))
    peft_adapter(base, tmp_path / "adapter", linears)
    config = tmp_path / "adapter" / "adapter_config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "target_modules": pattern}))
    recipe = MERGE.format(base=base, adapter="adapter")
    (tmp_path / "m.yaml").write_text(recipe.replace("template: llama3", "template: alpaca") if gpt2 else recipe)
    said = refused("export", "m.yaml", cwd=tmp_path, as_typed=False)
    assert [line for line in said.splitlines() if line.startswith("error:")] == [
        f"error: adapter/adapter_config.json: target_modules is {json.dumps(pattern)}, a string, which PEFT reads as a"
        f" regular expression that must match a module's whole name, and it matches {named}: no Linear nor Embedding,"
        " which PEFT 0.21 raises on (\"Target module ... is not supported\": it adapts Linear, Embedding and"
        " convolution layers); write a pattern that matches Linears only, such as \".*\\\\.(q_proj|v_proj)\", or a"
        " list of names such as [\"q_proj\", \"v_proj\"]"], said
    assert not (tmp_path / "adapter-merged").exists()


@pytest.mark.parametrize("pattern", [r".*\.(c_attn|wpe)", r"transformer\.wte|.*c_attn"])
def test_a_regex_that_matches_an_embedding_is_the_embedding_message(tmp_path, hf_checkpoint, pattern):
    """A string that fullmatches GPT-2's position table wpe (an nn.Embedding, as the token embedding wte is) beside
    Linears: PEFT 0.21's get_peft_model gives it a lora.Embedding (the golden: its adapter, saved with that string,
    holds lora_embedding_A / B of it). The export refuses it as it refuses wte matched by a string: one message naming
    the embedding, exit 2, nothing exported. Failed before: the string's wpe was dropped from the targets (an adapter
    without its tensors merged c_attn alone; PEFT's own was two "unexpected tensor" errors), and wte's message named
    the token embedding alone."""
    base = hf_checkpoint("gpt2")
    theirs = peft_adapter(base, tmp_path / "adapter", pattern)
    table = "transformer.wpe" if "wpe" in pattern else "transformer.wte"
    assert isinstance(theirs.get_submodule(f"base_model.model.{table}"), peft.tuners.lora.Embedding)
    (tmp_path / "m.yaml").write_text(MERGE.format(base=base, adapter="adapter").replace("llama3", "alpaca"))
    said = refused("export", "m.yaml", cwd=tmp_path, as_typed=False)
    assert [line.split(" which this pipeline")[0] for line in said.splitlines() if line.startswith("error:")] == [
        f"error: adapter/adapter_config.json: target_modules ['{table}'] puts LoRA on an embedding (the token"
        " embedding, a learned position table) or the output head,"], said
    assert not (tmp_path / "adapter-merged").exists()
