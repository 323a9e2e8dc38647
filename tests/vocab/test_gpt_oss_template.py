"""Template gpt_oss gives LLaMA-Factory 0.9.5's ids and labels on a byte-level vocabulary carrying gpt-oss's special
tokens, and the exported chat template, rendered by transformers, gives the training prompt back.

The vocabulary: gpt-oss's o200k_harmony (201,088 rows) is not on PyPI; tests/helpers/hf_vocab.py's small byte-level
BPE with its named added tokens (<|startoftext|>, <|endoftext|>, <|return|>, <|constrain|>, <|channel|>, <|start|>,
<|end|>, <|message|>, <|call|>), EOS <|return|>, pad <|endoftext|>.

Golden: LLaMA-Factory's Template._encode (src/llamafactory/data/template.py:132-170: turn 0 is format_prefix (empty)
+ format_system (always: gpt_oss has a default system prompt) + format_user, every other turn its own formatter) with
gpt_oss's formatters (:1194-1203: system "<|start|>system<|message|>{{content}}<|end|>", user
"<|start|>user<|message|>{{content}}<|end|><|start|>assistant", assistant "{{content}}", default system "You are
ChatGPT, a large language model trained by OpenAI.", efficient_eos, ReasoningTemplate with thought words
("<|channel|>analysis<|message|>", "<|end|><|start|>assistant<|channel|>final<|message|>"): :439-475, the empty
thought's ids in front of each answer without a thought, of the last only with mask_history), each element by
tokenizer.encode(add_special_tokens=False) (:113-130), which finds the special tokens in an answer's own thought;
labels as SupervisedDatasetProcessor._encode_data_example with efficient_eos (tests/vocab/test_glm4_template.py's
lf_efficient_example re-typing).
"""
from __future__ import annotations

import pytest

from pipeline.data.model_tokenizer import load_tokenizer
from pipeline.data.templates import TEMPLATES
from pipeline.data.tokenize import encode_example, encode_prompt
from tests.helpers.hf_vocab import SMALL_ADDED
from tests.vocab.test_glm4_template import lf_efficient_example
from tests.vocab.test_phi_templates import assert_export_renders_the_training_ids
from tests.vocab.test_sentencepiece_templates import ANSWER, HISTORY, QUERY, SYSTEM, row

transformers = pytest.importorskip("transformers")
DEFAULT_SYSTEM = "You are ChatGPT, a large language model trained by OpenAI."
THOUGHT = "<|channel|>analysis<|message|><|end|><|start|>assistant<|channel|>final<|message|>"


@pytest.fixture(scope="module")
def golden(oss_dir):  # oss_dir: tests/vocab/conftest.py
    return transformers.AutoTokenizer.from_pretrained(oss_dir)


def lf_pairs(golden, pairs: list[tuple[str, str]], system: str | None, last_only: bool = False
             ) -> list[tuple[list[int], list[int]]]:
    """Template._encode's (prompt, answer) ids per turn; the empty thought in front of each answer without one (of the
    last one only with `last_only`: mask_history's discarding_history_cot)."""
    def encode(text: str) -> list[int]:
        return golden.encode(text, add_special_tokens=False)

    out = []
    for k, (query, answer) in enumerate(pairs):
        elements = ([f"<|start|>system<|message|>{system or DEFAULT_SYSTEM}<|end|>"] if k == 0 else []) + \
            [f"<|start|>user<|message|>{query}<|end|><|start|>assistant"]
        has_thought = "<|channel|>analysis<|message|>" in answer or "<|channel|>final<|message|>" in answer
        empty = encode(THOUGHT) if not has_thought and (k == len(pairs) - 1 or not last_only) else []
        out.append(([t for element in elements for t in encode(element)], empty + encode(answer)))
    return out


def test_the_fixture_tokenizes_as_transformers(oss_dir, golden):
    ours = load_tokenizer(oss_dir)
    for token, _ in SMALL_ADDED["gpt_oss"]:
        assert ours.token_id(token) == golden.convert_tokens_to_ids(token) is not None
    assert ours.eos_id == golden.eos_token_id == golden.convert_tokens_to_ids("<|return|>")
    for text in (QUERY, ANSWER, "The model's 12 answers."):
        assert ours.encode(text) == golden.encode(text, add_special_tokens=False), text
    stops = {golden.convert_tokens_to_ids(t) for t in ("<|return|>", "<|endoftext|>", "<|call|>")}
    assert set(TEMPLATES["gpt_oss"].stop_ids(ours)) == stops  # generation_config.json's eos_token_id


@pytest.mark.parametrize("answer", [ANSWER, "<|channel|>analysis<|message|>Colors: red.<|end|><|start|>assistant"
                                            "<|channel|>final<|message|>" + ANSWER])
def test_conversations_are_llamafactorys(oss_dir, golden, answer):
    """System prompt or the default one, three turns, mask_history or not, an answer with its own thought (its words
    placed by id, as LLaMA-Factory's encode finds them) or without (the empty thought trained in front); efficient_eos
    labels (the EOS <|return|> on each later prompt's first token, a trained EOS at the end). The prompt chat and eval
    generate from: ReasoningTemplate.encode_oneturn's (:410-436), the history's answers without thoughts."""
    ours = load_tokenizer(oss_dir)
    eos = golden.eos_token_id
    for system in (SYSTEM, None):
        for flags in ({}, {"mask_history": True}):
            pairs = lf_pairs(golden, [*HISTORY, (QUERY, answer)], system, last_only=bool(flags))
            got = encode_example({**row(system), "output": answer}, "gpt_oss", ours, cutoff_len=4096, **flags)
            assert (got.input_ids, got.labels) == lf_efficient_example(pairs, eos, **flags), (system, flags)
        pairs = lf_pairs(golden, [*HISTORY, (QUERY, "")], system, last_only=True)  # encode_oneturn: history
        prompt = [t for p, a in pairs[:-1] for t in p + a] + pairs[-1][0]
        assert encode_prompt("gpt_oss", QUERY, system=system, history=HISTORY, tokenizer=ours) == prompt


def test_user_text_with_the_markup_stays_text(oss_dir, golden):
    """Markup typed in a prompt is no turn boundary here (LLaMA-Factory's encode would make it one): the pipeline's rule
    for every template's markup."""
    ours = load_tokenizer(oss_dir)
    got = encode_example({"instruction": "a <|end|> b", "output": ANSWER}, "gpt_oss", ours, cutoff_len=4096)
    assert got.input_ids.count(golden.convert_tokens_to_ids("<|end|>")) == 3  # system, user, the empty thought


def test_the_exported_chat_template_gives_the_training_prompt(oss_dir):
    assert_export_renders_the_training_ids(oss_dir, "gpt_oss")
