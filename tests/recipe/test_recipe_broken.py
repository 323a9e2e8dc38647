"""The broken-recipe corpus: every mistake is reported with file:line:column, the key, what was given,
what was expected and a suggestion, all problems in one run; through the CLI: exit 2 and no traceback."""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import pytest

from pipeline.errors import UserError
from pipeline.recipe import resolve
from tests.recipe.helpers import BASE


@dataclass
class Case:
    name: str
    files: dict[str, str | bytes | dict]  # the recipe is r.yaml
    expected: list  # all messages in order: each exact, or a tuple (prefix, fragment, ...) for others' wording
    overrides: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    cli: bool = False  # also run through `python -m pipeline validate` (test_broken_recipe_cli_...)


LF_Z2 = {  # LLaMA-Factory's examples/deepspeed/ds_z2_config.json with two values made explicit
    "train_batch_size": "auto", "train_micro_batch_size_per_gpu": 4, "gradient_accumulation_steps": "auto",
    "gradient_clipping": "auto", "zero_allow_untested_optimizer": True,
    "fp16": {"enabled": "auto", "loss_scale": 0, "loss_scale_window": 1000, "initial_scale_power": 16,
             "hysteresis": 2, "min_loss_scale": 1},
    "bf16": {"enabled": True},
    "zero_optimization": {"stage": 2, "allgather_partitions": True, "allgather_bucket_size": 5e8,
                          "overlap_comm": False, "reduce_scatter": True, "reduce_bucket_size": 5e8,
                          "contiguous_gradients": True, "round_robin_gradients": True},
}

