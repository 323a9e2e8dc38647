"""Every key LLaMA-Factory's examples use (train_lora, train_full, merge_lora, inference; commented ones too) is
known to the recipe schema: implemented, or accepted with a notice. Read off LLaMA-Factory's examples/."""
from __future__ import annotations

import json
from pathlib import Path

SCHEMA = Path(__file__).resolve().parents[2] / "pipeline/recipe/schema/recipe.schema.json"

LLAMAFACTORY_EXAMPLE_KEYS = """
adapter_name_or_path cutoff_len dataloader_num_workers dataset dataset_dir ddp_timeout deepspeed do_train
eval_dataset eval_steps eval_strategy export_device export_dir export_legacy_format export_quantization_bit
export_quantization_dataset export_size finetuning_type freeze_language_model freeze_multi_modal_projector
freeze_vision_tower gradient_accumulation_steps gradient_checkpointing gradient_checkpointing_kwargs
image_max_pixels infer_backend learning_rate logging_steps lora_rank lora_target lr_scheduler_type max_samples
model_name_or_path num_train_epochs output_dir overwrite_output_dir packing per_device_eval_batch_size
per_device_train_batch_size plot_loss pref_beta pref_loss preprocessing_num_workers ray_init_kwargs
ray_num_workers report_to resume_from_checkpoint save_only_model save_steps stage template tokenized_path
trust_remote_code use_reentrant_gc val_size video_fps video_max_pixels video_maxlen warmup_ratio
""".split()
PREFERENCE_KEYS = {"pref_beta", "pref_loss"}  # preference tuning (stage dpo) brings these


def test_every_example_key_is_known():
    props = json.loads(SCHEMA.read_text("utf-8"))["properties"]
    missing = sorted(k for k in LLAMAFACTORY_EXAMPLE_KEYS if k not in props and k not in PREFERENCE_KEYS)
    assert missing == []


def test_no_effect_keys_say_why():
    props = json.loads(SCHEMA.read_text("utf-8"))["properties"]
    for key, prop in props.items():
        if "x-no-effect" in prop:
            assert prop["description"].startswith("Accepted from LLaMA-Factory recipes without effect"), key
            assert prop["x-no-effect"] in prop["description"], key


def test_lf_values_not_implemented_here_are_refused_with_the_reason(tmp_path):
    """docs/coming-from-llama-factory.md promises `reward_model_type: oft` and `infer_backend: vllm|sglang|ktransformers`
    "refused, with the reason in the message"; they got only "expected one of ..." (stage: ppo was refused so too
    before it was implemented, and reward_model_type: api)."""
    from tests.acceptance.harness import pipeline

    (tmp_path / "r.yaml").write_text("model_name_or_path: tiny\ndataset: x\nmax_steps: 1\n", encoding="utf-8")
    for override, reason in (("reward_model_type=oft", "an OFT reward adapter is not supported here"),
                             ("infer_backend=vllm", "vLLM is not available here"),
                             ("infer_backend=sglang", "SGLang is not available here"),
                             ("infer_backend=ktransformers", "KTransformers is not available here")):
        # the first as typed; the further refusals in this process (the same messages, no interpreter start each)
        err = pipeline("validate", "r.yaml", override, cwd=tmp_path, as_typed=override == "reward_model_type=api",
                       expect=2).stderr
        key, _, value = override.partition("=")
        assert f"{key}: given '{value}', expected one of" in err and reason in err, err
        assert "Traceback" not in err


def test_lf_keys_outside_the_examples_not_implemented_here_are_refused_with_the_reason(tmp_path):
    """export_hub_model_id (merge recipes: push the export to the hub) and beam search with sampling (num_beams > 1
    with do_sample: true) got only "unknown key": a LLaMA-Factory user could not tell a typo from a feature this
    pipeline does not have. Their neutral values pass, and so does beam search without sampling."""
    from tests.acceptance.harness import pipeline

    (tmp_path / "r.yaml").write_text("model_name_or_path: tiny\ndataset: x\nmax_steps: 1\n", encoding="utf-8")
    for overrides, reason in ((["export_hub_model_id=me/merged"], "hf upload me/merged"),
                              (["num_beams=4", "do_sample=true"], "beam search with sampling is not implemented")):
        err = pipeline("validate", "r.yaml", *overrides, cwd=tmp_path, as_typed=False, expect=2).stderr
        assert f"{overrides[0].partition('=')[0]}:" in err and reason in err and "unknown key" not in err, err
        assert "Traceback" not in err
    for override in ("export_hub_model_id=null", "num_beams=1", "num_beams=4"):
        err = pipeline("validate", "r.yaml", override, cwd=tmp_path, as_typed=False, expect=None).stderr
        assert override.partition("=")[0] not in err, err


