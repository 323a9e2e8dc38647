"""Function calling with the gemma family (gemma, gemma2, gemma3), glm4 / glmz1 and phi4_mini, as LLaMA-Factory 0.9.5
writes it: the text of every turn (lf_tool_goldens_more.py, produced by llamafactory itself), the ids and labels on the
small tokenizer fixtures those templates' tests use, and the exported chat template's rendering of the same
conversation through transformers' apply_chat_template(tools=...).

What LLaMA-Factory gives each (src/llamafactory/data/template.py; tool_utils.py):
- gemma / gemma2 / gemma3 (:966-1011): no format_tools / format_function, so register_template's defaults (:534-550):
  the default tool format (DefaultToolUtils), a call written in the answer's block; a tool result in
  "<start_of_turn>tool\\n...<end_of_turn>\\n<start_of_turn>model\\n" (format_observation).
- glm4 / glmz1 (:1081-1092, :1178-1191): GLM4ToolUtils (tool_utils.py:373-394): GLM-4's Chinese tool prompt, each
  function as json.dumps(indent=4), a call "name\\narguments" with no block around it (format_function "{{content}}"),
  several calls a ValueError ("GLM-4 does not support parallel functions."); a result in "<|observation|>\\n...
  <|assistant|>".
- phi4_mini (:1919-1927): format_tools StringFormatter "<|tool|>{{content}}<|/tool|>": the tools column's text as
  given; calls in the default format (register_template's default format_function), results as user turns.
- gpt_oss (:1194-1203): register_template's defaults as gemma's, results as user turns; ReasoningTemplate's empty
  analysis-channel thought in front of every response, a call's too.

Ids: LLaMA-Factory's Template._convert_elements_to_ids (template.py:113-130) encodes each element with
tokenizer.encode(add_special_tokens=False); every element edge in these templates is next to a markup token (or BOS),
where AutoTokenizer splits anyway, so a turn's text encoded whole by AutoTokenizer is its ids (lf_ids). Labels: the
supervised processor (processor/supervised.py:58-104): lf_example, or lf_efficient_example for the efficient_eos
templates (glm4, glmz1, gemma2, gpt_oss).
"""
from __future__ import annotations

import json

import pytest

from lf_tool_goldens import MESSAGES, TOOLS
from lf_tool_goldens_more import GOLDEN, ONE_CALL
from pipeline.data.templates import TEMPLATES, get_template, tool_templates
from pipeline.data.tokenize import encode_example
from pipeline.errors import UserError
from test_data_tools import ENTRY, _registry_row, conversation_row

transformers = pytest.importorskip("transformers")

# template -> the fixture vocabulary it is checked on
VOCABULARY = {"gemma": "gemma", "gemma2": "gemma", "gemma3": "gemma", "glm4": "glm4", "glmz1": "glm4",
              "phi4_mini": "phi4", "gpt_oss": "gpt_oss"}
EFFICIENT = {"glm4", "glmz1", "gemma2", "gpt_oss"}


@pytest.fixture(scope="module")
def vocab(tmp_path_factory) -> dict:
    """Tokenizer folders: Gemma's form (tests/helpers/gemma_vocab.py), the small byte-level BPEs with GLM-4's and Phi-4's
    markup, and Phi-4's with Phi-4-mini's <|tool|> / <|/tool|> tokens (phi4_mini)."""
    from tests.helpers.gemma_vocab import write_gemma_tokenizer_dir
    from tests.helpers.hf_vocab import write_small_tokenizer_dir

    out = {"gemma": write_gemma_tokenizer_dir(tmp_path_factory.mktemp("gemma"))}
    for family in ("glm4", "phi4", "phi4_mini", "gpt_oss"):
        out[family] = tmp_path_factory.mktemp(family)
        write_small_tokenizer_dir(out[family], family)
    return out


def messages_of(name: str) -> list[dict]:
    return ONE_CALL if name.startswith("glm") else MESSAGES


