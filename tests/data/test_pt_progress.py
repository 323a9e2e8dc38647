"""pt's tokenization shows a progress bar in characters, with its ETA, as sft's does in rows: plan and validate
tokenize a whole pt corpus and were silent for its minutes. On a terminal only, from PROGRESS_MIN_CHARS on."""
from __future__ import annotations

import io
import sys

from pipeline.data import tokenize
from pipeline.data.tokenizer import gpt2


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_pt_documents_tokenize_under_a_bar_on_a_terminal_only(monkeypatch):
    docs = ["a" + " a" * 9] * 5000  # 19 characters each: 95,000, over BATCH_MIN documents (several threads)
    monkeypatch.setattr(tokenize, "PROGRESS_MIN_CHARS", 1000)
    for stream, shown in ((Terminal(), True), (io.StringIO(), False)):
        monkeypatch.setattr(sys, "stderr", stream)
        assert tokenize.encode_documents(docs, gpt2()) == [gpt2().encode(docs[0])] * 5000
        last = stream.getvalue().split("\r")[-1]
        assert (last.startswith("tokenize: 100%") and "95.0k/95.0k [" in last and "<" in last) is shown, last
    monkeypatch.setattr(tokenize, "PROGRESS_MIN_CHARS", 10**6)  # a short corpus: no bar
    monkeypatch.setattr(sys, "stderr", Terminal())
    tokenize.encode_documents(docs, gpt2())
    assert sys.stderr.getvalue() == ""
