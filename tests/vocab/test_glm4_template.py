"""Templates glm4 and glmz1 give LLaMA-Factory 0.9.5's ids and labels on a GLM-4-like byte-level vocabulary, and the exported chat
template, rendered by transformers, gives them back.

The vocabulary: GLM-4's is tiktoken-style (151,552 rows), not on PyPI; tests/helpers/hf_vocab.py's small byte-level BPE
with GLM-4-9B-0414's added tokens in their order (<|endoftext|>, [MASK], [gMASK], [sMASK], <sop>, <eop>, <|system|>,
<|user|>, <|assistant|>, <|observation|>), EOS and pad <|endoftext|>, no BOS, checked here against AutoTokenizer.

Golden: LLaMA-Factory's Template._encode (src/llamafactory/data/template.py:132-170: turn 0 is format_prefix +
format_system (when there is a system prompt) + format_user, every other turn its own formatter) with glm4's
formatters (:1081-1092: prefix "[gMASK]<sop>", system "<|system|>\\n{{content}}", user
"<|user|>\\n{{content}}<|assistant|>", assistant "\\n{{content}}", efficient_eos; glmz1 :1178-1191 the same as a
ReasoningTemplate, :439-475: an empty thought's ids in front of each answer without a thought, the last one only
with mask_history), each element turned into ids by
Template._convert_elements_to_ids (:113-130, add_special_tokens=False) on AutoTokenizer; labels as
SupervisedDatasetProcessor._encode_data_example (processor/supervised.py:58-104) with efficient_eos re-typed in
lf_efficient_example.
"""
from __future__ import annotations

import pytest

from pipeline.data.model_tokenizer import load_tokenizer
from pipeline.data.templates import TEMPLATES
from pipeline.data.tokenize import NO_ROOM, encode_example, encode_prompt, encode_rows
from tests.helpers.hf_vocab import SMALL_ADDED
from tests.vocab.chat_render import render
from tests.vocab.test_chat_template import messages
from tests.vocab.test_phi_templates import assert_export_renders_the_training_ids
from tests.vocab.test_sentencepiece_templates import ANSWER, HISTORY, QUERY, SYSTEM, lf_ids, row

transformers = pytest.importorskip("transformers")
M = -100


@pytest.fixture(scope="module")
def golden(glm_dir):  # glm_dir: tests/vocab/conftest.py
    return transformers.AutoTokenizer.from_pretrained(glm_dir)


def lf_pairs(golden, pairs: list[tuple[str, str]], system: str | None, thought: str = "",
             last_only: bool = False) -> list[tuple[list[int], list[int]]]:
    """Template._encode's (prompt, answer) ids per turn, each formatter's string one element; ReasoningTemplate's
    `thought` ids (get_thought_word_ids) in front of every answer, or of the last one with `last_only`."""
    out = []
    for k, (query, answer) in enumerate(pairs):
        prompt = (["[gMASK]<sop>"] + ([f"<|system|>\n{system}"] if system else []) if k == 0 else []) + \
            [f"<|user|>\n{query}<|assistant|>"]
        empty = golden.encode(thought, add_special_tokens=False) if k == len(pairs) - 1 or not last_only else []
        out.append(([t for element in prompt for t in lf_ids(golden, [(element, "")])[0][0]],
                    empty + lf_ids(golden, [("\n" + answer, "")])[0][0]))
    return out


def lf_efficient_example(pairs: list[tuple[list[int], list[int]]], eos: int, *, mask_history: bool = False,
                         ) -> tuple[list[int], list[int]]:
    """SupervisedDatasetProcessor._encode_data_example with efficient_eos (no truncation): the turns reversed under
    mask_history; a source's first label is the EOS for turn_idx != 0; the targets of turn_idx != 0 masked under
    mask_history; a trained EOS appended."""
    input_ids: list[int] = []
    labels: list[int] = []
    for turn_idx, (source, target) in enumerate(pairs[::-1] if mask_history else pairs):
        source_label = [eos] + [M] * (len(source) - 1) if turn_idx != 0 else [M] * len(source)
        target_label = [M] * len(target) if mask_history and turn_idx != 0 else target
        if mask_history:
            input_ids, labels = source + target + input_ids, source_label + target_label + labels
        else:
            input_ids, labels = input_ids + source + target, labels + source_label + target_label
    return input_ids + [eos], labels + [eos]


