"""finetuning_type: oft in recipes: what LLaMA-Factory 0.9.5 and PEFT accept runs, what they refuse (or would train
as another model than the recipe says) is one message at the key's file:line."""
from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.recipe import resolve

transformers = pytest.importorskip("transformers")

LLAMA = "model_name_or_path: llama\ndataset: alpaca_demo\nnum_train_epochs: 3\ncutoff_len: 64\nfinetuning_type: oft\n"


@pytest.fixture(autouse=True)
def llama(tmp_path):
    """A tiny Llama's config.json (hidden 32, intermediate 64): what the rules read of the model."""
    from tests.acceptance.harness import FAMILIES

    transformers.LlamaConfig(**FAMILIES["llama"].tiny).save_pretrained(tmp_path / "llama")


def errors(path: str, overrides=()) -> list[str]:
    with pytest.raises(UserError) as exc:
        resolve(path, list(overrides))
    return exc.value.messages


def test_an_oft_recipe_takes_lora_target_and_additional_target(write):
    r = resolve(write("r.yaml", LLAMA + "oft_block_size: 16\nlora_target: q_proj,v_proj\nadditional_target: norm\n"
                                        "oft_target: q_proj, v_proj\n"))
    assert (r["finetuning_type"], r["oft_block_size"], r["oft_rank"]) == ("oft", 16, 0)
    assert resolve(write("b.yaml", LLAMA + "oft_rank: 2\noft_block_size: 0\n"))["oft_rank"] == 2


def test_lora_only_keys_under_oft_and_oft_keys_outside_it_are_refused(write):
    write("r.yaml", LLAMA + "lora_rank: 4\nuse_dora: true\n")
    assert errors("r.yaml") == [
        "r.yaml:6:12: lora_rank: is a LoRA setting but finetuning_type is oft; remove it or set finetuning_type: lora",
        "r.yaml:7:11: use_dora: is a LoRA setting but finetuning_type is oft; remove it or set finetuning_type: lora"]
    write("l.yaml", LLAMA.replace("oft", "lora") + "oft_block_size: 16\n")
    assert errors("l.yaml") == [
        "l.yaml:6:17: oft_block_size: is an OFT setting but finetuning_type is lora; remove it or set "
        "finetuning_type: oft"]
    for override, key in (("pissa_init=true", "pissa_init"), ("loraplus_lr_ratio=16", "loraplus_lr_ratio")):
        assert any(f"{key}: " in m and "finetuning_type" in m for m in errors("r.yaml", [override])), override


def test_stage_ppo_trains_an_oft_policy_which_eval_finds_as_an_adapter(write):
    """LLaMA-Factory 0.9.5's PPO trains whatever adapter its get_peft_model made, OFT too (docs/ppo.md); the tuned
    policy is then an adapter, evaluated through adapter_name_or_path as a LoRA one is."""
    write("p.yaml", LLAMA + "stage: ppo\nreward_model: saves/rm\n")
    assert resolve("p.yaml")["finetuning_type"] == "oft"
    with pytest.raises(UserError) as exc:
        resolve("p.yaml", command="eval")
    assert any(m.startswith("p.yaml:6:8: stage: ppo evaluates nothing (as in LLaMA-Factory): evaluate the tuned "
                            "adapter with an sft recipe whose adapter_name_or_path is this run's output_dir")
               for m in exc.value.messages), exc.value.messages


# (what the recipe adds, its one message); the model is the tiny Llama, but where the first line names another
REFUSED = [
    # PEFT's OFTConfig takes r or oft_block_size, the other 0; LLaMA-Factory passes both
    ("oft_rank: 4\n", "r.yaml:6:11: oft_rank: given 4 with oft_block_size 32; OFT takes one of them, the other 0 (PEFT "
                      "refuses both: LLaMA-Factory passes the default oft_block_size 32 along): add oft_block_size: 0 "
                      "to give the number of blocks, or remove oft_rank"),
    ("oft_block_size: 0\n", "r.yaml:6:17: oft_block_size: is 0 and so is oft_rank; give one of them (the number of "
                            "blocks, oft_rank, or their size, oft_block_size: 32 is LLaMA-Factory's default)"),
    # LLaMA-Factory parses oft_target and gives PEFT lora_target: the recipe would train other modules than it says
    ("oft_target: q_proj\n", "r.yaml:6:13: oft_target: given q_proj, but OFT takes lora_target's modules (all): "
                             "LLaMA-Factory reads oft_target and never uses it; set lora_target to the modules OFT "
                             "should rotate (and oft_target the same, or remove it)"),
    # LLaMA-Factory lets GaLore / APOLLO through under OFT, whose optimizer then finds no matrix to project
    ("use_galore: true\nzero_stage: 0\n", "r.yaml:6:13: use_galore: given true with finetuning_type: oft: GaLore "
                                          "projects the gradients of whole weight matrices, which OFT freezes "
                                          "(LLaMA-Factory's optimizer then finds none to project and trains OFT's "
                                          "rotations with plain AdamW); set finetuning_type: full (or freeze), or "
                                          "remove use_galore"),
    # PEFT 0.21's OFT wraps Linear, Conv2d and Embedding, no Conv1D (tuners/oft/model.py:30-41: get_peft_model raises
    # TypeError "Target module Conv1D(nf=96, nx=32) is not supported..." on GPT-2, as tried)
    ("model_name_or_path: tiny\n", "r.yaml:5:18: finetuning_type: is oft but the model is GPT-2, whose projections are "
                                   "Conv1D in transformers: PEFT's OFT cannot wrap Conv1D (get_peft_model raises "
                                   "TypeError: \"Target module Conv1D is not supported\"), so LLaMA-Factory fails "
                                   "there too; use lora, or a Llama / Qwen model"),
]