CASES = [
    Case("misspelled key", {"r.yaml": BASE + "lora_rnak: 4\n"},
         ["r.yaml:5:1: lora_rnak: unknown key (did you mean 'lora_rank'?)"], cli=True),
    Case("misspelled key, other", {"r.yaml": BASE + "learning_rat: 1e-4\n"},
         ["r.yaml:5:1: learning_rat: unknown key (did you mean 'learning_rate'?)"]),
    Case("unknown key without suggestion", {"r.yaml": BASE + "flux_capacitor: 1\n"},
         ["r.yaml:5:1: flux_capacitor: unknown key"]),
    Case("wrong type", {"r.yaml": BASE + "lora_rank: eight\n"},
         ["r.yaml:5:12: lora_rank: given 'eight' (a string), expected an integer >= 1 and <= 4096"]),
    Case("number in quotes", {"r.yaml": BASE + 'learning_rate: "5e-5"\n'},
         ["r.yaml:5:16: learning_rate: given '5e-5' (a string), expected a number > 0 and <= 1 "
          "(a number in quotes is a string; remove the quotes)"]),
    Case("yes is not a boolean", {"r.yaml": BASE + "bf16: yes\n"},
         ["r.yaml:5:7: bf16: given 'yes' (a string), expected true or false (only true and false are booleans: "
          "yes/no/on/off are read as strings; write true or false)"], cli=True),
    Case("bad enum", {"r.yaml": BASE + "stage: sfft\n"},
         ["r.yaml:5:8: stage: given 'sfft', expected one of pt, sft, dpo, kto, rm, ppo (did you mean 'sft'?)"], cli=True),
    Case("bad enum, other", {"r.yaml": BASE + "lr_scheduler_type: cosin\n"},
         ["r.yaml:5:20: lr_scheduler_type: given 'cosin', expected one of constant, linear, cosine, "
          "cosine_with_min_lr (did you mean 'cosine'?)"]),
    Case("min_lr_rate out of range", {"r.yaml": BASE + "lr_scheduler_type: cosine_with_min_lr\n"
                                                      "lr_scheduler_kwargs: {min_lr_rate: 2}\n"},
         ["r.yaml:6:22: lr_scheduler_kwargs: given {min_lr_rate: 2}: min_lr_rate is the floor as a fraction of "
          "learning_rate, expected a number from 0 to 1 (given 2); for example {min_lr_rate: 0.1}"], cli=True),
    Case("min_lr above learning_rate", {"r.yaml": BASE + "lr_scheduler_type: cosine_with_min_lr\n"
                                                        "learning_rate: 1.0e-4\nlr_scheduler_kwargs: {min_lr: 0.001}\n"},
         ["r.yaml:7:22: lr_scheduler_kwargs: given {min_lr: 0.001}: min_lr is the floor as a learning rate, expected "
          "a number from 0 to learning_rate (0.0001) (given 0.001); for example {min_lr_rate: 0.1}"]),
    Case("min_lr not a number", {"r.yaml": BASE + "lr_scheduler_type: cosine_with_min_lr\n"
                                                 "lr_scheduler_kwargs: {min_lr: abc}\n"},
         ["r.yaml:6:22: lr_scheduler_kwargs: given {min_lr: 'abc'}: min_lr is the floor as a learning rate, expected "
          "a number from 0 to learning_rate (5e-05) (given 'abc'); for example {min_lr_rate: 0.1}"]),
    Case("another name for a value", {"r.yaml": BASE + "pref_loss: dpo\n"},  # difflib would say 'ipo'
         ["r.yaml:5:12: pref_loss: given 'dpo', expected one of sigmoid, hinge, ipo, orpo, simpo (did you mean "
          "'sigmoid'? the DPO loss is named sigmoid here, as in LLaMA-Factory and trl)"], cli=True),
    Case("out of range fraction", {"r.yaml": BASE + "val_size: 1.5\n"},
         ["r.yaml:5:11: val_size: given 1.5 (a number), expected an integer >= 0 or a number >= 0 and < 1"]),
    Case("zero learning rate", {"r.yaml": BASE + "learning_rate: 0\n"},
         ["r.yaml:5:16: learning_rate: given 0, expected a number > 0 and <= 1"]),
    Case("zero batch size", {"r.yaml": BASE + "per_device_train_batch_size: 0\n"},
         ["r.yaml:5:30: per_device_train_batch_size: given 0, expected an integer >= 1"]),
    Case("fraction for an integer", {"r.yaml": BASE + "lora_rank: 8.5\n"},
         ["r.yaml:5:12: lora_rank: given 8.5 (a number), expected an integer >= 1 and <= 4096"]),
    Case("empty value", {"r.yaml": BASE + "learning_rate:\n"},
         ["r.yaml:5:15: learning_rate: given null, expected a number > 0 and <= 1 (the value is empty; give one, "
          "or leave the key out to use the default)"]),
    Case("not a finite number", {"r.yaml": BASE + "learning_rate: .nan\n"},
         ["r.yaml:5:16: learning_rate: given nan, expected a finite number"]),
    Case("list item of the wrong type", {"r.yaml": BASE + "lora_target: [c_attn, 3]\n"},
         ["r.yaml:5:14: lora_target: given ['c_attn', 3], expected a non-empty string or a non-empty list of "
          "non-empty strings"]),
    Case("missing required key", {"r.yaml": "model_name_or_path: tiny\nnum_train_epochs: 1\n"},
         ["r.yaml: dataset: missing, expected a non-empty string or a non-empty list of non-empty strings (set it "
          "in the recipe, a file it extends, or on the command line as dataset=...)"]),
    Case("derived key set by hand", {"r.yaml": BASE + "world_size: 2\n"},
         ["r.yaml:5:1: world_size: is computed by the pipeline (from the launcher and the data); do not set it"]),
    Case("broken YAML", {"r.yaml": BASE + "lora_target: [c_attn, c_fc\nlora_rank: 4\n"},
         ["r.yaml:6:10: invalid YAML: expected ',' or ']', but got ':' (while parsing a flow sequence on line 5)"],
         cli=True),
    Case("tabs", {"r.yaml": BASE + "lora_rank:\t4\n"},
         ["r.yaml:5:11: tab character; YAML indents and separates with spaces, not tabs"], cli=True),
    Case("duplicate keys", {"r.yaml": BASE + "lora_rank: 4\nlora_rank: 16\n"},
         ["r.yaml:6:1: duplicate key 'lora_rank' (first set on line 5, again on line 6); keep one"], cli=True),
    Case("python tag", {"r.yaml": BASE + "seed: !!python/object/apply:os.system ['id']\n"},
         ["r.yaml:5:7: tag '!!python/object/apply:os.system' refused: a recipe is plain data, python tags could "
          "run code"], cli=True),
    Case("UTF-16 file", {"r.yaml": BASE.encode("utf-16")},
         ["r.yaml:1:1: the file is UTF-16 encoded (it starts with a UTF-16 byte order mark); save it as UTF-8"],
         cli=True),
    Case("not UTF-8", {"r.yaml": BASE.encode() + b"template: caf\xe9\n"},
         ["r.yaml:5:14: the file is not UTF-8 (byte 0xe9); save it as UTF-8"]),
    Case("empty file", {"r.yaml": ""},
         ["r.yaml:1:1: the recipe is empty; expected 'key: value' lines such as 'model_name_or_path: tiny'"],
         cli=True),
    Case("list at top level", {"r.yaml": "- model_name_or_path: tiny\n- dataset: x\n"},
         ["r.yaml:1:1: the recipe must be a mapping of 'key: value' lines, found a list"]),
    Case("missing extends file", {"r.yaml": "extends: nope.yaml\n" + BASE},
         ["r.yaml:1:10: extends: file 'nope.yaml' not found (looked for nope.yaml)"], cli=True),
    Case("missing extends file in a subfolder", {"recipes/r.yaml": "extends: [base.yaml]\n"},
         ["recipes/r.yaml:1:10: extends: file 'base.yaml' not found (looked for recipes/base.yaml)"]),
    Case("extends names a folder", {"r.yaml": "extends: base\n" + BASE, "base/x.yaml": "seed: 1\n"},
         ["r.yaml:1:10: extends: file 'base' is a directory, not a recipe file (looked for base)"]),
    Case("extends cycle", {"r.yaml": "extends: a.yaml\n" + BASE, "a.yaml": "extends: b.yaml\n",
                           "b.yaml": "seed: 1\nextends: a.yaml\n"},
         ["b.yaml:2:10: extends: cycle a.yaml -> b.yaml -> a.yaml; a recipe cannot extend itself through others"],
         cli=True),
    Case("self extends", {"r.yaml": BASE + "extends: r.yaml\n"},
         ["r.yaml:5:10: extends: r.yaml extends itself; remove the extends line"]),
    Case("extends of the wrong type", {"r.yaml": BASE + "extends: 5\n"},
         ["r.yaml:5:10: extends: given 5, expected a file name or a list of file names"]),
    Case("error inside an extended file", {"r.yaml": "extends: base.yaml\nlora_rank: 4\n",
                                           "base.yaml": BASE + "stage: sfft\n"},
         ["base.yaml:5:8: stage: given 'sfft', expected one of pt, sft, dpo, kto, rm, ppo (did you mean 'sft'?)"]),
    Case("bad override syntax", {"r.yaml": BASE}, ["command line override 'lora_rank': expected key=value, e.g. "
                                                   "learning_rate=5e-5 or lora_target=[c_attn,c_fc]"],
         overrides=["lora_rank"], cli=True),
    Case("unknown override key", {"r.yaml": BASE},
         ["command line override lora_rnak=4: lora_rnak: unknown key (did you mean 'lora_rank'?)"],
         overrides=["lora_rnak=4"]),
    Case("override of the wrong type", {"r.yaml": BASE},
         ["command line override lora_rank=abc: lora_rank: given 'abc' (a string), expected an integer >= 1 and "
          "<= 4096"], overrides=["lora_rank=abc"]),
    Case("unparsable override", {"r.yaml": BASE},
         ["command line override lora_target=[c_attn: the value is not valid YAML: expected ',' or ']', but got "
          "'<stream end>' (while parsing a flow sequence on line 1)"], overrides=["lora_target=[c_attn"]),
    Case("fp16 and bf16", {"r.yaml": BASE + "bf16: true\nfp16: true\n"},
         ["r.yaml:6:7: fp16: fp16 and bf16 are both true; choose one (bf16 on Ampere or newer GPUs and on CPU, "
          "fp16 on older GPUs)",
          "r.yaml:6:7: fp16: fp16 needs a CUDA GPU and this machine has none; use bf16 on CPU (bf16: true, "
          "fp16: false) or neither for fp32"]),
    Case("lora keys with full", {"r.yaml": BASE + "finetuning_type: full\nlora_rank: 4\nlora_target: c_attn\n"},
         ["r.yaml:6:12: lora_rank: is a LoRA setting but finetuning_type is full; remove it or set "
          "finetuning_type: lora",
          "r.yaml:7:14: lora_target: is a LoRA setting but finetuning_type is full; remove it or set "
          "finetuning_type: lora"]),
    Case("use_dora with freeze", {"r.yaml": BASE + "finetuning_type: freeze\nuse_dora: true\n"},
         [("r.yaml:6:11: use_dora: is a LoRA setting but finetuning_type is freeze; remove it or set "
           "finetuning_type: lora")]),
    Case("pissa with dora", {"r.yaml": BASE + "pissa_init: true\nuse_dora: true\n"},
         ["r.yaml:5:13: pissa_init: is true but use_dora is true; PEFT does not combine PiSSA with DoRA: choose one "
          "(remove pissa_init or use_dora)"], cli=True),
    Case("pissa with full", {"r.yaml": BASE + "finetuning_type: full\npissa_init: true\n"},
         ["r.yaml:6:13: pissa_init: is true but finetuning_type is full; PiSSA initialises LoRA matrices: set "
          "finetuning_type: lora"]),
    Case("pissa under dpo with the adapters-off reference, pissa_iter below -1",
         {"r.yaml": BASE + "stage: dpo\npissa_init: true\npissa_iter: -2\n"},
         [("r.yaml:6:13: pissa_init: is true but stage dpo's pref_loss sigmoid scores against the model with its "
           "adapter off, which under PiSSA is the residual base", "set ref_model to the base checkpoint, use "
           "pref_loss orpo or simpo, or remove pissa_init"),
          ("r.yaml:7:13: pissa_iter: given -2", "-1")]),
    Case("pissa under kto with the adapters-off reference", {"r.yaml": BASE + "stage: kto\npissa_init: true\n"},
         [("r.yaml:6:13: pissa_init: is true but stage kto's loss scores against the model with its adapter off, "
           "which under PiSSA is the residual base", "set ref_model to the base checkpoint or remove pissa_init")]),
    Case("freeze key with lora", {"r.yaml": BASE + "freeze_trainable_layers: 1\n"},
         ["r.yaml:5:26: freeze_trainable_layers: only applies to finetuning_type: freeze (or lora / oft "
          "with use_llama_pro), but finetuning_type is lora; remove it or set finetuning_type: freeze"]),
    Case("warmup twice", {"r.yaml": BASE + "warmup_ratio: 0.1\nwarmup_steps: 10\n"},
         ["r.yaml:6:15: warmup_steps: warmup_ratio (0.1) and warmup_steps (10) are both set; keep one"]),
    Case("no training length", {"r.yaml": "model_name_or_path: tiny\ndataset: x\nnum_train_epochs: null\n"},
         ["r.yaml:3:19: num_train_epochs: given null and max_steps is unset, so the run has no length; set one "
          "(e.g. num_train_epochs: 3, the default)"]),
    Case("preset misspelled", {"r.yaml": BASE.replace("tiny", "gpt2-smal")},  # wording from pipeline.model.config
         [("r.yaml:1:21: model_name_or_path: 'gpt2-smal' is neither a preset", "(did you mean 'gpt2-small'?)")]),
    Case("freeze more layers than the model has", {"r.yaml": BASE + "finetuning_type: freeze\n"
                                                                    "freeze_trainable_layers: 3\n"},
         ["r.yaml:6:26: freeze_trainable_layers: given 3, expected 1..2 (the last blocks of the model's 2) or -1..-2 "
          "(the first ones); or finetuning_type: full (tiny has 2 transformer blocks)"]),
    Case("freeze no layer", {"r.yaml": BASE + "finetuning_type: freeze\nfreeze_trainable_layers: 0\n"},
         ["r.yaml:6:26: freeze_trainable_layers: given 0, expected 1..2 (the last blocks of the model's 2) or -1..-2 "
          "(the first ones); or finetuning_type: full (tiny has 2 transformer blocks)"]),
    Case("cutoff longer than the context", {"r.yaml": BASE.replace("cutoff_len: 64", "cutoff_len: 4096")},
         ["r.yaml:4:13: cutoff_len: given 4096, expected at most 128 (the model's context length); lower "
          "cutoff_len or raise context_length"]),
    Case("lora target that matches nothing", {"r.yaml": BASE + "lora_target: [c_atn]\n"},  # wording: model.config
         [("r.yaml:5:14: lora_target: 'c_atn' matches no module", "(did you mean 'c_attn'?)", "attn.c_attn")]),
    Case("offload without ZeRO-3", {"r.yaml": BASE + "zero_stage: 2\noffload_param: cpu\n"},
         ["r.yaml:6:16: offload_param: offloading parameters needs zero_stage: 3 (zero_stage is 2)"]),
    Case("dataset not registered", {"r.yaml": BASE, "datasets/dataset_info.json": {"alpaca_demos": {},
                                                                                   "identity": {}}},
         ["r.yaml:2:10: dataset: dataset 'alpaca_demo' is not in datasets/dataset_info.json (did you mean "
          "'alpaca_demos'?); known: alpaca_demos, identity"]),
    Case("launcher environment", {"r.yaml": BASE}, ["environment WORLD_SIZE='two': expected an integer >= 1 "
                                                    "(set by the launcher)"], env={"WORLD_SIZE": "two"}),
    Case("deepspeed JSON contradicts the recipe", {"r.yaml": BASE + "deepspeed: ds.json\n", "ds.json": LF_Z2},
         ['ds.json:3:3: train_micro_batch_size_per_gpu is 4 but the recipe has per_device_train_batch_size: 8 '
          '(default); set it to "auto" in ds.json or make them agree',
          'ds.json:16:5: bf16.enabled is true but the recipe has bf16: false (default); set it to "auto" in '
          'ds.json or make them agree'], cli=True),
    Case("deepspeed JSON with an optimizer", {"r.yaml": BASE + "deepspeed: ds.json\n",
                                              "ds.json": {"optimizer": {"type": "AdamW"}, "scheduler": {}}},
         ["ds.json:2:3: optimizer: the optimizer is AdamW built from the recipe: set learning_rate, weight_decay, "
          "adam_beta1, adam_beta2 and adam_epsilon there; remove the 'optimizer' section",
          "ds.json:5:3: scheduler: the learning-rate schedule is built from the recipe: set lr_scheduler_type, "
          "warmup_ratio or warmup_steps and min_lr_ratio there; remove the 'scheduler' section"]),
    Case("deepspeed JSON missing", {"r.yaml": BASE + "deepspeed: ds_z9.json\n"},
         ["r.yaml:5:12: deepspeed: file 'ds_z9.json' not found (paths are relative to the current directory "
          "{cwd})"]),
    Case("deepspeed JSON broken", {"r.yaml": BASE + "deepspeed: ds.json\n",
                                   "ds.json": '{\n  "train_batch_size": "auto",\n}\n'},
         ["ds.json:3:1: invalid JSON: Expecting property name enclosed in double quotes"]),
    Case("many problems at once", {"r.yaml": BASE + "lora_rnak: 4\nstage: sfft\nbf16: on\n"},
         ["r.yaml:5:1: lora_rnak: unknown key (did you mean 'lora_rank'?)",
          "r.yaml:6:8: stage: given 'sfft', expected one of pt, sft, dpo, kto, rm, ppo (did you mean 'sft'?)",
          "r.yaml:7:7: bf16: given 'on' (a string), expected true or false (only true and false are booleans: yes/no/on/off "
          "are read as strings; write true or false)"], overrides=["max_stepz=3"]),
]
# the last case also has an override problem, listed after the file's
CASES[-1].expected.append("command line override max_stepz=3: max_stepz: unknown key (did you mean 'max_steps'?)")


