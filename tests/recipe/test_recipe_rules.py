"""Cross-field rules: when each one fires, for which command, and that one mistake gives one message."""
from __future__ import annotations

import pytest

from pipeline.errors import UserError
from pipeline.recipe import resolve, rules

REAL_CUDA_AVAILABLE = rules.core.cuda_available  # taken at import, before the autouse fixture stubs it


def errors(path: str, overrides=(), **kw) -> list[str]:
    with pytest.raises(UserError) as exc:
        resolve(path, overrides, **kw)
    return exc.value.messages


def test_rules_are_small_named_functions():
    names = [r.func.__name__ for r in rules.RULES]
    assert len(names) == len(set(names)) >= 15


def test_cuda_detection_without_torch(monkeypatch):
    monkeypatch.setattr(rules.core.os.path, "exists", lambda p: p == "/dev/nvidia0")
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    assert REAL_CUDA_AVAILABLE() is True
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "")  # GPUs hidden
    assert REAL_CUDA_AVAILABLE() is False
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(rules.core.os.path, "exists", lambda p: False)
    assert REAL_CUDA_AVAILABLE() is False


def test_fp16_allowed_with_cuda(recipe, monkeypatch):
    monkeypatch.setattr(rules.core, "cuda_available", lambda: True)
    assert resolve(recipe("fp16: true\n"))["fp16"] is True


def test_pure_bf16_with_fp16_or_an_offloaded_optimizer_is_refused_at_the_key(recipe, monkeypatch):
    """fp16 beside pure_bf16 (one precision), and ZeRO 2's offload_optimizer (DeepSpeed keeps bf16 masters with an
    offloaded optimizer only for its compiled CPU Adam); ZeRO 2 itself, alone, is fine."""
    monkeypatch.setattr(rules.core, "cuda_available", lambda: True)
    got = errors(recipe("pure_bf16: true\nfp16: true\nzero_stage: 2\noffload_optimizer: cpu\n"))
    assert any(m.startswith("r.yaml:6:7: fp16: given true with pure_bf16: true: fp16 is float16") for m in got), got
    assert any(m.startswith("r.yaml:8:20: offload_optimizer: given cpu with pure_bf16: true: pure_bf16 with "
                            "offload_optimizer: DeepSpeed keeps bf16 master weights only for its own compiled CPU Adam")
               for m in got), got
    assert resolve(recipe("pure_bf16: true\nzero_stage: 2\n"))["pure_bf16"] is True


def test_fp16_without_cuda_only_matters_where_it_runs(recipe):
    path = recipe("fp16: true\n")
    assert errors(path, command="train") == [
        "r.yaml:5:7: fp16: fp16 needs a CUDA GPU and this machine has none; use bf16 on CPU (bf16: true, "
        "fp16: false) or neither for fp32"]
    assert resolve(path, command="plan")["fp16"] is True  # planning a GPU run on a laptop is fine


def test_one_mistake_one_message(recipe):
    # fp16 given as a string fails the schema; the precision rules that read it are skipped
    assert errors(recipe("fp16: 'yes'\nbf16: true\n")) == [
        "r.yaml:5:7: fp16: given 'yes' (a string), expected true or false (only true and false are booleans: "
        "yes/no/on/off are read as strings; write true or false)"]


def test_lora_keys_inherited_from_a_base_are_fine(write):
    write("base.yaml", "model_name_or_path: tiny\ndataset: d\nmax_steps: 1\ncutoff_len: 64\nlora_rank: 16\n")
    write("full.yaml", "extends: base.yaml\nfinetuning_type: full\n")
    assert resolve("full.yaml")["finetuning_type"] == "full"
    assert errors("full.yaml", ["lora_dropout=0.1"]) == [
        "command line override lora_dropout=0.1: lora_dropout: is a LoRA setting but finetuning_type is full; "
        "remove it or set finetuning_type: lora"]


