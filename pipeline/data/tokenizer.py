"""The GPT-2 BPE tokenizer, usable offline.

`make setup` places the GPT-2 ranks (identical to tiktoken's r50k_base, shipped inside the
openai-whisper source distribution on PyPI) at `.cache/gpt2.tiktoken` and checks their sha256.
When that file is absent, tiktoken's normal online path (`tiktoken.get_encoding("gpt2")`) is used.
"""
from __future__ import annotations

import functools
import hashlib
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import tiktoken

EOS_ID = 50256
EOS_TEXT = "<|endoftext|>"
RANKS_SHA256 = "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930"
WHISPER_SDIST = "openai-whisper==20250625"
REPO_ROOT = Path(__file__).resolve().parents[2]
# Same pattern as tiktoken_ext.openai_public.r50k_pat_str (GPT-2's original split, faster form).
GPT2_PATTERN = r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""


def ranks_path() -> Path:
    return Path(os.environ.get("PIPELINE_GPT2_RANKS", REPO_ROOT / ".cache" / "gpt2.tiktoken"))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@functools.lru_cache(maxsize=1)
def get_tokenizer() -> tiktoken.Encoding:
    """GPT-2 encoding: from the offline ranks file when present, else tiktoken's download."""
    path = ranks_path()
    if not path.is_file():
        return tiktoken.get_encoding("gpt2")
    from tiktoken.load import load_tiktoken_bpe

    ranks = load_tiktoken_bpe(str(path), expected_hash=RANKS_SHA256)
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={EOS_TEXT: EOS_ID},
        explicit_n_vocab=50257,
    )


def install(dest: Path | None = None) -> Path:
    """Fetch the ranks from PyPI (openai-whisper sdist), verify sha256, place them atomically. Idempotent."""
    dest = dest or ranks_path()
    if dest.is_file() and _sha256(dest) == RANKS_SHA256:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:", WHISPER_SDIST, "-d", tmp],
            check=True,
        )
        (sdist,) = Path(tmp).glob("openai_whisper-*.tar.gz")
        with tarfile.open(sdist) as tar:
            member = next(m for m in tar.getmembers() if m.name.endswith("whisper/assets/gpt2.tiktoken"))
            data = tar.extractfile(member).read()  # type: ignore[union-attr]
        if hashlib.sha256(data).hexdigest() != RANKS_SHA256:
            raise SystemExit(f"gpt2.tiktoken from {WHISPER_SDIST} has an unexpected sha256; refusing to install it")
        tmp_dest = dest.with_suffix(".tmp")
        tmp_dest.write_bytes(data)
        os.replace(tmp_dest, dest)
    return dest


if __name__ == "__main__":
    where = install()
    enc = get_tokenizer()
    ids = enc.encode("Hello, do you like tea? <|endoftext|> In the sunlit terraces", allowed_special={EOS_TEXT})
    assert ids[:9] == [15496, 11, 466, 345, 588, 8887, 30, 220, 50256], ids
    print(f"GPT-2 tokenizer ready (offline ranks at {where}, sha256 verified)")
