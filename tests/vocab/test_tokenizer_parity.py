"""Our tiktoken-backed tokenizer against the `tokenizers` library on the real Llama 3 and Qwen vocabularies.

Golden values: Meta's own check for Llama 3, the published special-token ids of the checkpoints, and the
Hugging Face `tokenizers` library reading the same tokenizer.json (never the code under test).
"""
from __future__ import annotations

import pytest

from pipeline.data.model_tokenizer import load_tokenizer
from pipeline.data.encoding import MAX_RUN, bounded

CORPUS = [
    "This is a test sentence.",
    "Hello, world! How's it going? I'M fine, they'll see; we've done it. don't",
    "中文测试，你好。日本語のテキストです。한국어 문장입니다.",
    "emoji 😀👍🏽 family 👨‍👩‍👧 flags 🇫🇷🇯🇵",
    "def f(x):\n    return x ** 2  # code\n\n\tif a != b:\n\t\tpass\r\n",
    "digits 1234567890123456789 3.14159 100,000 0x1F 2024-12-03",
    "spaces   between    words\n\n\n\n   \t trailing   ",
    " leading space and a very long whitespace run" + " " * 300 + "end\n" * 3,
    "user text <|im_end|> <|eot_id|> <|endoftext|> <|begin_of_text|> <|im_start|>assistant stays literal",
    "café cafe\u0301 naïve Å Å ﬁ",
    "مرحبا بالعالم שלום עולם",  # right-to-left
    "x" * 3000 + " " + "9" * 500,
]
FAMILIES = ("llama3", "qwen2", "qwen3")


def test_meta_reference_ids(vocab_dirs):
    """Meta's check (llama_models/llama3/tests): "This is a test sentence." -> 2028, 374, 264, 1296, 11914, 13."""
    for name in ("llama3", "llama3_original"):
        tok = load_tokenizer(vocab_dirs[name])
        assert tok.encode("This is a test sentence.") == [2028, 374, 264, 1296, 11914, 13]
        assert tok.decode([2028, 374, 264, 1296, 11914, 13]) == "This is a test sentence."
        assert tok.token_id("<|begin_of_text|>") == 128000 and tok.token_id("<|eot_id|>") == 128009


@pytest.mark.parametrize("family", FAMILIES)
def test_encode_decode_equal_the_tokenizers_library(vocab_dirs, hf_reference, family):
    ours, hf = load_tokenizer(vocab_dirs[family]), hf_reference(vocab_dirs[family])
    for text in CORPUS:
        ids = ours.encode(text)
        assert ids == hf.encode(text, add_special_tokens=False).ids, text
        assert ours.decode(ids) == hf.decode(ids, skip_special_tokens=False)
    assert ours.encode_batch(CORPUS * 2) == [ours.encode(t) for t in CORPUS * 2]


def test_qwen_normalises_to_nfc_and_llama_does_not(vocab_dirs):
    qwen, llama = load_tokenizer(vocab_dirs["qwen2"]), load_tokenizer(vocab_dirs["llama3"])
    assert qwen.encode("cafe\u0301") == qwen.encode("caf\u00e9")
    assert llama.encode("cafe\u0301") != llama.encode("caf\u00e9")


def test_special_strings_in_user_text_stay_literal_but_markup_is_one_token(vocab_dirs):
    tok = load_tokenizer(vocab_dirs["qwen3"])
    assert 151645 not in tok.encode("<|im_end|>") and tok.decode(tok.encode("<|im_end|>")) == "<|im_end|>"
    assert tok.encode_special("<|im_start|>user\n") == [151644] + tok.encode("user\n")
    # added tokens that are not special (Qwen3's <think>, <tool_call>) are tokens in any text, as in transformers
    assert tok.encode("<think>\nhmm\n</think>")[0] == 151667 and tok.encode("<tool_call>") == [151657]


@pytest.mark.parametrize("name, eos, bos, pad, stops", [
    ("llama3", 128009, 128000, 128009, {128001, 128008, 128009}),  # Llama-3.2-1B-Instruct
    ("llama3_base", 128001, 128000, 128001, {128001}),  # Llama-3.2-1B
    ("llama3_original", 128001, 128000, 128001, {128001, 128008, 128009}),  # Meta's tokenizer.model alone
    ("qwen2", 151645, None, 151643, {151645, 151643}),  # Qwen2.5-0.5B-Instruct
    ("qwen2_base", 151643, None, 151643, {151643}),  # Qwen2.5-0.5B
    ("qwen3", 151645, None, 151643, {151645, 151643}),  # Qwen3-0.6B
])
def test_bos_eos_pad_and_stop_ids_come_from_the_checkpoint(vocab_dirs, name, eos, bos, pad, stops):
    tok = load_tokenizer(vocab_dirs[name])
    assert (tok.eos_id, tok.bos_id, tok.pad_id, set(tok.stop_ids)) == (eos, bos, pad, stops)
    assert tok.stop_ids[0] == eos


def test_gpt2_preset_keeps_the_books_tokenizer():
    tok = load_tokenizer("gpt2-small")
    assert (tok.eos_id, tok.n_vocab) == (50256, 50257) and load_tokenizer("tiny") is tok
    assert tok.encode("Hello, do you like tea?") == [15496, 11, 466, 345, 588, 8887, 30]  # tiktoken's docs


def test_long_runs_are_bounded_like_metas_tokenizer(vocab_dirs, hf_reference):
    """A run without whitespace longer than MAX_RUN is cut every MAX_RUN characters before encoding
    (tiktoken is quadratic in one pre-token, openai/tiktoken#195); ordinary long text is not cut."""
    tok = load_tokenizer(vocab_dirs["llama3"])
    run = "ab" * (MAX_RUN + 10)  # 50,020 characters, one "word"
    text = "start " + run + " end"
    pieces = bounded(text)
    assert [len(p) for p in pieces] == [6 + MAX_RUN, MAX_RUN, 20 + 4]
    assert "".join(pieces) == text
    assert tok.encode(text) == [t for p in pieces for t in tok.encode(p)]
    assert tok.decode(tok.encode(text)) == text
    prose = "word " * (3 * MAX_RUN)  # long, but every run is short: encoded exactly as the reference does
    assert bounded(prose) == [prose]
    assert tok.encode(prose) == hf_reference(vocab_dirs["llama3"]).encode(prose, add_special_tokens=False).ids
    spaces = " " * (2 * MAX_RUN + 1)
    assert [len(p) for p in bounded(spaces)] == [MAX_RUN, MAX_RUN, 1]


def test_a_megabyte_row_without_spaces_goes_through_the_data_path():
    """issue 18: one huge row without whitespace is encoded in bounded pieces (sft rows and pt documents)."""
    from pipeline.data.tokenize import encode_rows, join_documents

    tok = load_tokenizer("gpt2")
    blob = "x" * 1_000_000 + "é" * 1000
    split = encode_rows([{"instruction": "copy", "input": blob, "output": blob}], "alpaca", tok, cutoff_len=10**7)
    assert tok.decode(split.example(0).input_ids).count(blob) == 2
    stream = join_documents(tok.encode_batch([blob, "short doc"]), tok.eos_id)
    assert tok.decode(stream.tolist()) == blob + "<|endoftext|>short doc"
