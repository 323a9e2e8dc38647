"""A warning for rows that type a markup token (`<|im_end|>` in an answer): it stays text here, not in LLaMA-Factory.

The tokenizer keeps markup literal in user text (pipeline.data.tokenizer_files.markup_tokens) so that data cannot
forge a turn; LLaMA-Factory's transformers tokenizer makes every added token one token unless split_special_tokens
is true (then only the special ones stay text). A row that types such a token trains on other ids here than there,
which a user porting data should hear once per dataset: `validate` and `inspect` say it, with the first row and the
count. Not an error: the data is valid, and literal is what the row says.
"""
from __future__ import annotations

import re
from typing import Any, Iterator, Sequence

from pipeline.data.args import DataArgs
from pipeline.data.origins import Origin
from pipeline.data.problems import alike, line_order
from pipeline.data.tokenizer import Tokenizer

NOT_TEXT = ("roles", "kto_tag")  # row fields that are no text of the conversation


def differing_tokens(tokenizer: Tokenizer, split_special_tokens: bool) -> frozenset[str]:
    """The added tokens user text keeps literal here but LLaMA-Factory's tokenizer reads as one token: every added
    token is one there, the special ones split under split_special_tokens (transformers' encode_special_tokens)."""
    return frozenset(t for t in tokenizer.kept_literal if not (split_special_tokens and t in tokenizer.special))


def _texts(value: Any, field: str) -> Iterator[tuple[str, str]]:
    """(field, text) of every string in a row's value: history's turns as history[i][j]."""
    if isinstance(value, str):
        yield field, value
    elif isinstance(value, list):
        for i, item in enumerate(value):
            yield from _texts(item, f"{field}[{i}]")


def typed(rows: Sequence[Any], pattern: re.Pattern[str]) -> list[tuple[int, str, str]]:
    """(index, field, token) of each row that types a token (its first field that does)."""
    out = []
    for index, row in enumerate(rows):
        if isinstance(row, dict):
            found = next(((field, m.group()) for key, value in row.items() if key not in NOT_TEXT
                          for field, text in _texts(value, key) if (m := pattern.search(text))), None)
            if found:
                out.append((index, *found))
    return out


def typed_markup_warnings(tokenizer: Tokenizer, split_special_tokens: bool,
                          datasets: Sequence[tuple[str, Sequence[Any], Sequence[Origin]]]) -> list[str]:
    """One `warning:` per dataset whose rows (its built splits: `datasets` holds (name, rows, origins)) type a token
    that stays literal here and is one token in LLaMA-Factory, naming the first such row of the raw files and the
    count."""
    tokens = differing_tokens(tokenizer, split_special_tokens)
    if not tokens:
        return []
    pattern = re.compile("|".join(map(re.escape, sorted(tokens, key=len, reverse=True))))
    hits: dict[str, list[tuple[Origin, str, str]]] = {}
    for name, rows, origins in datasets:
        hits.setdefault(name, []).extend((origins[i], field, token) for i, field, token in typed(rows, pattern))
    out = []
    for found in filter(None, hits.values()):
        origin, field, token = min(found, key=lambda hit: (hit[0].file, line_order(hit[0].where)))
        out.append(f"warning: {origin}: {field} types {token!r}, which stays literal text here (split into ordinary "
                   f"tokens, so that data cannot forge a turn); LLaMA-Factory makes it one token (id "
                   f"{tokenizer.token_id(token)}){alike(len(found))}")
    return out


def built_markup_warnings(data: DataArgs) -> list[str]:
    """typed_markup_warnings over the built splits of every dataset the recipe uses, for `inspect` (`validate` has
    them from the rows check_built reads: Checked.warnings); none while the recipe's tokenizer is not on this
    machine."""
    from pipeline.data.build import SPLITS, all_specs, built_dir
    from pipeline.data.load import read_rows
    from pipeline.data.model_tokenizer import available_tokenizer
    from pipeline.data.origins import built_origins

    tokenizer = available_tokenizer(data)
    if tokenizer is None:
        return []

    loaded = []
    for spec in all_specs(data):
        for split in SPLITS:
            path = built_dir(data.dataset_dir, spec.name) / f"{split}.json"
            if path.is_file():
                rows = read_rows(path, data, verify=False)
                loaded.append((spec.name, rows, built_origins(path, len(rows), spec.shown)))
    return typed_markup_warnings(tokenizer, data.split_special_tokens, loaded)