@pytest.mark.parametrize("name,system,tools", sorted(GOLDEN))
def test_every_turn_is_llamafactorys_text(name, system, tools):
    """Tools in the system text, a call, its result, an answer, a user turn, then parallel calls (one call for
    glm4 / glmz1). Failed before: the gemma templates, glm4, phi4_mini and gpt_oss refused function-calling data,
    gemma2 was not known."""
    template = get_template(name)
    row = conversation_row(messages_of(name), tools, system)
    turns = template.turns(row["instruction"], "", row["output"], row.get("system"), row["history"], tools=tools,
                           roles=row["roles"])
    got = [(template.text(p, "{eos}", "{bos}"), template.text(a, "{eos}", "{bos}")) for p, a in turns]
    assert got == GOLDEN[(name, system, tools)]


def test_these_templates_render_tools():
    assert {"gemma", "gemma2", "gemma3", "glm4", "glmz1", "phi4_mini", "gpt_oss"} <= set(tool_templates())
    assert (TEMPLATES["glm4"].tool_format, TEMPLATES["phi4_mini"].tool_format, TEMPLATES["gemma3"].tool_format) == \
        ("glm4", "phi4_mini", "default")


CASES = [(name, system, tools, family) for name, system, tools in sorted(GOLDEN)
         for family in ((VOCABULARY[name], "phi4_mini") if name == "phi4_mini" else (VOCABULARY[name],))]


@pytest.mark.parametrize("name,system,tools,family", CASES)
def test_ids_and_labels_are_llamafactorys(vocab, name, system, tools, family):
    """The goldens' turns as LLaMA-Factory's ids (AutoTokenizer) and labels: calls and answers trained (with
    efficient_eos the EOS on each later prompt's first token and a trained EOS at the end), tools text, user turns and
    tool results not; mask_history trains the last call only. phi4_mini on a vocabulary with <|tool|> / <|/tool|>
    places them by id, on one without writes them as text, as tokenizer.encode does."""
    from pipeline.data.model_tokenizer import load_tokenizer
    from tests.vocab.test_glm4_template import lf_efficient_example
    from tests.vocab.test_sentencepiece_templates import lf_example, lf_ids

    golden = transformers.AutoTokenizer.from_pretrained(vocab[family])
    ours = load_tokenizer(vocab[family])
    pairs = lf_ids(golden, GOLDEN[(name, system, tools)])
    row = conversation_row(messages_of(name), tools, system)
    for flags in ({}, {"mask_history": True}) if name not in ("glmz1", "gpt_oss") else ({},):  # reasoning: mask_history
        # drops thoughts
        got = encode_example(row, name, ours, cutoff_len=8192, **flags)
        want = lf_efficient_example(pairs, golden.eos_token_id, **flags) if name in EFFICIENT else \
            lf_example(pairs, **flags)
        assert (got.input_ids, got.labels) == want, flags
    if name == "phi4_mini":
        tool_ids = [golden.convert_tokens_to_ids(t) for t in ("<|tool|>", "<|/tool|>")]
        placed = [t for t in pairs[0][0] if t in tool_ids]
        assert placed == (tool_ids if family == "phi4_mini" else []), family


@pytest.mark.parametrize("name", sorted(VOCABULARY))
def test_the_exported_chat_template_renders_trainings_ids(vocab, name):
    """apply_chat_template(messages, tools=...) with the chat template merge / export write: every prompt (after the
    user, after the tool result, after the second user) is encode_prompt's ids and the whole conversation the training
    row's (tests/vocab/test_chat_template_tools.py's check), with a system message and without. Failed before: these
    templates' chat templates refused tools."""
    from tests.vocab.test_chat_template_tools import assert_conversation

    assert_conversation(vocab[VOCABULARY[name]], name, set(), messages_of(name))
    if name == "phi4_mini":
        assert_conversation(vocab["phi4_mini"], name, set())


