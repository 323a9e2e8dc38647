"""The exported chat template marks what training trained: transformers' apply_chat_template(...,
return_assistant_tokens_mask=True) (the tokens inside its {% generation %} blocks, which TRL's SFTTrainer trains with
assistant_only_loss) equals training's labels != -100 (train_on_prompt and mask_history false) of the same
conversation, on the real GPT-2 / Llama 3 / Qwen3 vocabularies, for every shipped template: closing markup and EOS
included where training trains them, a qwen3 thought, function-call turns.

Expected masks come from the pipeline's own encode_example. That is a fair oracle because training's masks are pinned
independently: token by token by hand (tests/data/test_data_masks.py; tests/vocab/test_template_masks_real.py, with
the `tokenizers` library's ids) and, for function calling, by LLaMA-Factory 0.9.5's own prompt / response split
(tests/data/lf_tool_goldens.py, produced by llamafactory; checked in tests/data/test_data_tools.py).

Where the two cannot agree token for token (docs/merge-eval.md says so): a reasoning template renders earlier answers
as inference does, without their thoughts (training with mask_history false trains them with one), and a tokenizer
that merges across a block's edge (`default`'s "Assistant:" and the answer on Llama 3's / Qwen's pre-tokenizer,
`empty`'s prompt and answer) makes one token of both, marked whole.
"""
from __future__ import annotations

import dataclasses
import json

import pytest

from pipeline.data.templates import TEMPLATES, Template, get_template
from pipeline.data.tokenize import IGNORE, Encoded, encode_example
from tests.data.lf_tool_goldens import MESSAGES, TOOLS
from tests.vocab.chat_render import ours, render_marked
from tests.vocab.test_chat_template_tools import TOOL_TEMPLATES, openai, row

pytest.importorskip("transformers")

SYSTEM = "You are terse."
# user / assistant turns as LLaMA-Factory writes them; the last answer with a thought (kept by a reasoning template)
CHAT = [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3?"}, {"role": "assistant", "content": "It's 6."},
        {"role": "user", "content": "Which word is a color?\nred\nhill"},
        {"role": "assistant", "content": "<think>\nred is one\n</think>\n\nred"}]
# the tokenizer merges across a block's edge: ":It", ":red" (default), "?It" (empty), "]<" (llama2's "[/INST]" before
# the answer "<think>...") are one token there
MERGED = {(family, name) for family in ("llama3", "qwen3", "deepseek_r1_qwen") for name in ("default", "empty", "llama2")}
MERGED.add(("llama3", "mistral"))  # "[/INST][TOOL_CALLS]": "][" where they are text; v0.3's tokens: test below
# olmo's bare system prompt before its <|user|> (text there): "terse.<" merges to ".<" in these byte-level vocabularies
MERGED.update((family, "olmo") for family in ("gpt2", "llama3", "qwen3", "deepseek_r1_qwen"))


def trained(example: Encoded) -> list[int]:
    return [int(label != IGNORE) for label in example.labels]


def training(template: Template, family_dir, lf: list[dict], system: str | None, tools: str,
             thinking: bool) -> tuple[list[int], list[int]]:
    """Training's ids and trained tokens of the conversation `lf` (LLaMA-Factory's turns), as the chat template
    renders it. A reasoning template renders earlier answers without thoughts: there the ids are training's with
    mask_history (its rendering), the last answer marked as training marks it, the earlier ones as the template
    without thought words (qwen3_nothink for qwen3) trains them."""
    tokenizer = ours(family_dir)

    def encode(turns: list[dict], t: Template, **kw) -> Encoded:
        return encode_example(row(turns, system, tools), t, tokenizer, cutoff_len=8192, enable_thinking=thinking, **kw)

    if template.thought_words is None or len(lf) == 2:
        example = encode(lf, template)
        return example.input_ids, trained(example)
    head = encode(lf[:-2], dataclasses.replace(template, thought_words=None))
    whole = encode(lf, template, mask_history=True)
    assert whole.input_ids[:len(head.input_ids)] == head.input_ids
    return whole.input_ids, trained(head) + trained(whole)[len(head.input_ids):]


def marked_runs(ids: list[int], mask: list[int], decode) -> list[str]:
    """The text of each run of marked tokens."""
    runs: list[list[int]] = []
    for i, (token, m) in enumerate(zip(ids, mask)):
        if m:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return [decode(run) for run in runs]


def assert_marks_training(family_dirs, family: str, name: str, lf: list[dict], system: str | None, tools: str,
                          thinking: bool) -> None:
    directory, template = family_dirs[family], get_template(name)
    msgs = ([{"role": "system", "content": system}] if system else []) + openai(lf)
    extra = {"tools": json.loads(tools)} if tools else {}
    got_ids, got_mask = render_marked(directory, template, msgs, enable_thinking=thinking, **extra)
    want_ids, want_mask = training(template, directory, lf, system, tools, thinking)
    decode = ours(directory).decode
    if (family, name) in MERGED:  # the same text; each answer's run holds training's, with the token across its edge
        assert decode(got_ids) == decode(want_ids)
        got, want = marked_runs(got_ids, got_mask, decode), marked_runs(want_ids, want_mask, decode)
        assert len(got) == len(want) and all(w in g for g, w in zip(got, want)), (name, got, want)
        return
    assert got_ids == want_ids, (name, decode(got_ids), decode(want_ids))
    assert got_mask == want_mask, (name, marked_runs(got_ids, got_mask, decode), marked_runs(want_ids, want_mask,
                                                                                             decode))


