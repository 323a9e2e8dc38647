"""Tokenizers we do not run are refused with one message naming the file and the key (UserError, exit 2)."""
from __future__ import annotations

import json
import shutil

import pytest

from pipeline.data.model_tokenizer import load_tokenizer
from pipeline.errors import UserError

LLAMA_CONFIG = {"architectures": ["LlamaForCausalLM"], "model_type": "llama"}


def _dir(tmp_path, name, tokenizer_json=None):
    d = tmp_path / name
    d.mkdir()
    (d / "config.json").write_text(json.dumps(LLAMA_CONFIG))
    if tokenizer_json is not None:
        (d / "tokenizer.json").write_text(json.dumps(tokenizer_json))
    return d


@pytest.mark.parametrize("tokenizer_json, message", [
    ({"model": {"type": "Unigram", "vocab": []}}, r"model.type 'Unigram' \(sentencepiece\) is not supported"),
    ({"model": {"type": "BPE", "vocab": {}, "merges": []}, "pre_tokenizer": {"type": "Metaspace"}},
     r"a sentencepiece tokenizer \(pre_tokenizer Metaspace\) is not supported"),
    ({"model": {"type": "WordPiece", "vocab": {}}}, r"model.type 'WordPiece' is not supported"),
])
def test_non_byte_level_tokenizers_are_refused(tmp_path, tokenizer_json, message):
    d = _dir(tmp_path, "m", tokenizer_json)
    with pytest.raises(UserError, match=f"{d / 'tokenizer.json'}: {message}.*supported: byte-level BPE"):
        load_tokenizer(d)


def test_a_sentencepiece_tokenizer_model_is_refused(tmp_path):
    d = _dir(tmp_path, "m")
    (d / "tokenizer.model").write_bytes(b"\n\x0e\n\x05<unk>\x15\x00\x00\x00\x00\x18\x02")  # protobuf, not text
    with pytest.raises(UserError, match="not a tiktoken BPE file .* a sentencepiece tokenizer.model is not supported; "
                                         "copy the checkpoint.s tokenizer.json next to it"):
        load_tokenizer(d)


def test_missing_tokenizer_files_say_what_to_copy(tmp_path):
    d = _dir(tmp_path, "m")
    with pytest.raises(UserError, match=f"{d}: no tokenizer files .*tokenizer.json.*hf download"):
        load_tokenizer(d)


def test_merges_out_of_id_order_are_not_tiktoken_ranks(tmp_path, vocab_dirs):
    data = json.loads((vocab_dirs["qwen2"] / "tokenizer.json").read_text())
    merges = data["model"]["merges"]
    merges[0], merges[500] = merges[500], merges[0]
    d = _dir(tmp_path, "m", data)
    with pytest.raises(UserError, match=r"merge 2 \(\['Ġ', 'ĠĠĠ'\]\) does not follow the token ids"):
        load_tokenizer(d)


def test_eos_token_the_vocabulary_lacks(tmp_path, vocab_dirs):
    d = tmp_path / "m"
    shutil.copytree(vocab_dirs["qwen2"], d)
    config = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**config, "eos_token": "</s>"}))
    with pytest.raises(UserError, match=r"tokenizer_config.json: eos_token '</s>' is not a special token"):
        load_tokenizer(d)


@pytest.mark.parametrize("file,value", [("generation_config.json", "im_end"),
                                        ("generation_config.json", [151645, None]), ("config.json", 1.5)])
def test_a_token_id_that_is_not_a_whole_number_names_file_and_key(tmp_path, vocab_dirs, file, value):
    d = tmp_path / "m"
    shutil.copytree(vocab_dirs["qwen2"], d)
    (d / "generation_config.json").unlink()
    (d / file).write_text(json.dumps({"eos_token_id": value}))
    with pytest.raises(UserError) as err:
        load_tokenizer(d)
    assert err.value.messages == [f"{d / file}: eos_token_id is {json.dumps(value)}; expected a token id (a whole "
                                  "number) or a list of them, as transformers writes it"]


@pytest.mark.parametrize("preset", ["llama-3.2-1b", "qwen3-0.6b"])
def test_a_preset_of_another_family_has_no_tokenizer(preset):
    with pytest.raises(UserError, match=f"preset '{preset}' has no tokenizer"):
        load_tokenizer(preset)