def test_phi4_minis_empty_tools_are_written_as_given(vocab):
    """phi4_mini writes the tools column's text as it is, "[]" too (a StringFormatter, no JSON parsing): training's
    "<|tool|>[]<|/tool|>", and the chat template's for tools=[]."""
    from tests.vocab.chat_render import render

    template = TEMPLATES["phi4_mini"]
    assert GOLDEN[("phi4_mini", "", "[]")][0][0].startswith("<|system|><|tool|>[]<|/tool|><|end|><|user|>")
    text = render(vocab["phi4"], template, [{"role": "user", "content": "Hi"}], tools=[], tokenize=False)
    assert text == "<|system|><|tool|>[]<|/tool|><|end|><|user|>Hi<|end|><|assistant|>"


PARALLEL = json.dumps([{"name": "get_time", "arguments": {"cities": ["Rome"]}},
                       {"name": "get_time", "arguments": {"cities": ["Köln"]}}], ensure_ascii=False)


def test_glm4_refuses_parallel_calls_where_llamafactory_raises(make_recipe, vocab):
    """GLM4ToolUtils.function_formatter raises on several calls (tool_utils.py:390-392): the build names the row by
    file and line with the fix, a row built for another template is refused at tokenizing, and the chat template
    raises for an assistant message with two tool_calls. Other templates take the same row."""
    import os

    from pipeline.data.build import build
    from pipeline.recipe.args import data_args
    from tests.vocab.chat_render import render
    from tests.vocab.test_chat_template_tools import openai

    rows = [_registry_row([("human", "Time in Rome and Köln?"), ("function_call", PARALLEL)])]
    files = {"raw/t.jsonl": "".join(json.dumps(x, ensure_ascii=False) + "\n" for x in rows)}
    entry = {**ENTRY, "file_name": "raw/t.jsonl"}
    r = make_recipe({"t": entry}, files=files, template="glm4")
    with pytest.raises(UserError) as err:
        build(data_args(r))
    f = os.path.join(r["dataset_dir"], "raw", "t.jsonl")
    assert err.value.messages == [
        f"{f}:1: conversations[1].value (a function call) holds 2 parallel calls, but tool format 'glm4' writes one "
        "call per turn (LLaMA-Factory 0.9.5's GLM4ToolUtils refuses several: 'GLM-4 does not support parallel "
        "functions.'); give each call its own function_call turn, each followed by its observation"]
    build(data_args(make_recipe({"t": entry}, files=files, template="qwen", val_size=0)))  # qwen writes them

    row = conversation_row()  # MESSAGES: its last turn is two parallel calls
    with pytest.raises(UserError, match="holds 2 parallel calls, but tool format 'glm4' writes one call per turn"):
        get_template("glm4").segments(row)
    with pytest.raises(Exception, match="writes one tool call per assistant message"):
        render(vocab["glm4"], TEMPLATES["glm4"], openai(MESSAGES), tools=json.loads(TOOLS), add_generation_prompt=False)


def test_gpt_oss_writes_a_calls_analysis_thought_before_the_call():
    """A call carrying gpt-oss's analysis-channel thought: LLaMA-Factory's FunctionFormatter finds it by the template's
    own thought words (formatter.py:119-133; Template._encode passes them) and writes it before the call in the default
    format; the build's check takes the row. Golden by hand from those lines (and what llamafactory renders). Failed
    before: the call's JSON was cut by <think>'s words, so the thought was read as JSON (the build refused the row)."""
    from pipeline.data.tools import function_problem

    template = get_template("gpt_oss")
    opening, closing = template.thought_words
    call = opening + "I should call it." + closing + MESSAGES[1]["content"]
    row = conversation_row([MESSAGES[0], {**MESSAGES[1], "content": call}], TOOLS, "")
    (prompt, answer), = template.turns(row["instruction"], "", row["output"], row.get("system"), row["history"],
                                       tools=TOOLS, roles=row["roles"])
    assert template.text(answer, "{eos}", "{bos}") == \
        opening + "I should call it." + closing + 'Action: get_weather\nAction Input: {"location": "Paris", "unit": "c"}'
    assert function_problem(call, template.tool_format, template.thought_words) is None
