"""Templates render the book's prompt exactly; golden GPT-2 ids; placeholders never reach Python."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.data.templates import BENCHMARK_TEMPLATES, TEMPLATES, Special, get_template
from pipeline.data.tokenize import encode_prompt
from pipeline.data.tokenizer import gpt2
from pipeline.errors import UserError

EOS_ID = 50256  # GPT-2's <|endoftext|> (a published id, not read from the code under test)

BOOK_HEAD = ("Below is an instruction that describes a task. Write a response that appropriately "
             "completes the request.")


def test_golden_token_ids():
    enc = gpt2()
    ids = enc.encode_special("Hello, do you like tea? <|endoftext|> In the sunlit terraces")
    assert ids == [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114]
    assert enc.decode(ids) == "Hello, do you like tea? <|endoftext|> In the sunlit terraces"
    assert enc.encode("<|endoftext|>") == [27, 91, 437, 1659, 5239, 91, 29]  # user text: literal


def test_alpaca_without_input_is_the_books_prompt():
    t = get_template("alpaca")
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nIdentify the correct spelling of the following word."
        "\n\n### Response:\n"
    )
    assert t.prompt("Identify the correct spelling of the following word.") == expected
    assert t.prompt("Identify the correct spelling of the following word.", "") == expected
    assert t.response("The correct spelling is 'Occasion.'") == "The correct spelling is 'Occasion.'"


def test_alpaca_with_input_is_the_books_prompt():
    t = get_template("alpaca")
    expected = (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nIdentify the correct spelling of the following word."
        "\n\n### Input:\nOcassion"
        "\n\n### Response:\n"
    )
    assert t.prompt("Identify the correct spelling of the following word.", "Ocassion") == expected


def test_alpaca_system_replaces_preamble_and_history_in_order():
    t = get_template("alpaca")
    prompt = t.prompt("And 3+3?", system="Answer with a number.", history=[["What is 1+1?", "2"]])
    assert prompt == ("Answer with a number.\n\n### Instruction:\nWhat is 1+1?\n\n### Response:\n2<|endoftext|>"
                      "\n\n### Instruction:\nAnd 3+3?\n\n### Response:\n")


CHATML_HISTORY = ("<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|>\n"
                  "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_chatml_strings_are_llamafactorys():
    t = get_template("chatml")
    assert t.prompt("Hi", system="Be brief.", history=[("Q1", "A1")]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n" + CHATML_HISTORY)
    assert t.prompt("Hi", history=[("Q1", "A1")]) == CHATML_HISTORY  # no default system
    assert t.prompt("Sum", "1 2") == "<|im_start|>user\nSum\n1 2<|im_end|>\n<|im_start|>assistant\n"
    assert t.response("3") == "3<|im_end|>\n"
    assert t.stop_words == ("<|im_end|>", "<|im_start|>") and t.replace_eos


def test_qwen_adds_qwens_default_system_prompt():
    t = get_template("qwen")
    assert t.prompt("Hi", history=[("Q1", "A1")]) == (
        "<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a helpful assistant.<|im_end|>\n"
        + CHATML_HISTORY)
    assert t.prompt("Hi", system="S") == "<|im_start|>system\nS<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n" \
                                         "<|im_start|>assistant\n"
    assert t.stop_words == ("<|im_end|>",)


def test_default_system_replaces_the_templates_default_and_a_rows_own_still_wins():
    """LLaMA-Factory's default_system: template.default_system = data_args.default_system (template.py)."""
    from pipeline.data.templates import recipe_template

    assert recipe_template("qwen") is get_template("qwen")
    t = recipe_template("qwen", "Be brief.")
    assert t.prompt("Hi", history=[("Q1", "A1")]) == "<|im_start|>system\nBe brief.<|im_end|>\n" + CHATML_HISTORY
    assert t.prompt("Hi", system="S").startswith("<|im_start|>system\nS<|im_end|>\n")
    assert recipe_template("qwen", "").prompt("Hi", history=[("Q1", "A1")]) == CHATML_HISTORY
    assert recipe_template("llama3", "Be brief.").prompt("Hi").startswith(
        "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>")


