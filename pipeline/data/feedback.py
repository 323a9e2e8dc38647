"""KTO rows (stage kto): each row's example and its mismatched "KL" sequence, tokenized as a preference pair.

A KTO row is a prompt, one response and kto_tag (true: desirable). KTO estimates KL(policy || reference) from
sequences whose response does not belong to their prompt; LLaMA-Factory 0.9.5 builds them at preprocessing
(src/llamafactory/data/processor/feedback.py, preprocess_dataset): row i's prompt with the response of row i - 1,
row 0 taking the last row's, within each preprocessing batch of 1,000 rows (its preprocessing_batch_size default).
The same here, per built split, in chunks of KL_CHUNK rows.

The example and its KL sequence are then exactly a pair (pipeline.data.pairs.encode_pairs): "chosen" is the
example, "rejected" its KL sequence; both tokenized as sft tokenizes a row, only the last response scored, and the
over-length policy applies to the two together (LLaMA-Factory truncates each on its own; here `drop`, `error` and
`truncate` work as for dpo pairs). A batch of B rows is therefore the (2B, T) pair batch, the B examples then their
B KL sequences, plus "kto_tags" (B,) bool. An example whose KL sequence is the same tokens (a repeated response)
is kept: its KL term is simply 0.
"""
from __future__ import annotations

from typing import Any, Mapping, Sequence

from pipeline.data.args import DataArgs
from pipeline.data.origins import Origin
from pipeline.data.pairs import TokenizedPairs, encode_pairs, tokenized_rows
from pipeline.data.templates import Template
from pipeline.data.tokenizer import Tokenizer

KL_CHUNK = 1000  # LLaMA-Factory's preprocessing_batch_size default: the KL responses rotate within such chunks


def kl_rows(rows: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Pair rows: "chosen" = the row's own output, "rejected" = the output of the row before it in its chunk."""
    out = []
    for start in range(0, len(rows), KL_CHUNK):
        chunk = rows[start:start + KL_CHUNK]
        for i, row in enumerate(chunk):
            mismatched = chunk[i - 1]["output"]  # i = 0: the chunk's last row, as LLaMA-Factory's [-1] + [:-1]
            out.append({**{k: v for k, v in row.items() if k not in ("output", "kto_tag")},
                        "chosen": row["output"], "rejected": mismatched})
    return out


def encode_feedback(rows: Sequence[Mapping[str, Any]], template: Template | str, tokenizer: Tokenizer, *,
                    cutoff_len: int, policy: str = "drop", enable_thinking: bool = True,
                    origins: Sequence[Origin | str] | None = None) -> TokenizedPairs:
    """Every row's example ("chosen") and KL sequence ("rejected"), with its tag, the length policy per row."""
    return encode_pairs(kl_rows(rows), template, tokenizer, cutoff_len=cutoff_len, policy=policy,
                        enable_thinking=enable_thinking, origins=origins, drop_same=False,
                        tags=[bool(row["kto_tag"]) for row in rows])


def tokenized_feedback(data: DataArgs, split: str) -> TokenizedPairs:
    """The recipe's kto `split`, with its template and length policy (once per process)."""
    return tokenized_rows(data, split, {"kto_tag"}, "not a KTO row (no kto_tag)", encode_feedback)
