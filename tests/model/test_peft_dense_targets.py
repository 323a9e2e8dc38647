"""A string target_modules on a dense model reaching a module of transformers' model without weights (a dropout, an
activation, the rotary embedding): refused as PEFT 0.21 raises on it (pipeline.model.peft_targets).

Those modules are transformers' alone (ours computes them inline), so transformers_names derives them: an MLP's act_fn
beside gate_proj, the rotary_emb, and Family.weightless. Golden values: transformers 5.24's own model of each dense
family's tiny config, built on the meta device (its named_modules(), Conv1D counted as the Linear PEFT adapts), and
PEFT 0.21's get_peft_model raising on a pattern naming its weightless modules. The CLI path (export of a PEFT-written
adapter) is tests/acceptance/test_peft_regex_targets_cli.py."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import pytest

from pipeline.errors import UserError
from pipeline.model.adapter import family_of_model
from pipeline.model.config import read_config
from pipeline.model.families import FAMILIES
from pipeline.model.gpt import GPTModel
from pipeline.model.peft_moe_targets import EMBEDDING, LINEAR, OTHER, transformers_names
from pipeline.model.peft_targets import target_names

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

SMALL = dict(vocab_size=64, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=False, bos_token_id=None,
             eos_token_id=None, pad_token_id=None)
HEAD_DIM = dict(SMALL, head_dim=8)
CONFIGS = {  # each dense family's transformers config class, tiny
    "gpt2": ("GPT2Config", dict(n_embd=32, n_layer=2, n_head=4, n_positions=64, vocab_size=64)),
    "llama": ("LlamaConfig", SMALL), "mistral": ("MistralConfig", SMALL), "qwen2": ("Qwen2Config", SMALL),
    "qwen3": ("Qwen3Config", HEAD_DIM), "phi3": ("Phi3Config", SMALL), "gemma": ("GemmaConfig", HEAD_DIM),
    "gemma2": ("Gemma2Config", HEAD_DIM), "gemma3": ("Gemma3TextConfig", HEAD_DIM), "granite": ("GraniteConfig", SMALL),
    "olmo2": ("Olmo2Config", SMALL), "glm": ("GlmConfig", HEAD_DIM), "glm4": ("Glm4Config", HEAD_DIM),
}


def kind(module) -> str:
    """What PEFT 0.21 makes of a module: a LoRA Linear (nn.Linear, GPT-2's Conv1D), a LoRA Embedding, or it raises."""
    if isinstance(module, (torch.nn.Linear, transformers.pytorch_utils.Conv1D)):
        return LINEAR
    return EMBEDDING if isinstance(module, torch.nn.Embedding) else OTHER


def test_every_dense_family_is_here():
    assert sorted(CONFIGS) == sorted(name for name, family in FAMILIES.items() if not family.moe)


@pytest.mark.parametrize("family", sorted(CONFIGS))
def test_a_dense_familys_weightless_modules_are_transformers_and_a_regex_on_them_is_refused(tmp_path, family):
    """transformers_names equals the named_modules() of the family's transformers model (each module's kind); a
    pattern that fullmatches its modules without weights makes get_peft_model raise, and target_names refuses it in
    one message naming them. Failed before on Phi-3 (mlp.activation_fn, resid_attn_dropout, resid_mlp_dropout) and
    GLM / GLM-4 (mlp.activation_fn): absent, so a pattern on them was read as the Linears it matched."""
    cls, keys = CONFIGS[family]
    config = getattr(transformers, cls)(**keys)
    config.save_pretrained(tmp_path)
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = transformers.AutoModelForCausalLM.from_config(config)
    ours = GPTModel(read_config(Path(tmp_path)), seed=0)
    assert family_of_model(ours).name == family
    modules, _ = transformers_names(ours, family_of_model(ours))
    assert modules == {n: kind(m) for n, m in theirs.named_modules()}
    weightless = [n for n, m in theirs.named_modules() if n and not any(True for _ in m.parameters())]
    assert weightless, family  # every family has some (GPT-2: dropouts; the rest: act_fn, rotary_emb)
    pattern = "|".join(re.escape(n) for n in weightless) + r"|.*\.[^.]*_proj"
    with pytest.raises(ValueError, match="is not supported"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        peft.get_peft_model(theirs, peft.LoraConfig(r=2, target_modules=pattern))
    with pytest.raises(UserError) as err:
        target_names(ours, pattern, Path("a/adapter_config.json"))
    [said] = err.value.messages
    assert any(f"it matches {name} (" in said for name in weightless) and "no Linear nor Embedding" in said, said
