"""Prompt templates, all registered here as data, chosen by the recipe's `template:`.

A template renders an Alpaca row as turns: [system block] prompt_1 response_1 <EOS> [separator]
prompt_2 response_2 <EOS> ... (history turns first, the row's instruction/output last). EOS (id 50256)
is a token, not text: it is added by the tokenizer after each response (see tokenize.py).

- alpaca: the book's prompt, exactly ("Below is an instruction that describes a task. Write a response
  that appropriately completes the request.\\n\\n### Instruction:\\n...", "\\n\\n### Input:\\n..." only when
  the input is non-empty, then "\\n\\n### Response:\\n"). A row's system prompt replaces the first sentence
  pair, as in LLaMA-Factory's alpaca template.
- chatml: <|im_start|>role\\n...<|im_end|> markup. GPT-2's vocabulary has no such special tokens, so the
  markers are ordinary text (several BPE tokens each); the response ends with "<|im_end|>" (trained,
  so the model learns to close its turn) and then EOS. Generation should stop at "<|im_end|>".
- empty: no markup at all; instruction and input joined by a newline, the response follows directly.

Placeholders ({content}, {instruction}, {input}, {system}) are filled by splitting the template text
once and joining the values in: user text is never formatted or scanned again, so a row containing
"{input}" or "{0.__class__}" stays literal.
"""
from __future__ import annotations

import functools
import re
from dataclasses import dataclass
from typing import Iterable, NamedTuple, Sequence

from pipeline.errors import UserError, did_you_mean

_SLOT = re.compile(r"\{(content|instruction|input|system)\}")


@functools.lru_cache(maxsize=None)
def _parts(fmt: str) -> tuple[str, ...]:
    """Literal, slot, literal, slot, ... (odd indices are slot names)."""
    return tuple(_SLOT.split(fmt))


def fill(fmt: str, **values: str) -> str:
    """Put values into a template string's slots by concatenation (never str.format)."""
    parts = _parts(fmt)
    if len(parts) == 3:  # one slot, the usual case: no loop
        return parts[0] + values[parts[1]] + parts[2]
    return "".join([values[p] if i % 2 else p for i, p in enumerate(parts)])


class Segment(NamedTuple):
    """A piece of a rendered example: its text, whether its tokens are trained, whether EOS follows it."""

    text: str
    trainable: bool
    response: bool  # an assistant turn (EOS follows it)


@dataclass(frozen=True)
class Template:
    name: str
    system: str  # how a system prompt opens the text: slot {system}
    default_system: str  # used when the row has no system prompt ("" = no system block)
    user: str  # one turn's prompt: slot {content}
    query: str  # how a non-empty input joins the instruction: slots {instruction}, {input}
    assistant: str  # the response as appended (EOS follows): slot {content}
    separator: str  # between a response's EOS and the next turn's prompt
    stop_strings: tuple[str, ...] = ()
    description: str = ""

    def __post_init__(self) -> None:
        for fmt, slots in ((self.system, ["system"]), (self.user, ["content"]), (self.assistant, ["content"]),
                           (self.query, ["instruction", "input"])):
            if list(_parts(fmt)[1::2]) != slots:
                raise ValueError(f"template {self.name}: {fmt!r} must have the slots {slots} in that order")

    def _content(self, instruction: str, input: str) -> str:
        return fill(self.query, instruction=instruction, input=input) if input else instruction

    def _head(self, system: str | None) -> str:
        system = system or self.default_system
        return fill(self.system, system=system) if system else ""

    def turns(self, instruction: str, input: str = "", output: str = "", system: str | None = None,
              history: Iterable[Sequence[str]] = ()) -> list[tuple[str, str]]:
        """(prompt text, response text) per turn, oldest first; the separator opens every later prompt."""
        user, assistant = _parts(self.user), _parts(self.assistant)  # one {content} slot each
        opening = self._head(system)
        out = []
        for q, a in [*history, (self._content(instruction, input), output)]:
            out.append((opening + user[0] + str(q) + user[2], assistant[0] + str(a) + assistant[2]))
            opening = self.separator
        return out

    def prompt(self, instruction: str, input: str = "", system: str | None = None,
               history: Iterable[Sequence[str]] = ()) -> str:
        """Everything before the response. With history, earlier turns end in EOS, written here as the
        text <|endoftext|>; use tokenize.encode_prompt for the exact ids (EOS as id 50256)."""
        from pipeline.data.tokenizer import EOS_TEXT

        turns = self.turns(instruction, input, "", system, history)
        return "".join(p + r + EOS_TEXT for p, r in turns[:-1]) + turns[-1][0]

    def response(self, output: str) -> str:
        """The response text as appended after the prompt (without EOS)."""
        return fill(self.assistant, content=output)

    def segments(self, row: dict, *, train_on_prompt: bool = False, mask_history: bool = False) -> list[Segment]:
        """The (text, trainable) pieces of a full example, so masks are built per turn.

        Responses are trained (every turn, or only the last with mask_history); prompts only with
        train_on_prompt (and, with mask_history, only the last turn's prompt).
        """
        turns = self.turns(row["instruction"], row.get("input") or "", row["output"], row.get("system"),
                           row.get("history") or ())
        last = len(turns) - 1
        out = []
        for k, (p, a) in enumerate(turns):
            trained = not mask_history or k == last
            out.append(Segment(p, train_on_prompt and trained, False))
            out.append(Segment(a, trained, True))
        return out


ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(
            name="alpaca",
            system="{system}\n\n",
            default_system=ALPACA_SYSTEM,
            user="### Instruction:\n{content}\n\n### Response:\n",
            query="{instruction}\n\n### Input:\n{input}",
            assistant="{content}",
            separator="\n\n",
            description="the book's Alpaca prompt",
        ),
        Template(
            name="chatml",
            system="<|im_start|>system\n{system}<|im_end|>\n",
            default_system="",
            user="<|im_start|>user\n{content}<|im_end|>\n<|im_start|>assistant\n",
            query="{instruction}\n\n{input}",
            assistant="{content}<|im_end|>",
            separator="\n",
            stop_strings=("<|im_end|>",),
            description="ChatML markup as plain text (GPT-2 has no <|im_start|> token)",
        ),
        Template(
            name="empty",
            system="{system}\n",
            default_system="",
            user="{content}",
            query="{instruction}\n{input}",
            assistant="{content}",
            separator="",
            description="no markup: the prompt is the instruction (and input), the response follows",
        ),
    )
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise UserError(f"template '{name}' is not known{did_you_mean(name, TEMPLATES)}; "
                        f"choose one of {', '.join(TEMPLATES)}") from None