def test_an_empty_value_takes_an_inherited_key_back_out(write):
    write("base.yaml", "model_name_or_path: tiny\ndataset: d\nmax_steps: 1\ncutoff_len: 64\nlora_rank: 16\n"
                       "lora_dropout: 0.1\n")
    write("full.yaml", "extends: base.yaml\nfinetuning_type: full\nlora_rank:\nlora_dropout: null\n")
    r = resolve("full.yaml")
    assert (r["lora_rank"], r.source("lora_rank"), r["lora_dropout"]) == (8, "default", 0.0)
    r = resolve("base.yaml", ["lora_rank=null", "max_steps=null"])
    assert (r["lora_rank"], r.source("lora_rank")) == (8, "default")
    assert r["max_steps"] is None  # a key that takes null is set to null
    write("solo.yaml", "model_name_or_path: tiny\ndataset: d\nmax_steps: 1\nlora_rank:\n")  # nothing to take out
    assert errors("solo.yaml") == ["solo.yaml:4:11: lora_rank: given null, expected an integer >= 1 and <= 4096 "
                                   "(the value is empty; give one, or leave the key out to use the default)"]


def test_training_length_not_needed_for_eval(write):
    write("r.yaml", "model_name_or_path: tiny\ndataset: d\ncutoff_len: 64\nnum_train_epochs: null\n")
    assert resolve("r.yaml", command="eval")["max_steps"] is None
    assert len(errors("r.yaml", command="train")) == 1


def test_val_size_against_the_built_data(write, manifest):
    manifest("small", train=4, val=1)  # 5 rows kept
    write("r.yaml", "model_name_or_path: tiny\ndataset: small\nmax_steps: 1\ncutoff_len: 64\n"
                    "per_device_train_batch_size: 2\n")
    assert resolve("r.yaml")["num_train_examples"] == 4  # the build holds out ceil(0.1 x 5) = 1 row
    assert resolve("r.yaml", ["val_size=0.2"])["num_train_examples"] == 4
    assert errors("r.yaml", ["val_size=0.9"]) == [
        "command line override val_size=0.9: val_size: given 0.9, but dataset 'small' has 5 rows: nothing would "
        "be left to train on; lower val_size"]


def test_accumulation_larger_than_the_data(write, manifest):
    manifest("d", train=20, val=5)
    write("r.yaml", "model_name_or_path: tiny\ndataset: d\nmax_steps: 1\ncutoff_len: 64\n"
                    "per_device_train_batch_size: 4\ngradient_accumulation_steps: 8\n")
    # ceil(20 / 4) = 5 micro-batches per rank < 8
    assert errors("r.yaml") == [
        "r.yaml:6:30: gradient_accumulation_steps: given 8, but the 20 training examples make only 5 micro-batches "
        "per rank (per_device_train_batch_size 4 x world size 1): no optimizer step would happen; lower "
        "gradient_accumulation_steps or the batch size"]
    assert resolve("r.yaml", ["gradient_accumulation_steps=5"])["steps_per_epoch"] == 1
    # a batch size the recipe leaves out is the default, not "given 8" (a dpo recipe of 3 pairs was told so)
    manifest("few", train=5, val=1)
    write("s.yaml", "model_name_or_path: tiny\ndataset: few\nmax_steps: 1\ncutoff_len: 64\n")
    assert errors("s.yaml") == [
        "s.yaml: per_device_train_batch_size: 8 (the default), but the 5 training examples do not fill one batch per "
        "rank (world size 1; incomplete batches are dropped): lower per_device_train_batch_size or add data"]
    # nothing trains: an evaluation-only run (LLaMA-Factory's nlg_eval example) is not held to the train split
    assert resolve("r.yaml", ["do_train=false", "do_predict=true"])["do_predict"] is True
    assert resolve("r.yaml", ["do_train=false", "do_predict=true", "per_device_train_batch_size=32"])


def test_empty_training_split(write, manifest):
    manifest("d", train=0, val=0)
    write("r.yaml", "model_name_or_path: tiny\ndataset: d\nmax_steps: 1\ncutoff_len: 64\n")
    assert "the built training split is empty" in errors("r.yaml")[0]


def test_model_directory_checked_only_where_it_is_used(write):
    write("r.yaml", "model_name_or_path: saves/pt/model\ndataset: d\nmax_steps: 1\ncutoff_len: 64\n")
    assert resolve("r.yaml", command="plan")["model_name_or_path"] == "saves/pt/model"
    assert errors("r.yaml", command="train") == [
        "r.yaml:1:21: model_name_or_path: directory 'saves/pt/model' does not exist here; if another recipe produces "
        "it, run that one first"]