def test_the_fixture_tokenizes_as_transformers(glm_dir, golden):
    """Our tokenizer of the folder: the special tokens' ids, EOS / pad as the configs name them (no BOS), and plain
    text's ids equal AutoTokenizer's; generation stops at GLM's three ids (generation_config.json)."""
    ours = load_tokenizer(glm_dir)
    for token, _ in SMALL_ADDED["glm4"]:
        assert ours.token_id(token) == golden.convert_tokens_to_ids(token) is not None
    assert (ours.bos_id, ours.eos_id, golden.bos_token_id) == (None, golden.eos_token_id, None)
    assert golden.convert_ids_to_tokens(golden.pad_token_id) == "<|endoftext|>"
    for text in (QUERY, ANSWER, "  two  spaces\n\nand tabs\t!", "The model's 12 answers."):
        assert ours.encode(text) == golden.encode(text, add_special_tokens=False), text
    stops = {golden.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|user|>", "<|observation|>")}
    assert set(TEMPLATES["glm4"].stop_ids(ours)) == stops


@pytest.mark.parametrize("name", ["glm4", "glmz1"])
def test_conversations_are_llamafactorys(glm_dir, golden, name):
    """System prompt or none, three turns, mask_history or not: LLaMA-Factory's ids and its efficient_eos labels
    (the EOS on each later <|user|>, a trained EOS at the end), glmz1's empty thoughts; the prompt eval and chat
    generate from is the training prompt (no EOS between turns, no thoughts in the history: encode_oneturn's)."""
    ours = load_tokenizer(glm_dir)
    eos = golden.eos_token_id
    thought = "<think>\n\n</think>\n\n" if name == "glmz1" else ""
    for system in (SYSTEM, None):
        for flags in ({}, {"mask_history": True}):
            pairs = lf_pairs(golden, [*HISTORY, (QUERY, ANSWER)], system, thought, last_only=bool(flags))
            got = encode_example(row(system), name, ours, cutoff_len=4096, **flags)
            assert (got.input_ids, got.labels) == lf_efficient_example(pairs, eos, **flags), (system, flags)
        pairs = lf_pairs(golden, [*HISTORY, (QUERY, ANSWER)], system)
        prompt = [t for p, a in pairs[:-1] for t in p + a] + pairs[-1][0]
        assert encode_prompt(name, QUERY, system=system, history=HISTORY, tokenizer=ours) == prompt
    # the EOS labels sit on tokens that are not the EOS: on the second and third <|user|>
    user = golden.convert_tokens_to_ids("<|user|>")
    got = encode_example(row(None), "glm4", ours, cutoff_len=4096)
    assert [i for i, (t, y) in enumerate(zip(got.input_ids, got.labels)) if y == eos and t != eos] == \
        [i for i, t in enumerate(got.input_ids) if t == user][1:]


def test_the_exported_chat_template_gives_the_training_ids(glm_dir):
    """transformers' apply_chat_template with the chat template merge / export write: the generation prompt is
    encode_prompt's, a whole conversation the training row's ids (mask_history's rendering, its final EOS too)."""
    assert_export_renders_the_training_ids(glm_dir, "glm4")


def test_glmz1s_chat_template_gives_the_training_prompt_and_text(glm_dir):
    """glmz1's generation prompt is encode_prompt's ids; a whole conversation is the training row's text, not its
    ids: training encodes the empty thought ("...</think>\\n\\n") and the answer ("\\n...") apart, as LLaMA-Factory
    does, and a byte-level vocabulary merges "\\n\\n\\n" across them when the string is tokenized whole."""
    for text in assert_export_renders_prompt_and_text(glm_dir, "glmz1"):
        assert "</think>\n\n\n" + ANSWER + "<|endoftext|>" in text


def assert_export_renders_prompt_and_text(glm_dir, name: str) -> list[str]:
    """The exported chat template of template `name`, rendered by transformers: the generation prompt is
    encode_prompt's ids and a whole conversation the mask_history training row's text, with a system prompt and
    without; returns those texts."""
    ours, template = load_tokenizer(glm_dir), TEMPLATES[name]
    texts = []
    for system in (SYSTEM, None):
        want = encode_prompt(template, QUERY, system=system, history=HISTORY, tokenizer=ours)
        assert render(glm_dir, template, messages(system, HISTORY, QUERY)) == want
        whole = encode_example(row(system), template, ours, cutoff_len=4096, mask_history=True).input_ids
        texts.append(render(glm_dir, template, messages(system, HISTORY, QUERY, ANSWER), add_generation_prompt=False,
                            tokenize=False))
        assert texts[-1] == ours.decode(whole)
    return texts


def test_truncation_keeps_the_final_eos(glm_dir, golden):
    """overlength_policy truncate on an efficient_eos row ends it with the trained EOS, as LLaMA-Factory 0.9.5 does:
    _encode_data_example (processor/supervised.py:68-104) reserves one token for it (total_length starts at 1) and
    appends it after the cut. One turn with a short prompt: infer_seqlen (processor_utils.py) keeps the prompt and
    cutoff_len - 1 - len(prompt) answer tokens, then the EOS."""
    ours, eos = load_tokenizer(glm_dir), golden.eos_token_id
    [(source, target)] = lf_pairs(golden, [(QUERY, ANSWER * 8)], None)
    cutoff = len(source) + 5
    got = encode_example({"instruction": QUERY, "output": ANSWER * 8}, "glm4", ours, cutoff_len=cutoff,
                         policy="truncate")
    want = lf_efficient_example([(source, target[:cutoff - 1 - len(source)])], eos)
    assert (got.input_ids, got.labels, got.truncated) == (*want, True)
    # a dropped row (its prompt fills cutoff_len) beside truncated ones leaves the others' tokens whole; a conversation
    # cut inside its second answer (our truncate's cut, not infer_seqlen's per-turn one) ends there with the EOS
    rows = [{"instruction": QUERY * 9, "output": ANSWER}, {"instruction": QUERY, "output": ANSWER * 8}, row(None)]
    split = encode_rows(rows, "glm4", ours, cutoff_len=cutoff, policy="truncate")
    assert (len(split), split.dropped[NO_ROOM]) == (2, 1) and split.example(0) == got
    whole = encode_example(row(None), "glm4", ours, cutoff_len=4096)
    assert split.example(1)[:2] == (whole.input_ids[:cutoff - 1] + [eos], whole.labels[:cutoff - 1] + [eos])