@pytest.mark.parametrize("extra, message", REFUSED)
def test_what_peft_refuses_or_lf_would_ignore_is_refused(write, extra, message):
    model = extra if extra.startswith("model_name_or_path:") else ""
    write("r.yaml", model + (LLAMA.split("\n", 1)[1] if model else LLAMA + extra))
    assert errors("r.yaml") == [message]


def test_module_dropout_says_it_does_nothing_and_plan_counts_the_rotations(write):
    """PEFT 0.21's OFT never applies module_dropout; plan's trainable count is the blocks' upper triangles: on the
    tiny Llama, 2 layers x (q, k, v, o, gate, up: 32 inputs, down: 64) in blocks of 16, 120 numbers a block."""
    from pipeline.recipe.modelinfo import model_info, param_counts
    from pipeline.recipe.notices import notices

    r = resolve(write("r.yaml", LLAMA + "oft_block_size: 16\nmodule_dropout: 0.1\n"))
    assert any(line.startswith("notice: r.yaml:7:17: module_dropout: accepted without effect: PEFT 0.21's OFT "
                               "Linear builds its multiplicative dropout but never applies it") for line in notices(r))
    assert param_counts(r, model_info("llama"))[1] == 2 * (6 * 2 + 4) * 120


def test_an_adapter_of_the_other_method_is_refused_at_its_key(write):
    """train continues adapter_name_or_path with the recipe's method (LoRA's into LoRA, OFT's into OFT): the other
    one is said at the key before the model is built; full / freeze fold either in, and merge / generate load it
    whatever finetuning_type says (LLaMA-Factory's merge recipes leave it at lora). The method is PEFT's peft_type
    in adapter_config.json (LORA when absent, as in PEFT's older files)."""
    for name, config in (("lora_ad", {"peft_type": "LORA", "r": 4}), ("oft_ad", {"peft_type": "OFT", "r": 0}),
                         ("old_ad", {"r": 4})):
        write(f"{name}/adapter_config.json", config)
    lora = LLAMA.replace("finetuning_type: oft", "finetuning_type: lora")
    write("o.yaml", LLAMA + "adapter_name_or_path: lora_ad\n")
    write("l.yaml", lora + "adapter_name_or_path: oft_ad\n")
    said = {"o.yaml": "o.yaml:6:23: adapter_name_or_path: given 'lora_ad', a LoRA adapter (peft_type LORA in its "
                      "adapter_config.json), but finetuning_type is oft, which continues OFT adapters only; set "
                      "finetuning_type: lora to continue it (or full / freeze to fold it into the base model)",
            "l.yaml": "l.yaml:6:23: adapter_name_or_path: given 'oft_ad', an OFT adapter (peft_type OFT in its "
                      "adapter_config.json), but finetuning_type is lora, which continues LoRA adapters only; set "
                      "finetuning_type: oft to continue it (or full / freeze to fold it into the base model)"}
    for path, message in said.items():
        with pytest.raises(UserError) as exc:
            resolve(path, [], command="train")
        assert exc.value.messages == [message]
    assert resolve("l.yaml", ["adapter_name_or_path=old_ad"], command="train")["adapter_name_or_path"] == "old_ad"
    assert resolve("o.yaml", ["adapter_name_or_path=oft_ad"], command="train")["finetuning_type"] == "oft"
    assert resolve("l.yaml", ["finetuning_type=full"], command="train")["finetuning_type"] == "full"
    for command in ("plan", "merge", "generate"):  # no adapter continued: loaded as its adapter_config.json says
        assert resolve("l.yaml", [], command=command)["adapter_name_or_path"] == "oft_ad"