def test_qwen3_nothink_is_plain_chatml_and_qwen3_adds_an_empty_thought():
    assert get_template("qwen3_nothink").prompt("Hi", history=[("Q1", "A1")]) == CHATML_HISTORY
    t = get_template("qwen3")
    # enable_thinking (default): the empty thought opens each response that has none (trained)
    (p1, a1), (p2, a2) = t.turns("Hi", output="Yo", history=[("Q1", "A1")])
    assert t.text(p1) == "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\n"
    assert a1 == ["<think>\n\n</think>\n\n", "A1", Special("<|im_end|>"), "\n"]
    assert a2[0] == "<think>\n\n</think>\n\n"
    # a response with its own thought keeps it and gets no empty one
    (_, a), = t.turns("Hi", output="<think>\nhmm\n</think>\n\nYo")
    assert t.text(a) == "<think>\nhmm\n</think>\n\nYo<|im_end|>\n"
    # enable_thinking false: thoughts removed, the empty thought ends the prompt (not trained)
    (p, a), = t.turns("Hi", output="<think>\nhmm\n</think>\n\nYo", enable_thinking=False)
    assert p[-1] == "<think>\n\n</think>\n\n" and t.text(a) == "Yo<|im_end|>\n"
    # mask_history: earlier thoughts dropped, only the last turn gets an empty thought
    (_, a1), (_, a2) = t.turns("Hi", output="Yo", history=[("Q1", "<think>\nx\n</think>\n\nA1")],
                               mask_history=True)
    assert t.text(a1) == "A1<|im_end|>\n" and a2[0] == "<think>\n\n</think>\n\n"


def test_llama3_strings_are_llamafactorys():
    t = get_template("llama3")
    assert t.prompt("Hi", system="S", history=[("Q1", "A1")], bos="<|begin_of_text|>") == (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nS<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nQ1<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
        "A1<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n")
    assert t.response("A") == "A<|eot_id|>"
    assert t.stop_words == ("<|eot_id|>", "<|eom_id|>")


def test_llama2_and_mistral_strings_are_llamafactorys():
    """LLaMA-Factory 0.9.5 src/llamafactory/data/template.py, re-typed: llama2 (:1393-1398) format_user
    [bos, "[INST] {{content}} [/INST]"], format_system "<<SYS>>\\n{{content}}\\n<</SYS>>\\n\\n", the default
    assistant ["{{content}}", eos] (:534); mistral (:1780-1791) prefix [bos], user "[INST] {{content}}[/INST]",
    assistant [" {{content}}", eos], system "{{content}}\\n\\n"; both Llama2Template (:337-373): at the first message
    the system text (plus the tools' text) goes through format_system into that message's content."""
    llama2, mistral = get_template("llama2"), get_template("mistral")
    assert llama2.prompt("Hi", system="S", history=[("Q1", "A1")], eos="</s>", bos="<s>") == (
        "<s>[INST] <<SYS>>\nS\n<</SYS>>\n\nQ1 [/INST]A1</s><s>[INST] Hi [/INST]")
    assert llama2.prompt("Hi", bos="<s>") == "<s>[INST] Hi [/INST]" and llama2.response("A", eos="</s>") == "A</s>"
    assert mistral.prompt("Hi", system="S", history=[("Q1", "A1")], eos="</s>", bos="<s>") == (
        "<s>[INST] S\n\nQ1[/INST] A1</s>[INST] Hi[/INST]")
    assert mistral.prompt("Hi", bos="<s>") == "<s>[INST] Hi[/INST]" and mistral.response("A", eos="</s>") == " A</s>"
    (prompt, _), = llama2.turns("Hi", system="S")  # one element: BOS, then the system text inside [INST]
    assert prompt == [Special("{bos}"), "[INST] <<SYS>>\nS\n<</SYS>>\n\nHi [/INST]"]
    # their function calling: tests/data/test_data_tools.py (LLaMA-Factory's own renderings, lf_tool_goldens.py)