@pytest.mark.parametrize("family", ["gpt2", "llama3", "qwen3", "deepseek_r1_qwen"])
def test_every_template_marks_the_trained_tokens(family_dirs, family):
    """Three turns, with and without a system message (thinking on and off for qwen3 and deepseekr1): gpt2 has
    alpaca, llama2, mistral, default, empty, olmo (no markup tokens needed); llama3 adds llama3, openchat-3.6; qwen3 adds
    chatml, qwen, qwen3, qwen3_nothink and the Qwen-VL ones, qwen2_vl, qwen3_vl, qwen3_vl_nothink; DeepSeek-R1-Distill-Qwen
    adds deepseekr1, deepseek3."""
    names = [n for n, t in TEMPLATES.items() if t.vocabulary_problem(ours(family_dirs[family])) is None]
    assert len(names) == {"gpt2": 6, "llama3": 8, "deepseek_r1_qwen": 8}.get(family, 13)
    for name in names:
        for system in (SYSTEM, None):
            for thinking in (True, False) if TEMPLATES[name].thought_words else (True,):
                assert_marks_training(family_dirs, family, name, CHAT, system, "", thinking)


@pytest.mark.parametrize("answer", ["red", "<think>\nred is one\n</think>\n\nred"])
@pytest.mark.parametrize("thinking", [True, False])
def test_one_qwen3_turn_is_trainings_exactly(family_dirs, answer, thinking):
    """One turn: the thought (the answer's, or the empty one training adds) is marked when thinking, as training
    trains it; without thinking the empty thought ends the prompt, unmarked, as in training."""
    lf = [{"role": "user", "content": "Which word is a color?"}, {"role": "assistant", "content": answer}]
    assert_marks_training(family_dirs, "qwen3", "qwen3", lf, None, "", thinking)
    ids, mask = render_marked(family_dirs["qwen3"], TEMPLATES["qwen3"], openai(lf), enable_thinking=thinking)
    first = ours(family_dirs["qwen3"]).decode([i for i, m in zip(ids, mask) if m])
    assert first.startswith("<think>\n") == thinking and first.endswith("red<|im_end|>\n")


@pytest.mark.parametrize("family", list(TOOL_TEMPLATES))
def test_function_calls_are_marked_as_trained(family_dirs, family):
    """LLaMA-Factory's glaive-style conversation (tools; a call, its result, an answer; then two parallel calls):
    the calls and the answer are marked, the tool text and results are not."""
    for name in TOOL_TEMPLATES[family]:
        for system in ("You are a weather bot.", None):
            assert_marks_training(family_dirs, family, name, MESSAGES, system, TOOLS, True)


def test_mistral_v3_function_calls_are_marked_as_trained(tmp_path):
    """The same on a stand-in of Mistral v0.3's vocabulary, whose control tokens keep the blocks apart: id for id."""
    from tests.helpers.hf_vocab import write_small_tokenizer_dir

    write_small_tokenizer_dir(tmp_path, "mistral_v3")
    for system in ("You are a weather bot.", None):
        assert_marks_training({"mistral_v3": tmp_path}, "mistral_v3", "mistral", MESSAGES, system, TOOLS, True)


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_the_served_template_has_no_generation_tag_and_renders_the_marked_ones_text(name, family_dirs, phi_dir,
                                                                                     tmp_path,
                                                                                     granite_olmo_dirs,
                                                                                     glm_dir, oss_dir, tekken_dir):
    """The tokenizer's chat_template is rendered by engines without transformers' extension (llama-cpp-python,
    minijinja in TGI): a {% generation %} tag there stops the model from being served. The marked copy is written
    beside it; both render the same text."""
    from pipeline.data.chat_template import jinja_template
    from tests.helpers.gemma_vocab import write_gemma_tokenizer_dir
    from tests.vocab.chat_render import hf_tokenizer

    directory = write_gemma_tokenizer_dir(tmp_path / "gemma") if name.startswith("gemma") else \
        family_dirs["qwen3" if name.startswith(("qwen", "chatml")) else "llama3" if name in ("llama3", "openchat-3.6")
                    else "deepseek_r1_qwen" if name.startswith("deepseek") else "gpt2"]
    directory = phi_dir if name.startswith("phi") else directory
    directory = granite_olmo_dirs.get(name, directory)
    directory = glm_dir if name.startswith("glm") else directory
    directory = oss_dir if name == "gpt_oss" else directory
    directory = tekken_dir if name == "mistral_small" else directory
    if name == "moonlight":
        from tests.helpers.hf_vocab import write_small_tokenizer_dir

        write_small_tokenizer_dir(tmp_path / "moonlight", "moonlight")
        directory = tmp_path / "moonlight"
    template, tokenizer = TEMPLATES[name], ours(directory)
    served, marked = jinja_template(template, tokenizer), jinja_template(template, tokenizer, marked=True)
    assert "endgeneration" not in served and "{%- generation -%}" in marked
    hf = hf_tokenizer(directory)
    texts = [hf.apply_chat_template(CHAT[:2], chat_template=t, tokenize=False) for t in (served, marked)]
    assert texts[0] == texts[1]
