"""A template's blocks as Jinja expressions for one tokenizer: the text the exported chat template writes for each
(pipeline.data.chat_template), so that transformers' apply_chat_template, which tokenizes the rendered string whole,
gives the ids training gives by encoding each block's texts on their own.

On a byte-level vocabulary a block is its text ({bos} / {eos} as the tokenizer's tokens). On a sentencepiece one
(tokenizer.prepend_scheme "first" or "always": Llama 2, Mistral) training encodes every text that starts a piece - a
block's start, the text after {bos} / {eos} - on its own, and its Metaspace puts a prefix "▁" in front unless the
text starts with a space ("▁" itself) already; the text after a markup token inside a block continues its string
(templates.Continued) and gets none. In the rendered string the Metaspace adds that "▁" only at the start of a
split (the text between two added tokens): with "always" at every split's start, with "first" at the string's start
alone. Where training's piece starts and the rendered text gets no prefix - after text in the same split (llama2's
"[/INST]" on Llama 2's vocabulary, where it is text, and the answer), or after an added token with "first" (the
"[INST]" after <s> on Llama 2's layout, the answer after v0.3's [/INST] token) - the block writes a space there,
which the Metaspace turns into that "▁": statically for a template's text, at render time (the `lead` macro) for a
piece that starts with a message's content, which may start with a space itself or be empty. Elsewhere a space
would not change the ids but is left out, so that the text stays LLaMA-Factory's where it already gave training's
ids (mistral on v0.1 and v0.3). A byte-level vocabulary, or prepend_scheme "never", gets no space: one would be a
token there.

Not covered: a reasoning template's thought, which training encodes as a piece of its own before the answer (no
sentencepiece checkpoint here ships one), and a text that ends with a space right before a piece that starts with
one (a vocabulary piece "▁▁" may then join them in the rendered string).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Mapping

from pipeline.data.jinja_text import literal
from pipeline.data.templates import BOS, EOS, Special, Template, split_slots

if TYPE_CHECKING:
    from pipeline.data.tokenizer import Tokenizer

# What a text follows in the rendered string: its start, an added token (BOS / EOS inside a block; any markup at a
# block's start), the text of the same piece (after a markup token inside its block: Continued in training, or the
# reply after its user block), text of another piece in the same split
START, MARK, CONTINUED, TEXT = "start", "mark", "continued", "text"
LEAD_MACRO = ("{%- macro lead(text) -%}{{- (' ' if text and text[0] not in ' \u2581' else '') ~ text -}}"
              "{%- endmacro -%}")


def after(*edges: str | None) -> str:
    """One edge for a block that may follow any of `edges` (None: a block that writes nothing is skipped): the one
    that needs a space if any does (TEXT, then MARK)."""
    known = [e for e in edges if e is not None]
    return next((e for e in (TEXT, MARK, CONTINUED) if e in known), START)


@dataclass
class Blocks:
    """How `template` (as the vocabulary writes it: Template.for_vocabulary) is written for a tokenizer."""

    template: Template
    marks: Mapping[str, str]  # {bos} / {eos} -> their text ("" for no BOS)
    scheme: str | None  # the tokenizer's prepend_scheme where spaces are written ("first", "always"), else None
    uses_lead: bool = False  # an expression calls LEAD_MACRO (the chat template then defines it)

    @classmethod
    def of(cls, template: Template, tokenizer: "Tokenizer") -> "Blocks":
        ids = template.ids(tokenizer)
        marks = {BOS: "" if ids[BOS] is None else tokenizer.decode([ids[BOS]]), EOS: tokenizer.decode([ids[EOS]])}
        scheme = tokenizer.prepend_scheme
        return cls(template.for_vocabulary(tokenizer), marks, scheme if scheme in ("first", "always") else None)

    def _items(self, fmt: str) -> Iterator[tuple[str, str]]:
        """(kind, text) of a block: "slot" (its variable), "mark" ({bos} / {eos}), "markup", "text"."""
        for i, part in enumerate(split_slots(fmt)):
            if i % 2:
                yield "slot", ""
                continue
            for bit in self.template.split_markup(part):
                if isinstance(bit, Special):
                    yield ("mark" if bit.token in (BOS, EOS) else "markup"), self.marks.get(bit.token, bit.token)
                elif bit:
                    yield "text", bit

    def ending(self, fmt: str) -> str | None:
        """What a block leaves the next one after (None: it writes nothing): an added token (MARK) or text."""
        last = None
        for kind, text in self._items(fmt):
            if kind == "slot" or text:
                last = kind
        return None if last is None else MARK if last in ("mark", "markup") else TEXT

    def _needs_space(self, edge: str) -> bool:
        """Whether a piece after `edge` gets no prefix "▁" in the rendered string where training gives it one."""
        return self.scheme is not None and (edge == TEXT or (edge == MARK and self.scheme == "first"))

    def expression(self, fmt: str, variable: str = "", edge: str = TEXT) -> str:
        """The block as a Jinja expression: its text, {bos} / {eos} as their tokens, its slot as `variable`, and the
        space in front of each piece that needs one; `edge`: what the block follows."""
        items: list[tuple[bool, str]] = []  # (static text, else a Jinja expression)
        run: list[tuple[bool, str]] = []  # the current piece's items

        def close(state: str) -> None:
            if not run:
                return
            if self._needs_space(state):
                static, first = run[0]
                if static:
                    run[0] = (True, first if first.startswith((" ", "\u2581")) else " " + first)
                else:  # a message's content: decided when rendered
                    run[:] = [(False, "lead(" + " + ".join(_jinja(x) for x in run) + ")")]
                    self.uses_lead = True
            items.extend(run)
            run.clear()

        state = edge
        for kind, text in self._items(fmt):
            if kind == "slot" or kind == "text":
                run.append((kind == "text", text if kind == "text" else variable))
                continue
            wrote = bool(run)
            close(state)
            if text:
                items.append((True, text))
                state = MARK if kind == "mark" else CONTINUED
            else:  # no BOS: the text after it is still a piece of its own, after what came before
                state = TEXT if wrote else MARK if state == CONTINUED else state
        close(state)
        merged: list[tuple[bool, str]] = []
        for static, text in items:
            if static and merged and merged[-1][0]:
                merged[-1] = (True, merged[-1][1] + text)
            elif not static or text:
                merged.append((static, text))
        return " + ".join(_jinja(x) for x in merged) or "''"


def _jinja(item: tuple[bool, str]) -> str:
    static, text = item
    return literal(text) if static else text
