"""Cross-field rules: each a small named function with its own message, run after the schema check.

A rule declares the keys it reads; it is skipped when one of them already failed the schema (so one
mistake gives one message), and `commands` limits it to the commands where it matters.

Where a rule lives, by the keys it reads (each module's docstring lists them):
  training.py    precision, training length, warmup, batches, do_train/do_eval/do_predict, DeepSpeed offload,
                 the schedule's kwargs, gradient checkpointing, sft's DFT / EAFT losses
  optimizers.py  the client optimizers: Muon, GaLore, APOLLO, Adam-mini, BAdam
  method.py      LoRA keys and targets, OFT, PiSSA, LLaMA Pro, freeze's layers and modules
  model.py       model_name_or_path, model_revision, adapter_name_or_path, cutoff_len against the context, rope_scaling
  tokenizer.py   template against the vocabulary, added tokens, tokenizer_name_or_path
  stages.py      keys only some stages read (packing, train_on_prompt, mask_history, compute_accuracy, ...)
  data.py        dataset / eval_dataset, dataset_dir, val_size, the interleave mix, streaming
  preference.py  dpo / kto keys, ref_model, ref_model_adapters
  ppo.py         stage ppo: reward_model, the ppo keys, the parts implemented
  outputs.py     resume_from_checkpoint, adapter_name_or_path in the run's own checkpoints, export_dir, the upstream's one producer, the refused exports, report_to
  quantization.py  QLoRA's quantization_bit against the method, PiSSA, a sparse MoE model and the ZeRO stage
  prequantized.py  a pre-quantized bitsandbytes checkpoint against the quantization keys the recipe sets and the
                 tokens it adds and the score head stage rm trains (a head stored quantized)
  benchmark.py   task and the other keys of LLaMA-Factory's multiple-choice benchmarks (eval with task)
  refused.py     keys whose feature is not here, with the schema's reason (x-refused-when-set); beam sampling
  core.py        the machinery: Context, the `rule` decorator, the command lists

To add a rule: write it in its theme's module under `@rule(keys..., commands=...)` and list it in ORDER below
(importing this package fails while a declared rule is not listed).
"""
from __future__ import annotations

from typing import Any, Mapping

from pipeline.recipe.load import Origin
from pipeline.recipe.rules import (benchmark, data, method, model, optimizers, outputs, ppo, preference, prequantized,
                                   quantization, refused, stages, tokenizer, training)
from pipeline.recipe.rules.core import Context, Rule, in_order

__all__ = ["Context", "ORDER", "RULES", "Rule", "run"]


# The order the rules run in. resolve sorts the messages by the recipe line they name; those about one key, and
# all those about keys set on the command line or left at their default, keep this order.
ORDER = (
    training.fp16_and_bf16,
    training.fp16_needs_cuda,
    training.pure_bf16_fits,
    method.lora_keys_need_lora,
    method.oft_keys_need_oft,
    method.oft_rank_or_block_size,
    method.oft_target_is_lora_target,
    method.oft_needs_linear_layers,
    method.pissa_starts_a_lora,
    quantization.quantization_fits,
    prequantized.stored_quantization_matches,
    prequantized.added_tokens_fit_the_head,
    prequantized.score_head_trains,
    method.llama_pro_needs_freeze_or_lora,
    method.llama_pro_lora_can_train,
    method.llama_pro_oft_can_train,
    method.freeze_key_needs_freeze,
    method.freeze_layers_within_model,
    method.freeze_modules_need_freeze,
    method.freeze_modules_in_model,
    model.model_exists,
    model.cutoff_within_context,
    model.rope_scaling_applies,
    model.reward_class_exists,
    stages.stage_only_keys,
    method.lora_targets_exist,
    method.expert_lora_settings,
    method.moe_aux_loss_stages,
    tokenizer.template_fits_vocabulary,
    tokenizer.new_token_names_given,
    tokenizer.one_special_tokens_key,
    tokenizer.token_config_readable,
    tokenizer.tokenizer_fits_model,
    tokenizer.efficient_eos_template,
    model.adapter_exists,
    model.adapter_is_the_method,
    model.adapter_fits_model,
    training.training_length,
    training.warmup_once,
    training.enough_batches,
    outputs.checkpoint_exists,
    outputs.adapter_is_no_checkpoint_of_this_run,
    data.hub_dataset_dir,
    data.datasets_registered,
    data.datasets_listed_once,
    data.val_size_fits_data,
    data.val_size_zero_evaluates_nothing,
    training.offload_needs_zero,
    optimizers.muon_fits,
    optimizers.galore_fits,
    optimizers.apollo_fits,
    optimizers.low_rank_target_trains,
    optimizers.adam_mini_fits,
    optimizers.badam_fits,
    optimizers.badam_start_block_in_model,
    optimizers.optim_fits,
    optimizers.optim_args_parse,
    outputs.export_dir_has_one_owner,
    outputs.upstream_has_one_producer,
    data.refused_streaming,
    outputs.refused_exports,
    outputs.refused_hub_upload,
    refused.refused_when_set,
    refused.beam_sampling,
    model.main_revision_only,
    data.interleave_probs_valid,
    data.interleaved_eval_datasets_have_rows,
    training.something_to_do,
    outputs.reporters_installed,
    training.scheduler_kwargs,
    training.checkpointing_switches_agree,
    training.one_sft_loss,
    training.alpha_needs_its_loss,
    training.asft_alone,
    preference.pref_keys_need_dpo,
    preference.ref_model_needs_reference_loss,
    preference.label_smoothing_needs_sigmoid,
    preference.bco_needs_reference_loss,
    preference.ref_model_same_vocabulary,
    preference.ref_model_adapters_need_ref_model,
    preference.ref_model_adapters_exist,
    preference.ref_model_adapters_fit,
    ppo.ppo_needs_reward_model,
    ppo.ppo_parts_implemented,
    ppo.ppo_keys_need_ppo,
    benchmark.benchmark_keys_need_task,
    benchmark.task_names_a_split,
    benchmark.task_is_for_eval,
    benchmark.fewshot_is_for_benchmarks,
)
RULES: list[Rule] = in_order(ORDER)


def run(values: Mapping[str, Any], origins: Mapping[str, Origin], recipe_file: str, command: str | None,
        bad: set[str], built: bool = False) -> list[tuple[tuple, str]]:
    ctx = Context(values, origins, recipe_file, command, built)
    problems = []
    for r in RULES:
        if (r.commands is not None and command not in r.commands) or bad & set(r.keys):
            continue
        for key, message in r.func(ctx):
            problems.append((ctx.sort_key(key), f"{ctx.where(key)}: {message}"))
    return problems