def test_adapter_and_checkpoint_paths(write):
    write("r.yaml", "model_name_or_path: tiny\ndataset: d\nmax_steps: 1\ncutoff_len: 64\n"
                    "adapter_name_or_path: saves/x/adapter\nresume_from_checkpoint: saves/x/checkpoint-9\n")
    assert resolve("r.yaml", command="plan")["adapter_name_or_path"] == "saves/x/adapter"
    assert errors("r.yaml", command="train") == [
        "r.yaml:5:23: adapter_name_or_path: directory 'saves/x/adapter' does not exist here; if another recipe "
        "produces it, run that one first; expected an adapter directory (LoRA or OFT: e.g. saves/<recipe>/adapter)",
        "r.yaml:6:25: resume_from_checkpoint: directory 'saves/x/checkpoint-9' not found; give a checkpoint-<step> "
        "directory or 'latest'"]
    assert resolve("r.yaml", ["resume_from_checkpoint=latest", "adapter_name_or_path="], command="train")



def test_adapter_folder_checked_where_it_exists_before_a_command_loads_it(write, tmp_path):
    """plan leaves a missing adapter to the upstream recipe that make runs first, but a folder that is there and
    holds no adapter is a mistake now; export and chat load it, so it must be there (a merge recipe of a run not
    trained yet)."""
    write("r.yaml", "model_name_or_path: tiny\ndataset: d\nmax_steps: 1\ncutoff_len: 64\n"
                    "adapter_name_or_path: saves/x/adapter\nexport_dir: out\n")
    assert resolve("r.yaml", command="plan")["adapter_name_or_path"] == "saves/x/adapter"
    for command in ("export", "chat"):
        assert errors("r.yaml", command=command) == [
            "r.yaml:5:23: adapter_name_or_path: directory 'saves/x/adapter' does not exist here; if another recipe "
            "produces it, run that one first; expected an adapter directory (LoRA or OFT: e.g. saves/<recipe>/adapter)"]
    (tmp_path / "saves/x/adapter").mkdir(parents=True)
    assert errors("r.yaml", command="plan")[0].startswith("r.yaml:5:23: adapter_name_or_path: 'saves/x/adapter' holds "
                                                         "no adapter_config.json")


def test_nvme_offload_needs_a_json(recipe):
    assert errors(recipe("zero_stage: 3\noffload_optimizer: nvme\n")) == [
        "r.yaml:6:20: offload_optimizer: nvme offload needs an nvme_path: give a deepspeed JSON with "
        "zero_optimization.offload_optimizer.nvme_path, or use cpu"]


def test_offload_optimizer_needs_zero(recipe):
    assert errors(recipe("offload_optimizer: cpu\n")) == [
        "r.yaml:5:20: offload_optimizer: offloading optimizer states needs zero_stage 1, 2 or 3 (zero_stage is 0)"]


@pytest.mark.parametrize("stage,key,why", [
    ("dpo", "packing", "a dpo row is a chosen/rejected pair, never packed"),
    ("dpo", "neat_packing", "a dpo row is a chosen/rejected pair, never packed"),
    ("dpo", "train_on_prompt", "dpo scores the responses only; the prompt is never part of the loss"),
    ("pt", "train_on_prompt", "pt has no prompt: every token is trained"),
    ("pt", "mask_history", "pt has no conversation turns"),
    ("dpo", "mask_history", "dpo always scores the last response only, the history being the prompt"),
    ("kto", "mask_history", "kto always scores the last response only, the history being the prompt"),
    ("rm", "mask_history", "rm scores each whole sequence at its last token; no token is a label"),
    ("kto", "packing", "a kto row is scored with its own KL sequence, never packed"),
])
def test_a_key_the_stage_would_ignore_is_refused(recipe, stage, key, why):
    """Set where the stage cannot honour it, a key would be ignored without a word: one message, saying why."""
    messages = errors(recipe(f"stage: {stage}\n{key}: true\n"))
    assert len(messages) == 1 and messages[0].endswith(
        f"{key}: given true, but it has no meaning for stage: {stage} ({why}); remove it"), messages


