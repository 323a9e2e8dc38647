"""The export's tokenizer ends an answer where the fine-tune learned to (pipeline.merge.export_eos_token /
set_eos_token), on the real Llama 3 and Qwen tokenizer files, read back by transformers.

Golden values: LLaMA-Factory's rule, written out by hand per template. Its src/llamafactory/data/template.py at
v0.9.5 (commit 7af909522a951e3ad9f022ea6f88b6755257eaa5), Template.fix_special_tokens, lines 189-198: a template
registered with replace_eos=True gets stop_words[0] as the tokenizer's eos_token; every other template leaves the
tokenizer's own. Registered with replace_eos: chatml (line 733, stop words <|im_end|>, <|im_start|>), llama3 (1412,
<|eot_id|>, <|eom_id|>), qwen (1946), qwen3 (1963), qwen3_nothink (1980) (<|im_end|>); without: alpaca (671),
default (864), empty (890), deepseekr1 (828: DeepSeek-R1-Distill's own <｜end▁of▁sentence｜>), openchat-3.6 (1834:
stop word <|eot_id|>, but no replace_eos). pt trains on plain text, ended by the tokenizer's own EOS.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline import merge
from pipeline.data.model_tokenizer import load_tokenizer
from pipeline.recipe.args import data_args

transformers = pytest.importorskip("transformers")

# LLaMA-Factory's replace_eos templates -> their stop_words[0]; other templates keep the tokenizer's eos_token
LF_REPLACE_EOS = {"llama3": "<|eot_id|>", "qwen": "<|im_end|>", "qwen3": "<|im_end|>", "qwen3_nothink": "<|im_end|>",
                  "chatml": "<|im_end|>"}
# the eos_token of tests/vocab/conftest.py's tokenizer directories (the published checkpoints')
OWN_EOS = {"llama3_base": "<|end_of_text|>", "llama3": "<|eot_id|>", "qwen2_base": "<|endoftext|>",
           "qwen3": "<|im_end|>", "deepseek_r1_qwen": "<｜end▁of▁sentence｜>"}
CASES = ["llama3_base llama3 sft", "llama3_base llama3 dpo", "llama3_base alpaca sft", "llama3_base default sft",
         "llama3_base empty sft", "llama3_base llama3 pt", "llama3 llama3 sft", "llama3 alpaca sft",
         "qwen2_base qwen sft", "qwen2_base chatml sft", "qwen2_base qwen3_nothink sft", "qwen2_base alpaca sft",
         "qwen2_base qwen pt", "qwen3 qwen3 sft", "deepseek_r1_qwen deepseekr1 sft",
         "llama3_base openchat-3.6 sft"]


@pytest.mark.parametrize("case", CASES)
def test_the_exports_eos_token_is_llama_factorys(vocab_dirs, case):
    family, template, stage = case.split()
    want = OWN_EOS[family] if stage == "pt" else LF_REPLACE_EOS.get(template, OWN_EOS[family])
    directory = vocab_dirs[family]
    data = data_args({"model_name_or_path": str(directory), "template": template, "stage": stage})
    assert merge.export_eos_token(data, load_tokenizer(directory)) == want


def test_the_written_tokenizer_says_the_templates_eos_and_keeps_the_rest(vocab_dirs, tmp_path):
    """A Qwen2.5 base (eos <|endoftext|>) exported for qwen: transformers' tokenizer of the export says <|im_end|>
    (id 151645, Qwen's published id). Every other key, and tokenizer.json, stay the base's; the pad stays
    <|endoftext|>."""
    base = vocab_dirs["qwen2_base"]
    tokenizer = load_tokenizer(base)
    data = data_args({"model_name_or_path": str(base), "template": "qwen", "stage": "sft"})
    merge.write_tokenizer_files(tmp_path, tokenizer, 256, eos_token=merge.export_eos_token(data, tokenizer))
    tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    assert (tok.eos_token, tok.eos_token_id, tok.pad_token) == ("<|im_end|>", 151645, "<|endoftext|>")
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        written, before = (json.loads((d / name).read_text()) for d in (tmp_path, base))
        assert written == {**before, "eos_token": "<|im_end|>"}, name
    assert (tmp_path / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_an_eos_spelled_as_an_added_token_object_keeps_its_fields(tmp_path):
    """special_tokens_map.json, which transformers reads over tokenizer_config.json, may spell the EOS as an
    AddedToken object (Llama 3's does): its content changes, its other fields stay."""
    added = {"content": "<|end_of_text|>", "lstrip": False, "normalized": False, "rstrip": False, "single_word": False}
    special = {"bos_token": "<|begin_of_text|>", "eos_token": added}
    (tmp_path / "special_tokens_map.json").write_text(json.dumps(special))
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|end_of_text|>"}))
    merge.set_eos_token(tmp_path, "<|eot_id|>")
    assert json.loads((tmp_path / "special_tokens_map.json").read_text()) == {
        **special, "eos_token": {**added, "content": "<|eot_id|>"}}
    assert json.loads((tmp_path / "tokenizer_config.json").read_text()) == {"eos_token": "<|eot_id|>"}


def test_a_tokenizer_already_ending_answers_there_is_copied_as_it_is(vocab_dirs, tmp_path):
    """Qwen3 says <|im_end|> itself: its files are copied byte for byte."""
    base: Path = vocab_dirs["qwen3"]
    tokenizer = load_tokenizer(base)
    data = data_args({"model_name_or_path": str(base), "template": "qwen3", "stage": "sft"})
    merge.write_tokenizer_files(tmp_path, tokenizer, 256, eos_token=merge.export_eos_token(data, tokenizer))
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / name).read_bytes() == (base / name).read_bytes()
