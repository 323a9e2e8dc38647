"""Stage rm on a family added after Llama / GPT-2 / Qwen3-MoE, as a user drives it (test_rm_cli.check_rm_user_path:
LLaMA-Factory-format ranking pairs, build / train / merge as typed, merged/ by AutoModelForSequenceClassification and
adapter/ by PEFT scoring the pairs alike, the trainer's loss and accuracy recomputed from those scores).

Gemma 3 (Gemma3TextForSequenceClassification, transformers 5.24 modeling_gemma3.py): the tied embedding, which the
causal model also reads as its head, stays the scaled input embedding while the reward model's head is a new score;
the pad-pooled score sits after Gemma's sqrt(hidden) embedding scale, two RoPE tables and a sliding window shorter
than the rows. Granite stays refused at validate (tests/acceptance/test_granite_olmo2_cli.py): transformers 5.24 has
no GraniteForSequenceClassification to export to (checked: transformers.GraniteForSequenceClassification is absent).
"""
from __future__ import annotations

from tests.acceptance.test_rm_cli import check_rm_user_path
from tests.runtime.test_zero_families import CHECKPOINTS


def test_rm_on_a_save_pretrained_gemma3_exports_gemma3_text_for_sequence_classification(workdir):
    base = workdir / "gemma-3-1b-it"
    CHECKPOINTS["gemma3"](base)
    check_rm_user_path(workdir, base, "gemma3", "Gemma3TextForSequenceClassification")