@pytest.mark.parametrize("stage,key", [("sft", "mask_history"), ("pt", "packing"), ("sft", "train_on_prompt")])
def test_a_key_the_stage_honours_is_accepted(recipe, stage, key):
    """sft trains the last turn only with mask_history; pt concatenates documents anyway."""
    assert resolve(recipe(f"stage: {stage}\n{key}: true\n"))[key] is True


def test_label_smoothing_is_for_pt_and_sft_and_below_one(recipe):
    """label_smoothing_factor: pt and sft take it; dpo, kto and rm are refused with the reason (LLaMA-Factory's
    losses there ignore it; dpo's own key is dpo_label_smoothing); 0 <= eps < 1 (at 1 the target token would count
    for nothing)."""
    for stage in ("pt", "sft"):
        assert resolve(recipe(f"stage: {stage}\nlabel_smoothing_factor: 0.1\n"))["label_smoothing_factor"] == 0.1
    assert resolve(recipe("stage: dpo\nlabel_smoothing_factor: 0.0\n"))["label_smoothing_factor"] == 0.0
    messages = errors(recipe("stage: dpo\nlabel_smoothing_factor: 0.1\n"))
    assert len(messages) == 1 and messages[0].endswith(
        "label_smoothing_factor: given 0.1, but it has no meaning for stage: dpo (LLaMA-Factory's dpo ignores it too; "
        "use dpo_label_smoothing, dpo's own label smoothing (conservative DPO, pref_loss: sigmoid)); remove it"), messages
    for stage, why in (("kto", "KTO's loss has no label smoothing"), ("rm", "the pairwise loss has no label smoothing")):
        messages = errors(recipe(f"stage: {stage}\nlabel_smoothing_factor: 0.1\n"))
        assert len(messages) == 1 and why in messages[0], messages
    for value in ("1.0", "-0.1"):
        messages = errors(recipe(f"label_smoothing_factor: {value}\n"))
        assert len(messages) == 1 and "label_smoothing_factor" in messages[0] and "< 1" in messages[0], messages


def test_dft_and_eaft_losses_are_sft_keys_one_at_a_time(recipe):
    """use_dft_loss / use_eaft_loss (LLaMA-Factory's sft compute_loss_func): sft takes either; the other stages are
    refused (LLaMA-Factory's other trainers ignore the keys); both at once, or either with label_smoothing_factor,
    refuse the key LLaMA-Factory would ignore (it takes DFT first, and compute_loss_func replaces transformers'
    label smoother); eaft_alpha without use_eaft_loss would be ignored too."""
    for key in ("use_dft_loss", "use_eaft_loss", "use_asft_loss"):
        assert resolve(recipe(f"stage: sft\n{key}: true\n"))[key] is True
        for stage in ("pt", "dpo", "kto", "rm"):
            messages = errors(recipe(f"stage: {stage}\n{key}: true\n"))
            assert messages == [f"r.yaml:6:{len(key) + 3}: {key}: given true, but it has no meaning for stage: {stage} "
                                f"(LLaMA-Factory's {key.split('_')[1].upper()} loss is an sft loss: its other trainers ignore the "
                                "key); remove it"], messages
    r = resolve(recipe("stage: sft\nuse_eaft_loss: true\neaft_alpha: 0.5\n"))
    assert r["eaft_alpha"] == 0.5 and resolve(recipe("stage: sft\n"))["eaft_alpha"] == 1.0  # LLaMA-Factory's default
    assert errors(recipe("stage: sft\nuse_dft_loss: true\nuse_eaft_loss: true\n")) == [
        "r.yaml:7:16: use_eaft_loss: given true together with r.yaml:6:15: use_dft_loss true: LLaMA-Factory trains "
        "use_dft_loss's loss then and ignores use_eaft_loss (its sft trainer takes use_dft_loss before use_eaft_loss, "
        "and either replaces transformers' label smoother); set one of them"]
    messages = errors(recipe("stage: sft\nuse_eaft_loss: true\nlabel_smoothing_factor: 0.1\n"))
    assert len(messages) == 1 and messages[0].startswith(
        "r.yaml:7:25: label_smoothing_factor: given 0.1 together with r.yaml:6:16: use_eaft_loss true"), messages
    assert errors(recipe("stage: sft\neaft_alpha: 2\n")) == [
        "r.yaml:6:13: eaft_alpha: given 2, but it only weighs the EAFT loss and use_eaft_loss is not true; remove it "
        "or set use_eaft_loss: true"]
    # at its default too, as the settings of other features that are off (lora_rank: 8 under full, kto's weights)
    for lines, key in (("stage: sft\neaft_alpha: 1.0\n", "eaft_alpha"), ("stage: dpo\nkto_chosen_weight: 1.0\n",
                       "kto_chosen_weight"), ("finetuning_type: full\nlora_rank: 8\n", "lora_rank")):
        messages = errors(recipe(lines))
        assert len(messages) == 1 and f": {key}: " in messages[0], messages