def _setup(case: Case, write) -> None:
    for name, content in case.files.items():
        write(name, content)


def _recipe(case: Case) -> str:
    return "recipes/r.yaml" if "recipes/r.yaml" in case.files else "r.yaml"


def _expected(case: Case) -> list:
    return [m.replace("{cwd}", os.getcwd()) if isinstance(m, str) else m for m in case.expected]


def _assert_messages(got: list[str], case: Case) -> None:
    expected = _expected(case)
    assert len(got) == len(expected), got
    for message, want in zip(got, expected):
        if isinstance(want, str):
            assert message == want
        else:
            assert message.startswith(want[0]) and all(part in message for part in want[1:]), message


def test_corpus_is_large_enough():
    assert len(CASES) >= 25
    assert sum(c.cli for c in CASES) >= 10


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_broken_recipe_messages(case: Case, write):
    _setup(case, write)
    with pytest.raises(UserError) as exc:
        resolve(_recipe(case), case.overrides, command="validate", env=case.env)
    _assert_messages(exc.value.messages, case)


CLI_CASES = [c for c in CASES if c.cli]


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.name for c in CLI_CASES])
def test_broken_recipe_cli_exit_2_without_traceback(case: Case, write, tmp_path):
    """`python -m pipeline validate` on each broken recipe: exit 2, only error lines, nothing on stdout. The first
    case runs as typed (a fresh interpreter); the others run main(argv) in this process (the same command line and
    messages; test_broken_recipe_messages checks each message from resolve as well)."""
    from tests.acceptance.harness import cli_env, pipeline

    _setup(case, write)
    proc = pipeline("validate", _recipe(case), *case.overrides, cwd=tmp_path, expect=2,
                    env=cli_env(**case.env, CUDA_VISIBLE_DEVICES=""), as_typed=case is CLI_CASES[0])
    assert "Traceback" not in proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert all(line.startswith("error: ") for line in lines)
    _assert_messages([line.removeprefix("error: ") for line in lines], case)