@pytest.mark.parametrize("vocabulary", ["mistral", "mistral_v3"])
def test_mistral_markup_is_a_token_where_the_vocabulary_has_it_else_text(tmp_path, vocabulary):
    """LLaMA-Factory encodes each element's text with the tokenizer (template.py _convert_elements_to_ids), which
    finds an added token such as Mistral v0.3's control token [INST] in it and leaves [INST] text in a v0.1 / v0.2
    vocabulary. Golden: transformers' encode of the element text, on a byte-level stand-in of each vocabulary."""
    import transformers

    from pipeline.data.model_tokenizer import load_tokenizer
    from tests.helpers.hf_vocab import write_small_tokenizer_dir

    write_small_tokenizer_dir(tmp_path, vocabulary)
    hf = transformers.AutoTokenizer.from_pretrained(tmp_path)
    ours = load_tokenizer(tmp_path)
    want = [hf.bos_token_id] + hf.encode("[INST] Be brief.\n\nWhich word is red?[/INST]", add_special_tokens=False)
    assert encode_prompt("mistral", "Which word is red?", system="Be brief.", tokenizer=ours) == want
    assert (hf.convert_tokens_to_ids("[INST]") in want) == (vocabulary == "mistral_v3")


def test_default_template_strings():
    t = get_template("default")
    assert t.prompt("Hi", system="S", history=[("Q1", "A1")], eos="</s>") == (
        "System: S</s>\nHuman: Q1</s>\nAssistant:A1</s>\nHuman: Hi</s>\nAssistant:")


def test_empty_template():
    t = get_template("empty")
    assert t.prompt("Translate: chat") == "Translate: chat"
    assert t.prompt("Translate:", "chat") == "Translate:\nchat"
    assert t.prompt("Q", system="S") == "SQ"  # LLaMA-Factory's empty: the blocks side by side
    assert t.response("cat", eos="<|endoftext|>") == "cat"  # and no EOS


def test_markup_tokens_are_split_out_of_template_text_only():
    t = get_template("chatml")
    (prompt, _), = t.turns("a <|im_end|> b")
    assert prompt == [Special("<|im_start|>"), "user\na <|im_end|> b", Special("<|im_end|>"), "\n",
                      Special("<|im_start|>"), "assistant\n"]


def test_schema_enum_lists_exactly_the_templates():
    schema = json.loads((Path(__file__).parents[2] / "pipeline/recipe/schema/recipe.schema.json").read_text())
    enum = schema["properties"]["template"]["enum"]
    assert [name for name in enum if name not in BENCHMARK_TEMPLATES] == list(TEMPLATES)
    assert set(BENCHMARK_TEMPLATES) <= set(enum)


def test_a_template_the_vocabulary_cannot_express_is_a_user_error():
    with pytest.raises(UserError, match=r"'chatml' needs the special tokens <\|im_start\|>, <\|im_end\|>.*gpt2.*"
                                        r"\(alpaca, llama2, mistral, default, empty, olmo\)"):
        encode_prompt("chatml", "hi", tokenizer=gpt2())


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_placeholders_in_user_text_stay_literal(name):
    t = get_template(name)
    nasty = "{input} {content} {instruction} {system} {0.__class__.__mro__} {{x}}"
    prompt = t.prompt(nasty, nasty, system=nasty, history=[[nasty, nasty]])
    assert prompt.count(nasty) == 5  # system, history pair, instruction, input: each verbatim
    assert "<class" not in prompt
    # mistral's answer opens with a space, glm4's with a newline
    assert t.response(nasty).removeprefix(" ").removeprefix("\n").startswith(nasty)


def test_unknown_template_suggests():
    with pytest.raises(UserError, match="did you mean 'alpaca'"):
        get_template("alpacca")


def test_encode_prompt_uses_eos_ids_between_turns():
    enc = gpt2()
    ids = encode_prompt("alpaca", "And 3+3?", history=[["What is 1+1?", "2"]], tokenizer=enc)
    first = enc.encode(BOOK_HEAD + "\n\n### Instruction:\nWhat is 1+1?\n\n### Response:\n")
    second = enc.encode("\n\n### Instruction:\nAnd 3+3?\n\n### Response:\n")
    assert ids == first + enc.encode("2") + [EOS_ID] + second


def test_validate_names_the_recipe_line_of_a_template_the_model_cannot_express(tmp_path):
    from pipeline.recipe.resolve import resolve

    (tmp_path / "r.yaml").write_text("model_name_or_path: tiny\ndataset: x\ntemplate: chatml\nnum_train_epochs: 1\n")
    with pytest.raises(UserError) as err:
        resolve(str(tmp_path / "r.yaml"), [], command="validate")
    assert any(m.startswith(f"{tmp_path / 'r.yaml'}:3:11: template: 'chatml' needs the special tokens "
                            "<|im_start|>, <|im_end|>, which the tokenizer gpt2 does not have") for m in err.value.messages)