def test_asft_loss_is_refused_beside_another_loss_or_token_accuracy(recipe):
    """LLaMA-Factory's compute_loss takes use_asft_loss first: it hands the reference's logits to the DFT / EAFT loss
    as num_items_in_batch (the step fails), ignores the label smoother, and returns no logits for token accuracy."""
    beside = {"use_dft_loss": ("true", "the step fails"), "use_eaft_loss": ("true", "the step fails"),
              "label_smoothing_factor": ("0.1", "ignores the label smoother"),
              "compute_accuracy": ("true", "the evaluation fails")}
    for key, (value, words) in beside.items():
        messages = errors(recipe(f"stage: sft\nuse_asft_loss: true\n{key}: {value}\n"))
        assert len(messages) == 1 and messages[0].startswith(
            f"r.yaml:7:{len(key) + 3}: {key}: given {value} together with r.yaml:6:16: use_asft_loss true: "
            "LLaMA-Factory's sft trainer takes use_asft_loss first") and words in messages[0], messages


def test_asft_alpha_needs_use_asft_loss_and_pissa_has_no_asft_reference(recipe):
    """asft_alpha alone would weigh nothing (at its default 0.1 too); under PiSSA the adapters-off model is the
    residual base, not the start ASFT's KL anchors to."""
    assert resolve(recipe("stage: sft\nuse_asft_loss: true\nasft_alpha: 0.05\n"))["asft_alpha"] == 0.05
    for value in ("0.05", "0.1"):
        assert errors(recipe(f"stage: sft\nasft_alpha: {value}\n")) == [
            f"r.yaml:6:13: asft_alpha: given {value}, but it only weighs the ASFT loss and use_asft_loss is not true; "
            "remove it or set use_asft_loss: true"]
    messages = errors(recipe("stage: sft\nuse_asft_loss: true\npissa_init: true\n"))
    assert len(messages) == 1 and messages[0].startswith("r.yaml:7:13: pissa_init: is true but use_asft_loss's KL term")


def test_asft_alpha_is_at_least_zero(recipe):
    """LLaMA-Factory's loss is DFT + asft_alpha x KL(reference || policy) (trainer_utils.py:740); KL is >= 0 and
    unbounded above, so a negative weight makes a loss without a lower bound: refused. 0 is DFT alone: accepted."""
    assert resolve(recipe("stage: sft\nuse_asft_loss: true\nasft_alpha: 0\n"))["asft_alpha"] == 0
    assert errors(recipe("stage: sft\nuse_asft_loss: true\nasft_alpha: -0.1\n")) == [
        "r.yaml:7:13: asft_alpha: given -0.1, expected a number >= 0"]


def test_ref_model_is_asfts_reference_under_sft(recipe):
    """LLaMA-Factory's create_ref_model reads ref_model for the ASFT loss too: accepted there (PiSSA then has its
    reference), refused under sft without use_asft_loss, saying which switch reads it."""
    assert resolve(recipe("stage: sft\nuse_asft_loss: true\nref_model: tiny\n"))["ref_model"] == "tiny"
    assert resolve(recipe("stage: sft\nuse_asft_loss: true\nref_model: tiny\npissa_init: true\n"))["pissa_init"]
    assert errors(recipe("stage: sft\nref_model: tiny\n")) == [
        "r.yaml:6:12: ref_model: is a preference-tuning setting but stage is sft; remove it or set stage: dpo (or "
        "use_asft_loss: true, whose KL term scores against it)"]


