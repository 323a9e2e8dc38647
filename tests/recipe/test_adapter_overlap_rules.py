"""lora_target beside additional_target (LLaMA-Factory's keys, which it hands PEFT as target_modules and
modules_to_save, unchanged): a recipe PEFT 0.21 builds, and whose adapter PEFT loads back, resolves and trains what
PEFT trains (the trainable count of get_peft_model); one it cannot build or load back is one message at the key's
file:line. The golden behaviour is PEFT's own, on a transformers model of the recipe's size."""
from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.model.config import from_hf_config, trainable_tensors
from pipeline.recipe import resolve
from tests.acceptance.harness import FAMILIES, hf_model

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")

# (family, lora_target, additional_target, the key refused, or None where PEFT builds and loads it back)
CASES = [
    ("llama", "q_proj,v_proj", "q_proj", None),          # whole name: q_proj trains in full, v_proj takes LoRA
    ("llama", "q_proj", "mlp", None),                    # a block's mlp in full beside q_proj's LoRA
    ("llama", "q_proj,o_proj", "q_proj,_proj", "additional_target"),  # '_proj' ends o_proj's name: TypeError
    ("llama", "q_proj", "model", "additional_target"),                # no module left to adapt
    ("llama", "q_proj", "self_attn", "lora_target"),                  # no module left to adapt
    ("gpt2", "c_attn", "tn", "additional_target"),                    # 'tn' ends c_attn's name (and attn's)
    ("gpt2", "c_attn", "fc", None),                                   # ends c_fc's, which takes no LoRA
]


def peft_builds(family: str, targets: str, saved: str, tmp_path) -> int | None:
    """PEFT's trainable count for LoraConfig(r=8, target_modules, modules_to_save), or None when get_peft_model
    raises or the adapter it saves does not load back onto a fresh base."""
    config = peft.LoraConfig(r=8, target_modules=targets.split(","), modules_to_save=saved.split(","),
                             task_type="CAUSAL_LM")
    try:
        model = peft.get_peft_model(hf_model(family, noise=0), config)
        model.save_pretrained(tmp_path / "peft")
        peft.PeftModel.from_pretrained(hf_model(family, noise=0), tmp_path / "peft")
    except Exception:  # noqa: BLE001 - TypeError, NoMatchingPeftModuleError, KeyError: PEFT cannot
        return None
    return model.get_nb_trainable_parameters()[0]


@pytest.mark.parametrize("family,targets,saved,refused_at", CASES, ids=[f"{c[0]}-{c[2]}" for c in CASES])
def test_a_recipe_trains_what_peft_builds_and_refuses_what_it_cannot(family, targets, saved, refused_at, write,
                                                                     tmp_path):
    golden = peft_builds(family, targets, saved, tmp_path)
    assert (golden is None) == (refused_at is not None), golden
    config = getattr(transformers, FAMILIES[family].config_class)(**FAMILIES[family].tiny)
    config.save_pretrained(tmp_path / family)
    write("r.yaml", f"model_name_or_path: {family}\ndataset: alpaca_demo\nnum_train_epochs: 3\ncutoff_len: 32\n"
                    f"finetuning_type: lora\nlora_rank: 8\nlora_target: {targets}\nadditional_target: '{saved}'\n")
    if refused_at is None:
        r = resolve("r.yaml")
        tensors = trainable_tensors(from_hf_config(config.to_dict()), "lora", 8, r["lora_target"],
                                    additional_target=r["additional_target"])
        assert sum(t.numel for t in tensors) == golden
        return
    with pytest.raises(UserError) as err:
        resolve("r.yaml")
    line = {"lora_target": 7, "additional_target": 8}[refused_at]
    [message] = err.value.messages
    assert message.startswith(f"r.yaml:{line}:") and f": {refused_at}: " in message, message
