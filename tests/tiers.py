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
        "tests/reliability/test_reliability_kills.py",
        "tests/reliability/test_reliability_signals.py",
    ),
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
        "tests/acceptance/test_llama2_cli.py",
        "tests/acceptance/test_hf_checkpoint.py::test_lora_sft_from_a_save_pretrained_mistral_exports_mistral",
        "tests/acceptance/test_lora_all_moe_cli.py",  # Mixtral-style experts: tests/acceptance/test_qwen3_moe_cli.py
        "tests/acceptance/test_moe_expert_lora_cli.py",  # stays in the everyday suite
        "tests/acceptance/test_moe_families_cli.py",
    ),
    "make chains of several recipes or stages (each make runs build, validate, train and more, each a process)": (
        "tests/acceptance/test_make_inherited_output_dir.py",
        "tests/acceptance/test_make_resume_args.py",
        "tests/acceptance/test_make_upstreams.py::test_a_dpo_ref_model_from_the_sft_recipe_is_made_first",
    ),
    "further variants of a path the everyday suite takes (its first variant stays there)": (
        "tests/acceptance/test_dpo_cli.py::test_full_dpo_on_an_sft_adapter_is_evaluated_against_its_training_reference",
        "tests/acceptance/test_dpo_ld_bco_cli.py",  # dpo's own path: test_dpo_cli.py's LoRA run
        "tests/acceptance/test_new_tokens_cli.py",  # described special tokens: test_added_tokens_cli.py
        "tests/acceptance/test_packing_cli.py::test_eval_of_a_packed_run_counts_examples_not_packed_rows",
        "tests/train/test_checkpoint_resume.py::test_interrupted_and_resumed_run_equals_uninterrupted_bitwise"
        "[full-pure-bf16-adafactor]",  # exact resume: its LoRA rows
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
