"""Which adapter_config.json init_lora_weights the adapter read refuses (pipeline.model.lora.base_mutating_init): those
whose start changes the base weights, so that the file read as a plain LoRA on the checkpoint is another model.

Golden: PEFT 0.21 itself where its start runs without training data (get_peft_model on a one-Linear module: is the
base layer's weight still the module's?). CorDA (needs preprocess_corda's statistics), LoRA-GA (preprocess_loraga's
gradients) and LoftQ (scipy) do not start here; their inits in peft/tuners/lora/layer.py assign the base weight
(corda_init: weight - delta; lora_ga_init: weight - weight_offset; loftq_init: the quantized qweight).
"""
from __future__ import annotations

import json
import warnings

import pytest
import torch

from pipeline.errors import UserError
from pipeline.model.lora import base_mutating_init, read_adapter_config

peft = pytest.importorskip("peft")

RUNS_IN_PEFT = (True, False, "gaussian", "pissa", "pissa_niter_2", "olora", "eva", "mica", "orthogonal")
BY_SOURCE = {"corda": True, "lora_ga": True, "loftq": True}


def peft_changes_the_base(init) -> bool:
    torch.manual_seed(0)
    module = torch.nn.Sequential(torch.nn.Linear(8, 8, bias=False))
    before = module[0].weight.detach().clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = peft.get_peft_model(module, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["0"],
                                                            init_lora_weights=init))
    return not torch.equal(model.base_model.model[0].base_layer.weight, before)


@pytest.mark.parametrize("init", RUNS_IN_PEFT, ids=str)
def test_refused_exactly_where_peft_changes_the_base(init):
    assert (base_mutating_init({"init_lora_weights": init}) is not None) == peft_changes_the_base(init)


@pytest.mark.parametrize("init", sorted(BY_SOURCE))
def test_corda_lora_ga_and_loftq_are_refused(init):
    assert base_mutating_init({"init_lora_weights": init}) == init


def refusal(tmp_path, init: str, converted: bool = False) -> str:
    """The one message read_adapter_config gives an adapter folder whose adapter_config.json has `init`."""
    config = {"peft_type": "LORA", "r": 2, "lora_alpha": 4, "target_modules": ["q_proj"], "init_lora_weights": init}
    folder = tmp_path / init
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps(config))
    if converted:  # LLaMA-Factory's pissa_convert: the plain LoRA beside the unconverted output_dir
        (folder / "pissa_converted").mkdir()
        (folder / "pissa_converted/adapter_config.json").write_text(json.dumps({**config, "init_lora_weights": True}))
    with pytest.raises(UserError) as err:
        read_adapter_config(folder)
    (message,) = err.value.messages
    return message


def test_each_refusal_names_its_way_on(tmp_path):
    """PiSSA / OLoRA / CorDA / LoRA-GA: PEFT's conversion (path_initial_model_for_weight_conversion; LLaMA-Factory's
    pissa_converted/ for PiSSA, named where it is there); LoftQ, which PEFT cannot convert: the backbone it trained
    on, or PEFT's merge."""
    for init in ("olora", "corda", "lora_ga"):
        message = refusal(tmp_path, init)
        assert f'init_lora_weights is "{init}"' in message and "path_initial_model_for_weight_conversion" in message
        assert "LLaMA-Factory" not in message, message
    assert "LLaMA-Factory writes it to output_dir/pissa_converted" in refusal(tmp_path, "pissa_niter_4")
    assert f"set adapter_name_or_path: {tmp_path / 'pissa' / 'pissa_converted'}, which holds it" in \
        refusal(tmp_path, "pissa", converted=True)
    loftq = refusal(tmp_path, "loftq")
    assert "path_initial_model_for_weight_conversion" not in loftq, loftq
    assert "backbone LoftQ wrote" in loftq and "init_lora_weights: true" in loftq and "merge_and_unload" in loftq