def test_a_lora_runs_output_as_model_name_or_path_says_to_name_it_as_the_adapter(tmp_path):
    """A merge_lora recipe with the LoRA run in model_name_or_path (and no adapter_name_or_path) got "no config.json
    in this directory; a model directory holds config.json + model.safetensors", which does not say what to change."""
    import json

    from tests.acceptance.harness import pipeline

    for adapter in (tmp_path / "saves/run/adapter", tmp_path / "peft"):
        adapter.mkdir(parents=True)
        (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "Qwen/Qwen3-0.6B"}))
    for given, adapter in (("saves/run", "saves/run"), ("peft", "peft")):
        (tmp_path / "r.yaml").write_text(f"model_name_or_path: {given}\nexport_dir: out\n", encoding="utf-8")
        err = pipeline("export", "r.yaml", cwd=tmp_path, as_typed=given == "saves/run", expect=2).stderr
        assert "LoRA adapter" in err and f"adapter_name_or_path: {adapter}" in err, err
        assert "model_name_or_path: Qwen/Qwen3-0.6B" in err and "Traceback" not in err, err


def test_qlora_and_dpo_extras_are_refused_with_the_reason_and_pass_at_their_defaults(tmp_path):
    """LLaMA-Factory's QLoRA recipes (examples/train_qlora: quantization_bit 4, quantization_method bnb) got
    "quantization_bit: unknown key (did you mean 'export_quantization_bit'?)", which points at the wrong feature;
    QLoRA now trains, stage dpo included (tests/acceptance/test_qlora_dpo_cli.py; ppo hears why not:
    tests/recipe/test_qlora_rules.py); its dpo extras (ref_model_adapters, ref_model_quantization_bit, pref_loss kto_pair) got "unknown key". Each is
    now refused with its reason; at LLaMA-Factory's defaults they pass (pref_bco_weight and ld_alpha, refused here
    before, train: tests/acceptance/test_dpo_ld_bco_cli.py; ref_model_adapters too:
    tests/compat/test_ref_model_adapters_example.py)."""
    from tests.acceptance.harness import pipeline

    (tmp_path / "r.yaml").write_text("model_name_or_path: tiny\ndataset: x\nmax_steps: 1\nstage: dpo\n",
                                     encoding="utf-8")
    for override, reason in (("ref_model_quantization_bit=8", "a quantized reference model is not implemented"),
                             ("pref_loss=kto_pair", "kto_pair loss is not implemented")):
        err = pipeline("validate", "r.yaml", override, cwd=tmp_path, as_typed=False, expect=2).stderr
        key = override.partition("=")[0]
        assert f"{key}: given" in err and reason in err and "unknown key" not in err, err
        assert "export_quantization_bit" not in err and "Traceback" not in err, err
    err = pipeline("validate", "r.yaml", "quantization_bit=4", cwd=tmp_path, as_typed=False, expect=None).stderr
    assert "quantization_bit" not in err and "unknown key" not in err, err  # QLoRA dpo: no word on the key
    neutral = ("quantization_bit=null", "pref_bco_weight=0", "ld_alpha=null", "quantization_method=bnb",
               "quantization_type=nf4", "double_quantization=true")
    err = pipeline("validate", "r.yaml", *neutral, cwd=tmp_path, as_typed=False, expect=None).stderr
    assert "error: command line override" not in err and "given" not in err, err
    assert "quantization_method: accepted without effect: it only matters with quantization_bit" in err, err


def test_flash_attn_is_accepted_with_a_notice_and_a_wrong_value_is_refused(tmp_path):
    """LLaMA-Factory recipes often set flash_attn (fa2, sdpa, ...): it was an "unknown key" with no suggestion. The
    attention path here follows the device and precision, so the key is accepted with a notice saying so; a value
    LLaMA-Factory does not know either is refused with its choices."""
    from tests.acceptance.harness import pipeline

    (tmp_path / "r.yaml").write_text("model_name_or_path: tiny\ndataset: x\nmax_steps: 1\nflash_attn: fa2\n",
                                     encoding="utf-8")
    err = pipeline("validate", "r.yaml", cwd=tmp_path, as_typed=False, expect=None).stderr
    assert "flash_attn: accepted without effect: the attention path is chosen per device and precision" in err, err
    assert "unknown key" not in err
    err = pipeline("validate", "r.yaml", "flash_attn=fa4", cwd=tmp_path, as_typed=False, expect=2).stderr
    assert "flash_attn: given 'fa4', expected one of auto, disabled, sdpa, fa2, fa3" in err and "Traceback" not in err


