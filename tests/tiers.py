"""Which tests are long trials (marked `slow`) besides those marked where they are written.

Why: `make test`, the suite run while working, must end within 20 minutes on 2 cores; the long trials, which
`make test-slow` and CI (.ci/run) run, take the rest. The everyday suite keeps every unit test and, for each
capability, the test of the user's path on its headline families (GPT-2, Llama, Qwen): the CLI from files users bring
to transformers / PEFT loading our outputs. A long trial is one of the kinds below: it repeats a path the everyday
suite takes on another family or variant, or needs several processes a run (ranks, kills, signals, make chains).
Kept here as data, one reason per group, so the boundary is read and moved in one place; a test marked in place
(`@pytest.mark.slow` with its reason) is a long trial too. Entries are node-id prefixes: a file, a test, or one
parametrized case.
"""
from __future__ import annotations

import pytest

LONG_TRIALS: dict[str, tuple[str, ...]] = {
    "several ranks (the deepspeed launcher starts two processes a run; the everyday suite trains on one)": (
        "tests/compat/test_ppo_multirank.py",
        "tests/evaluate/test_eval_pipeline.py::test_eval_on_two_ranks_equals_one_rank",
        "tests/runtime/test_zero_families.py",
        "tests/train/test_multinode.py",
        "tests/train/test_multirank.py",
        "tests/train/test_resume_world_size.py",
    ),
    "kills and signals (each trial runs, stops and resumes a run: several processes)": (
        "tests/acceptance/test_user_paths.py::test_resume_after_a_crash_equals_the_uninterrupted_run_bitwise",
        "tests/reliability/test_reliability_kills.py",
        "tests/reliability/test_reliability_replace.py::"
        "test_merged_is_always_whole_when_a_merge_over_it_is_killed_at_the_swap",
        "tests/reliability/test_reliability_signals.py",
        "tests/train/test_failures.py::test_sigterm_saves_a_checkpoint_and_exits_143_then_resume_finishes",
    ),
    # MoE stays in the everyday suite with test_qwen3_moe_cli.py; rm with test_rm_cli.py's [llama]; tokenizers with
    # Llama 3's and Qwen's (tiktoken-style) vocabularies
    "the user's path on further families (the everyday suite takes it on GPT-2, Llama and Qwen)": (
        "tests/acceptance/test_deepseek_r1_distill_cli.py",
        "tests/acceptance/test_deepseek_v3_cli.py",
        "tests/acceptance/test_gemma2_cli.py",
        "tests/acceptance/test_gemma3_multimodal_cli.py",
        "tests/acceptance/test_gemma_cli.py",
        "tests/acceptance/test_glm4_cli.py",
        "tests/acceptance/test_glm4_moe_cli.py",
        "tests/acceptance/test_gpt_oss_cli.py",
        "tests/acceptance/test_granite_olmo2_cli.py",
        "tests/acceptance/test_hf_checkpoint.py::test_lora_sft_from_a_save_pretrained_mistral_exports_mistral",
        "tests/acceptance/test_llama2_cli.py",
        "tests/acceptance/test_lora_all_moe_cli.py",
        "tests/acceptance/test_moe_expert_lora_cli.py",
        "tests/acceptance/test_moe_families_cli.py",
        "tests/acceptance/test_phi3_cli.py",
        "tests/acceptance/test_rm_cli.py::test_rm_train_merge_eval_loads_in_transformers_and_peft[gpt2]",
        "tests/acceptance/test_rm_cli.py::test_rm_train_merge_eval_loads_in_transformers_and_peft[qwen3_moe]",
        "tests/acceptance/test_rm_families_cli.py",
        "tests/acceptance/test_sentencepiece_cli.py",
        "tests/acceptance/test_tools_glm4_cli.py",
        "tests/acceptance/test_vl_text_cli.py",
        "tests/vocab/test_sentencepiece_tokenizers.py",
    ),
    "chains of several recipes or stages (each runs build, validate, train and more, each a process)": (
        "tests/acceptance/test_make_inherited_output_dir.py",
        "tests/acceptance/test_make_resume_args.py",
        "tests/acceptance/test_make_upstreams.py::test_a_dpo_ref_model_from_the_sft_recipe_is_made_first",
        "tests/acceptance/test_make_upstreams.py::test_train_from_an_export_makes_the_export_and_its_training_first",
        "tests/compat/test_ppo_example.py::test_rm_then_ppo_examples_through_the_cli",
    ),
    # dpo stays with test_dpo_cli.py's LoRA run, QLoRA with test_qlora_cli.py, pre-quantized checkpoints with
    # test_prequantized_cli.py, new tokens with test_added_tokens_cli.py, exact resume with its LoRA rows
    "further variants of a path the everyday suite takes (its first variant stays there)": (
        "tests/acceptance/test_dpo_cli.py::test_full_dpo_on_an_sft_adapter_is_evaluated_against_its_training_reference",
        "tests/acceptance/test_dpo_ld_bco_cli.py",
        "tests/acceptance/test_new_tokens_cli.py",
        "tests/acceptance/test_packing_cli.py::test_eval_of_a_packed_run_counts_examples_not_packed_rows",
        "tests/acceptance/test_prequant_h195.py::"
        "test_dpo_on_the_prequantized_checkpoint_resumes_exactly_and_peft_loads_its_adapter",
        "tests/acceptance/test_prequantized_more_cli.py",
        "tests/acceptance/test_pure_bf16_dpo_eval_cli.py",
        "tests/acceptance/test_qlora_dpo_cli.py",
        "tests/acceptance/test_rope_scaling_cli.py::"
        "test_dynamic_from_the_recipe_trains_merges_and_loads_in_transformers",
        "tests/compat/test_ref_model_adapters_example.py",
        "tests/model/test_peft_moe_targets.py::"
        "test_a_strings_lora_on_fused_experts_computes_pefts_outputs[deepseek_v3]",
        "tests/model/test_peft_moe_targets.py::"
        "test_a_strings_lora_on_fused_experts_computes_pefts_outputs[glm4_moe]",
        "tests/model/test_peft_moe_targets.py::"
        "test_a_strings_lora_on_fused_experts_computes_pefts_outputs[mixtral]",
        "tests/train/test_checkpoint_resume.py::test_interrupted_and_resumed_run_equals_uninterrupted_bitwise"
        "[full-pure-bf16-adafactor]",
    ),
    "further optimizers and adapter methods through the CLI (their checks against the reference implementations, "
    "in tests/train and tests/model, stay in the everyday suite)": (
        "tests/acceptance/test_dora_cli.py",
        "tests/acceptance/test_loraplus_neftune_cli.py",
        "tests/acceptance/test_pissa_cli.py",
        "tests/compat/test_adafactor_example.py",
        "tests/compat/test_adam_mini_example.py",
        "tests/compat/test_badam_example.py",
        "tests/compat/test_badam_ratio_example.py",
        "tests/compat/test_low_rank_examples.py",
        "tests/compat/test_muon_example.py",
        "tests/compat/test_oft_example.py",
        "tests/train/test_transformers_optims.py::test_a_pure_bf16_run_resumes_bitwise",
        "tests/train/test_transformers_optims.py::"
        "test_bf16_mixed_precision_steps_the_fp32_masters_as_transformers_optimizer",
    ),
}


def is_long_trial(nodeid: str) -> bool:
    return any(nodeid == p or nodeid.startswith(p + "::") or nodeid.startswith(p + "[")
               for prefixes in LONG_TRIALS.values() for p in prefixes)


@pytest.hookimpl(tryfirst=True)  # before `-m` deselects: the mark decides the tier
def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if is_long_trial(item.nodeid):
            item.add_marker(pytest.mark.slow)