def test_an_adapter_trained_with_other_settings_is_refused_at_the_recipe_key(write):
    """train continues adapter_name_or_path with the recipe's r / lora_alpha / use_rslora (OFT: r, oft_block_size):
    an sft adapter at lora_rank 16 continued by a dpo recipe left at the default 8 stopped train after the model was
    built, naming only the adapter's file (docs/preference-tuning.md's sft-then-dpo path). Now one message at the
    recipe key, before anything loads; a lora_alpha derived from lora_rank is not named when setting lora_rank
    fixes it too. validate says it as well when the recipe trains. merge / plan load the adapter as its
    adapter_config.json says."""
    write("sft/adapter_config.json", {"peft_type": "LORA", "r": 16, "lora_alpha": 32, "target_modules": ["q_proj"]})
    write("oft/adapter_config.json", {"peft_type": "OFT", "r": 0, "oft_block_size": 16,
                                     "target_modules": ["q_proj"]})
    lora = LLAMA.replace("finetuning_type: oft", "finetuning_type: lora") + "adapter_name_or_path: sft\n"
    write("r.yaml", lora)
    set_here = "adapter_config.json), and training continues an adapter with the settings it was trained with; set"
    for command in ("train", "validate"):  # validate too: it said OK before make's train stage refused the recipe
        with pytest.raises(UserError) as exc:
            resolve("r.yaml", ["use_rslora=true"], command=command)
    assert exc.value.messages == [
        "r.yaml: lora_rank: 8 (the default), but adapter_name_or_path 'sft' was trained with r 16 (its "
        f"{set_here} lora_rank: 16",
        "command line override use_rslora=true: use_rslora: given true, but adapter_name_or_path 'sft' was trained "
        f"with use_rslora false (its {set_here} use_rslora: false"]
    assert resolve("r.yaml", ["lora_rank=16"], command="train")["lora_alpha"] == 32
    write("a.yaml", lora + "lora_rank: 16\nlora_alpha: 8\n")
    with pytest.raises(UserError) as exc:
        resolve("a.yaml", [], command="train")
    assert exc.value.messages == ["a.yaml:8:13: lora_alpha: given 8, but adapter_name_or_path 'sft' was trained with "
                                  f"lora_alpha 32 (its {set_here} lora_alpha: 32"]
    write("o.yaml", LLAMA + "oft_block_size: 8\nadapter_name_or_path: oft\n")
    with pytest.raises(UserError) as exc:
        resolve("o.yaml", [], command="train")
    assert exc.value.messages == ["o.yaml:6:17: oft_block_size: given 8, but adapter_name_or_path 'oft' was trained "
                                  f"with oft_block_size 16 (its {set_here} oft_block_size: 16"]
    for command in ("plan", "merge"):
        assert resolve("r.yaml", [], command=command)["lora_rank"] == 8
    assert resolve("r.yaml", ["do_train=false", "do_eval=true"], command="validate")["lora_rank"] == 8


def test_a_peft_lora_adapter_continued_under_oft_is_refused_as_typed(tmp_path):
    """As a user types it: a transformers checkpoint, PEFT's LoRA adapter of it (save_pretrained), LLaMA-Factory's
    data and an OFT recipe that names the adapter: exit 2 at the recipe's line, before any model is built."""
    peft = pytest.importorskip("peft")
    from tests.acceptance.harness import refused, write_data, write_hf_checkpoint, write_recipe

    model = write_hf_checkpoint(tmp_path / "base", "llama", small_vocab=True)
    peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    write_data(tmp_path / "data")
    recipe = write_recipe(tmp_path / "r.yaml", model_name_or_path=str(tmp_path / "base"), template="llama3",
                          dataset_dir=str(tmp_path / "data"), finetuning_type="oft", oft_block_size=8,
                          lora_target="all", adapter_name_or_path=str(tmp_path / "lora"))
    line = recipe.read_text().splitlines().index(f'adapter_name_or_path: "{tmp_path / "lora"}"') + 1
    err = refused("train", str(recipe), cwd=tmp_path)
    assert f"r.yaml:{line}:23: adapter_name_or_path: given '{tmp_path / 'lora'}', a LoRA adapter (peft_type LORA " \
           "in its adapter_config.json), but finetuning_type is oft, which continues OFT adapters only; set " \
           "finetuning_type: lora" in err, err