@pytest.mark.parametrize("stage, lines, key, words", [
    ("kto", "pref_loss: ipo\n", "pref_loss", "is a stage dpo setting; stage kto's loss is KTO's"),
    ("kto", "simpo_gamma: 1.0\n", "simpo_gamma", "is a stage dpo setting; stage kto's loss is KTO's"),
    ("dpo", "kto_chosen_weight: 2.0\n", "kto_chosen_weight", "is a stage kto setting; remove it or set stage: kto"),
    ("sft", "kto_rejected_weight: 0.5\n", "kto_rejected_weight",
     "is a preference-tuning setting but stage is sft; remove it or set stage: kto"),
    ("rm", "kto_chosen_weight: 2.0\n", "kto_chosen_weight",
     "is a preference-tuning setting but stage is rm; remove it or set stage: kto"),
    # LLaMA-Factory's KTO trainer has no BCO term and scores without ld_alpha; pt / sft / rm have no preference loss
    ("kto", "pref_bco_weight: 0.5\n", "pref_bco_weight", "is a stage dpo setting; stage kto's loss is KTO's"),
    ("kto", "ld_alpha: 0.5\n", "ld_alpha", "is a stage dpo setting; stage kto's loss is KTO's"),
    ("sft", "ld_alpha: 0.5\n", "ld_alpha", "is a preference-tuning setting but stage is sft; remove it or set stage: "
                                          "dpo"),
    ("rm", "pref_bco_weight: 0.5\n", "pref_bco_weight", "is a preference-tuning setting but stage is rm; remove it or "
                                                        "set stage: dpo"),
])
def test_preference_keys_the_stage_never_reads_are_refused(recipe, stage, lines, key, words):
    """LLaMA-Factory's KTO trainer reads pref_beta, pref_ftx, ref_model and kto_*_weight only: the others would be
    ignored without a word under kto, and the kto weights under any other stage."""
    messages = errors(recipe(f"stage: {stage}\n{lines}"))
    assert len(messages) == 1 and f"{key}: {words}" in messages[0], messages


@pytest.mark.parametrize("loss", ["orpo", "simpo"])
def test_bco_weight_needs_a_loss_with_a_reference(recipe, loss):
    """LLaMA-Factory adds the BCO term in its reference branch only (CustomDPOTrainer.compute_preference_loss):
    with orpo / simpo the weight would be ignored without a word. ld_alpha applies to every dpo loss."""
    messages = errors(recipe(f"stage: dpo\npref_loss: {loss}\npref_bco_weight: 0.5\n"))
    assert messages == [f"r.yaml:7:18: pref_bco_weight: is 0.5 but pref_loss {loss} uses no reference model, and the "
                        "BCO term classifies the rewards against it (LLaMA-Factory ignores it there); remove it, or "
                        "set pref_loss sigmoid, hinge or ipo"], messages
    assert resolve(recipe(f"stage: dpo\npref_loss: {loss}\nld_alpha: 0.5\n"))["ld_alpha"] == 0.5
    assert resolve(recipe("stage: dpo\npref_loss: ipo\npref_bco_weight: 0.5\n"))["pref_bco_weight"] == 0.5


