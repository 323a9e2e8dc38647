"""The tokens a recipe adds to its tokenizer, from every spelling LLaMA-Factory has had for them.

- `add_tokens` (LLaMA-Factory 0.9.3+): tokens that are not special: one token in any text, and kept by
  skip_special_tokens (transformers' add_tokens(..., special_tokens=False)).
- `add_special_tokens` (0.9.3+) and `new_special_tokens` (its name up to 0.9.2; both are accepted, one at a
  time: pipeline.recipe.rules): special tokens (add_tokens(..., special_tokens=True)).
- `new_special_tokens_config` (0.9.4+): a YAML file {token: description}; its tokens are the special ones (they
  win over add_special_tokens, as there, and a notice says so) and their descriptions can give their rows
  (init_special_tokens, pipeline.model.vocab).

Read here once, so that the data, the model, plan, the notices and the exports add the same tokens.
"""
from __future__ import annotations

import functools
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

from pipeline.data.tokenizer import new_token_names
from pipeline.errors import UserError

SPECIAL_KEYS = ("add_special_tokens", "new_special_tokens")  # one key under two names (LLaMA-Factory 0.9.3's, older)
TOKEN_KEYS = ("add_tokens", *SPECIAL_KEYS, "new_special_tokens_config")  # the recipe keys TokenNames reads
DESCRIBED = ("desc_init", "desc_init_w_noise")  # init_special_tokens values that read the descriptions


@dataclass(frozen=True)
class TokenNames:
    """What a recipe adds: `plain` then `special` names (LLaMA-Factory adds them in that order), and the
    descriptions of new_special_tokens_config (None without one)."""

    plain: tuple[str, ...] = ()
    special: tuple[str, ...] = ()
    descriptions: Mapping[str, str] | None = field(default=None, compare=False)

    @classmethod
    def of(cls, args: Any) -> TokenNames:
        """The names of an argument group (DataArgs, ModelArgs) or a recipe's values (a mapping)."""
        plain = new_token_names(group_value(args, "add_tokens"))
        config = group_value(args, "new_special_tokens_config")
        if config:
            descriptions = read_descriptions(str(config))
            return cls(plain, tuple(descriptions), descriptions)
        special = next((value for key in SPECIAL_KEYS if (value := group_value(args, key)) is not None), None)
        return cls(plain, new_token_names(special))

    def __bool__(self) -> bool:
        return bool(self.plain or self.special)


def group_value(args: Any, key: str) -> Any:
    """`key` of an argument group (DataArgs, ModelArgs) or of a recipe's values (a mapping); None when absent."""
    if isinstance(args, Mapping):
        return args.get(key)
    return getattr(args, key, None)


def read_descriptions(path: str) -> dict[str, str]:
    """new_special_tokens_config's {token: description}, read with yaml.safe_load (LLaMA-Factory reads it with
    OmegaConf, which gives the same mapping); relative paths from the current directory, as every path of a
    recipe. One UserError with the file's line for what LLaMA-Factory would fail on later (a token that is no
    text or empty, a description that is no text: transformers cannot tokenize it)."""
    try:
        stat = os.stat(path)
    except OSError:
        raise UserError(f"file {path!r} not found (paths are relative to the current directory {os.getcwd()}); "
                        "expected a YAML file of token: description lines") from None
    return dict(_read(os.path.abspath(path), stat.st_mtime_ns, stat.st_size))


@functools.lru_cache(maxsize=8)
def _read(path: str, _mtime: int, _size: int) -> tuple[tuple[str, str], ...]:
    import yaml

    try:
        text = Path(path).read_text(encoding="utf-8")
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"{path}: cannot read it as UTF-8 text ({err})") from None
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark
        raise UserError(f"{path}:{mark.line + 1}:{mark.column + 1}: invalid YAML: {err.problem}") from None
    if not isinstance(data, dict) or not data:
        raise UserError(f"{path}:1:1: expected a mapping of token: description lines (\"<think>: the start of the "
                        f"reasoning\"), found {'nothing' if data is None else type(data).__name__}")
    lines = {key.value: key.start_mark.line + 1 for key, _ in node.value} if isinstance(node, yaml.MappingNode) else {}
    problems = []
    for token, description in data.items():
        where = f"{path}:{lines.get(str(token), 1)}"
        if not isinstance(token, str) or not token.strip():
            problems.append(f"{where}: token {token!r}: expected the token's text (quote it when YAML reads it as "
                            "something else)")
        elif not isinstance(description, str):
            problems.append(f"{where}: {token}: description {description!r}; expected text (quote it)")
    if problems:
        raise UserError(problems)
    return tuple(data.items())