# Keys LLaMA-Factory users' own recipes carry beyond its examples/ (transformers' TrainingArguments and
# LLaMA-Factory's model/finetuning arguments): each was "unknown key". value given -> what the message says.
NO_EFFECT = {"tf32": ("true", "TF32 matmuls are not switched on"),
             "dataloader_pin_memory": ("false", "batches are moved to the device from ordinary memory"),
             "use_fast_tokenizer": ("true", "the tokenizer is always the fast one"),
             "include_num_input_tokens_seen": ("true", "trainer_log.jsonl always records tokens_seen"),
             "run_name": ("demo", "it names the run in wandb, and report_to (none) sends nothing there"),
             "pissa_iter": ("16", "it only matters with pissa_init: true (PiSSA)")}
REFUSED = {"optim": ("adamw_8bit", ("expected one of adamw_torch_fused, adamw_torch, adamw_hf, sgd, adagrad, rmsprop, "
                                    "adafactor: adamw_8bit (bitsandbytes' 8-bit/paged AdamW) is not available")),
           "torch_compile": ("true", "torch.compile is not used here"),
           "new_special_tokens": ("'<tool>,'", "given '<tool>,', which holds an empty token name; expected token names"),
           "rope_scaling": ("yarn", "a gpt2 model has learned positions (no rotary embedding to scale)"),
           "freeze_trainable_modules": ("mlp", "but it only applies to finetuning_type: freeze (here lora)"),
           "freeze_extra_modules": ("embed_tokens", "but it only applies to finetuning_type: freeze (here lora)"),
           "lr_scheduler_kwargs": ("{min_lr_rate: 0.1}", "only lr_scheduler_type: cosine_with_min_lr reads scheduler"),
           "split": ("test", "split: given 'test', expected one of train")}
# LLaMA-Factory's (transformers') defaults, and the values that name what runs here: quiet
NEUTRAL = {"optim": "adamw_torch", "optim_args": "null", "torch_compile": "false", "resize_vocab": "false", "split": "train",
           "freeze_trainable_modules": "all", "compute_accuracy": "false", "label_smoothing_factor": "0.0",
           "lr_scheduler_kwargs": "null", "rope_scaling": "null", "new_special_tokens": "null",
           "save_strategy": "steps", "logging_strategy": "epoch", "disable_shuffling": "true",
           "pissa_init": "false"}


def test_users_training_argument_keys_are_noticed_refused_or_quiet(tmp_path):
    """A recipe with LLaMA-Factory's neutral values of these keys validates without a word about them; a key without
    effect here gets one notice line with the reason (at the line that sets it); a value whose feature is absent is
    refused, with the reason and what to do instead, all in one run, without a traceback."""
    from tests.acceptance.harness import pipeline

    head = "model_name_or_path: tiny\ndataset: x\nmax_steps: 1\n"
    body = "".join(f"{key}: {value}\n" for key, value in NEUTRAL.items())
    body += "".join(f"{key}: {value}\n" for key, (value, _) in NO_EFFECT.items())
    (tmp_path / "r.yaml").write_text(head + body, encoding="utf-8")
    lines = pipeline("validate", "r.yaml", cwd=tmp_path, as_typed=False, expect=None).stderr.splitlines()
    for key in {*NEUTRAL, *NO_EFFECT}:
        assert not any(f" {key}:" in line for line in lines if line.startswith("error")), (key, lines)
        notices = [line for line in lines if line.startswith("notice:") and f": {key}: accepted without effect" in line]
        assert len(notices) == (key in NO_EFFECT), (key, lines)
        if key in NO_EFFECT:
            assert NO_EFFECT[key][1] in notices[0] and notices[0].startswith("notice: r.yaml:"), notices
    assert not any("unknown key" in line for line in lines), lines

    (tmp_path / "r.yaml").write_text(head + "".join(f"{k}: {v}\n" for k, (v, _) in REFUSED.items()), "utf-8")
    failed = pipeline("validate", "r.yaml", cwd=tmp_path, as_typed=False, expect=2)
    lines = failed.stderr.splitlines()
    for key, (_, reason) in REFUSED.items():
        assert any(line.startswith("error: r.yaml:") and f" {key}: given" in line and reason in line
                   for line in lines), (key, lines)
    assert "Traceback" not in failed.stderr and "unknown key" not in failed.stderr