@pytest.mark.parametrize("extra, said", [
    ("interleave_probs: 0.7,0.2,0.1", "given '0.7,0.2,0.1': 3 probabilities for 2 datasets in `dataset`: give one per "
                                      "dataset, in order"),
    ("interleave_probs: 0.7,x", "given '0.7,x': 'x' is not a number; expected one probability per dataset, e.g. "
                                "0.7,0.3 (numbers of 0 or more that sum to 1)"),
    ("interleave_probs: [1.5, -0.5]", "given [1.5, -0.5]: every probability must be a finite number of 0 or more"),
    ("interleave_probs: 0.7,0.2", "given '0.7,0.2': the probabilities sum to 0.9; they must sum to 1"),
    ("interleave_probs: 1,0", "given '1,0': a dataset of probability 0 is never drawn, so with mix_strategy "
                              "interleave_once the mix never ends; give it a probability above 0, use "
                              "interleave_under, or drop it from `dataset`"),
])
def test_interleave_probs_numpy_or_hf_would_refuse(recipe, extra, said):
    """LLaMA-Factory checks the count (data_args.py); numpy's choice the numbers (HF's interleave_datasets samples
    with it, after the datasets are loaded); a zero probability never ends interleave_over / interleave_once."""
    messages = errors(recipe(f"mix_strategy: interleave_once\n{extra}\n"), ["dataset=a,b"])
    assert messages == [f"r.yaml:6:19: interleave_probs: {said}"], messages


def test_interleave_probs_only_with_an_interleave_strategy(recipe):
    """LLaMA-Factory: "`interleave_probs` is only valid for interleaved mixing." One dataset mixes as itself."""
    messages = errors(recipe("interleave_probs: 0.5,0.5\n"), ["dataset=a,b"])
    assert messages == ["r.yaml:5:19: interleave_probs: given '0.5,0.5', but it only applies to an interleave "
                        "mix_strategy (interleave_under, interleave_over, interleave_once); remove it, or set "
                        "mix_strategy"], messages
    assert resolve(recipe("mix_strategy: interleave_over\ninterleave_probs: '1.0'\n"))["mix_strategy"] == \
        "interleave_over"


def test_interleaved_eval_datasets_take_the_same_probabilities(recipe):
    """An interleave mix_strategy interleaves several eval_datasets too, with interleave_probs (LLaMA-Factory's
    data_args: "The length of eval dataset and interleave probs should be identical."); a trained one is evaluated
    on its val split alone, which val_size 0 leaves empty (HF's interleave_datasets fails or gives no row)."""
    probs = recipe("mix_strategy: interleave_under\ninterleave_probs: 0.5,0.5\n")
    assert errors(probs, ["dataset=a,b", "eval_dataset=c"]) == [
        "r.yaml:6:19: interleave_probs: given '0.5,0.5': 2 probabilities for 1 datasets in `eval_dataset`: give one "
        "per dataset, in order"]
    assert resolve(probs, ["dataset=a,b", "eval_dataset=c,d"])["eval_dataset"] == ["c", "d"]
    assert errors(recipe("mix_strategy: interleave_over\nval_size: 0\n"), ["dataset=a,b", "eval_dataset=b,c"]) == [
        "command line override eval_dataset=b,c: eval_dataset: names 'b', which `dataset` trains on, so only its val split is evaluated, and val_size 0 "
        "holds none of its rows out: mix_strategy interleave_over would interleave an empty dataset into the "
        "evaluation; set val_size, or drop it from eval_dataset"]


def test_a_dataset_listed_twice_is_refused(recipe):
    """LLaMA-Factory keys the loaded datasets by name (loader._get_merged_dataset: datasets[name] = ...), so `a,a`
    reads a once; here it was read twice, and under interleave plan counted two datasets while one was read."""
    messages = errors(recipe("mix_strategy: interleave_under\ninterleave_probs: 0.5,0.5\n"), ["dataset=a, a"])
    assert len(messages) == 1 and messages[0].endswith(
        "dataset: given a, a: 'a' listed more than once; expected each dataset once (LLaMA-Factory reads a repeated "
        "name once). To weight a dataset, set mix_strategy interleave_under / interleave_over with interleave_probs, "
        "or register a copy under a second name in dataset_info.json"), messages
    assert errors(recipe(), ["eval_dataset=b,c,b"])[0].endswith(
        "eval_dataset: given b, c, b: 'b' listed more than once; expected each dataset once (LLaMA-Factory reads a "
        "repeated name once).")


def test_kto_accepts_its_keys(recipe):
    r = resolve(recipe("stage: kto\npref_beta: 0.2\npref_ftx: 0.5\nkto_chosen_weight: 1.5\n"
                       "kto_rejected_weight: 0.8\n"))
    assert (r["stage"], r["kto_chosen_weight"], r["kto_rejected_weight"]) == ("kto", 1.5, 0.8)
