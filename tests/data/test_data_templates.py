"""Templates render the book's prompt exactly; golden GPT-2 ids; placeholders never reach Python."""
from __future__ import annotations

import pytest

from pipeline.data.templates import TEMPLATES, get_template
from pipeline.data.tokenize import encode_prompt
from pipeline.data.tokenizer import EOS_ID, get_tokenizer
from pipeline.errors import UserError

BOOK_HEAD = ("Below is an instruction that describes a task. Write a response that appropriately "
             "completes the request.")


def test_golden_token_ids():
    enc = get_tokenizer()
    ids = enc.encode("Hello, do you like tea? <|endoftext|> In the sunlit terraces", allowed_special={"<|endoftext|>"})
    assert ids == [15496, 11, 466, 345, 588, 8887, 30, 220, 50256, 554, 262, 4252, 18250, 8812, 2114]
    assert enc.decode(ids) == "Hello, do you like tea? <|endoftext|> In the sunlit terraces"


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


def test_chatml_renders_markup_as_text():
    t = get_template("chatml")
    assert t.prompt("Hi", system="Be brief.", history=[("Q1", "A1")]) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\nQ1<|im_end|>\n<|im_start|>assistant\nA1<|im_end|><|endoftext|>"
        "\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert t.prompt("Sum", "1 2") == "<|im_start|>user\nSum\n\n1 2<|im_end|>\n<|im_start|>assistant\n"
    assert t.response("3") == "3<|im_end|>"
    assert t.stop_strings == ("<|im_end|>",)
    # GPT-2 has no <|im_start|> token: the markers are ordinary text, several tokens each
    assert len(get_tokenizer().encode_ordinary("<|im_start|>")) > 1


def test_empty_template():
    t = get_template("empty")
    assert t.prompt("Translate: chat") == "Translate: chat"
    assert t.prompt("Translate:", "chat") == "Translate:\nchat"
    assert t.prompt("Q", system="S") == "S\nQ"
    assert t.response("cat") == "cat"


@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_placeholders_in_user_text_stay_literal(name):
    t = get_template(name)
    nasty = "{input} {content} {instruction} {system} {0.__class__.__mro__} {{x}}"
    prompt = t.prompt(nasty, nasty, system=nasty, history=[[nasty, nasty]])
    assert prompt.count(nasty) == 5  # system, history pair, instruction, input: each verbatim
    assert "<class" not in prompt
    assert t.response(nasty).startswith(nasty)


def test_unknown_template_suggests():
    with pytest.raises(UserError, match="did you mean 'alpaca'"):
        get_template("alpacca")


def test_encode_prompt_uses_eos_ids_between_turns():
    enc = get_tokenizer()
    ids = encode_prompt("alpaca", "And 3+3?", history=[["What is 1+1?", "2"]])
    first = enc.encode_ordinary(BOOK_HEAD + "\n\n### Instruction:\nWhat is 1+1?\n\n### Response:\n")
    second = enc.encode_ordinary("\n\n### Instruction:\nAnd 3+3?\n\n### Response:\n")
    assert ids == first + enc.encode_ordinary("2") + [EOS_ID] + second
