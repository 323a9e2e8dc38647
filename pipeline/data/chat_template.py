"""A Template as a Jinja chat template, so that an exported model chats in the format it was trained on.

transformers' `tokenizer.apply_chat_template` and vLLM's chat endpoints render a conversation with the Jinja
string in tokenizer_config.json's `chat_template`. merge and export write this one there (pipeline.merge), made
from the recipe's Template (`DataArgs.chat_template()`: its default_system included), so the fields of
pipeline.data.templates stay the one description of every format. As LLaMA-Factory's `_get_jinja_template`,
each block of the template becomes a Jinja expression: its literal text (markup tokens as their text; {bos} and
{eos} as the tokenizer's tokens, the EOS being the first stop word for `replace_eos` templates) joined with
the message's content. The rendering follows `Template.turns(..., mask_history=True)`, which is how eval and
chat encode a prompt (pipeline.data.tokenize.encode_prompt):

- a system message (else the default system prompt) opens the text after the prefix; an empty one is absent;
- turns alternate user / assistant; every later user turn opens with the separator;
- the template's `reply` (the assistant header that ends a user block) is written before an answer, or at the
  end with `add_generation_prompt`, as Hugging Face's templates do;
- a reasoning template (qwen3): earlier answers lose their thoughts; the answer after the last user turn gets
  the empty thought in front when it has none, or with `enable_thinking=False` (a chat-template argument whose
  default is the recipe's enable_thinking) loses its thought and the empty thought ends the prompt instead.

A message's content is a string, or OpenAI's list of parts (`[{"type": "text", "text": ...}]`, as chat clients
send it): its text parts joined by "\n", as vLLM joins them for a template that takes strings, so both render the
same prompt; a part that is not text raises. A missing or None content (transformers drops None keys) is "".

Tool calls are not rendered: `tools=`, an assistant message with `tool_calls`, or a message whose role is not
system / user / assistant raises, rather than render a prompt the model was not trained on (training renders
them: pipeline.data.tools).

Where the rendered string is tokenized whole, the ids equal training's (each block tokenized on its own) as long
as the tokenizer does not merge across two blocks; the markup between blocks keeps them apart in every shipped
template except `empty` (nothing between a system prompt and the user's text, nor between turns).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.data.templates import BOS, EOS, Template, split_slots

if TYPE_CHECKING:
    from pipeline.data.args import DataArgs
    from pipeline.data.tokenizer import Tokenizer

REFUSED = ("this chat template (written by pipeline merge / export) renders system, user and assistant turns only, "
           "alternating user / assistant: tool calls and other roles are not rendered")


def literal(text: str) -> str:
    """`text` as a Jinja string literal. Jinja reads a literal's backslash escapes (unicode-escape) and turns
    \\r\\n into \\n, so backslashes, quotes and control characters are escaped; other characters stay as they are."""
    out = []
    for char in text:
        if char in "\\'":
            out.append("\\" + char)
        elif char == "\n":
            out.append("\\n")
        elif ord(char) < 32 or ord(char) == 127:
            out.append(f"\\x{ord(char):02x}")
        else:
            out.append(char)
    return "'" + "".join(out) + "'"


def _expression(fmt: str, marks: dict[str, str], variable: str = "") -> str:
    """A template block as a Jinja expression: its text, {bos} / {eos} as their tokens, its slot as `variable`."""
    items = []
    for i, part in enumerate(split_slots(fmt)):
        if i % 2:
            items.append(variable)
        else:
            for mark, text in marks.items():
                part = part.replace(mark, text)
            if part:
                items.append(literal(part))
    return " + ".join(items) or "''"


def _thought_macros(template: Template) -> str:
    """Jinja macros of Template.remove_thought (every open ... first close after it removed, then the leading
    newlines) and Template._has_thought, for reasoning templates."""
    assert template.thought_words is not None
    open_, close = map(literal, template.thought_words)
    words = " or ".join(f"{literal(w.strip())} in text" for w in template.thought_words)
    return (
        "{%- macro remove_thought(text) -%}"
        "{%- set t = namespace(out='', pending='', inside=false) -%}"
        "{%- for piece in text.split(" + open_ + ") -%}"
        "{%- if loop.first -%}{%- set t.out = piece -%}"
        "{%- else -%}"
        "{%- set t.pending = t.pending + " + open_ + " + piece if t.inside else piece -%}{%- set t.inside = true -%}"
        "{%- if " + close + " in t.pending -%}"
        "{%- set t.out = t.out + t.pending.split(" + close + ", 1)[1] -%}{%- set t.pending = '' -%}"
        "{%- set t.inside = false -%}"
        "{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{{- (t.out + (" + open_ + " + t.pending if t.inside else '')).lstrip('\\n') -}}"
        "{%- endmacro -%}\n"
        "{%- macro has_thought(text) -%}{{- 'yes' if " + words + " else '' -}}{%- endmacro -%}\n"
    )


NOT_TEXT = "this chat template (written by pipeline merge / export) renders text only: a content part is not text"
# a message's content as text: a string as it is, OpenAI's list of parts joined (text parts only), missing or None ""
_TEXT_MACRO = (
    "{%- macro text_of(message) -%}"
    "{%- set content = message['content'] if message['content'] is defined else none -%}"
    "{%- if content is none -%}"
    "{%- elif content is string -%}{{- content -}}"
    "{%- else -%}{%- for part in content -%}"
    "{%- if part['type'] != 'text' -%}{{- raise_exception(" + literal(NOT_TEXT) + ") -}}{%- endif -%}"
    "{{- ('' if loop.first else '\\n') + part['text'] -}}"
    "{%- endfor -%}{%- endif -%}"
    "{%- endmacro -%}"
)


def jinja_template(template: Template, tokenizer: "Tokenizer", *, enable_thinking: bool = True) -> str:
    """The chat template of `template` for `tokenizer` (UserError when the vocabulary lacks its markup)."""
    ids = template.ids(tokenizer)
    marks = {BOS: "" if ids[BOS] is None else tokenizer.decode([ids[BOS]]), EOS: tokenizer.decode([ids[EOS]])}
    user = template.user[:len(template.user) - len(template.reply)]
    reasoning = template.thought_words is not None
    thought = literal(template.thought_words[0] + template.thought_words[1]) if reasoning else "''"
    lines = [
        f"{{#- the '{template.name}' template of pipeline (pipeline/data/templates.py), as the model was trained -#}}",
        "{%- set default_system = " + literal(template.default_system) + " -%}",
    ]
    if reasoning:
        lines += [_thought_macros(template),
                  "{%- if enable_thinking is not defined -%}{%- set enable_thinking = "
                  + ("true" if enable_thinking else "false") + " -%}{%- endif -%}"]
    lines += [
        _TEXT_MACRO,
        "{%- if tools -%}{{- raise_exception(" + literal(REFUSED) + ") -}}{%- endif -%}",
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system_message = text_of(messages[0]) -%}{%- set loop_messages = messages[1:] -%}",
        "{%- else -%}{%- set system_message = '' -%}{%- set loop_messages = messages -%}{%- endif -%}",
        "{%- if not system_message -%}{%- set system_message = default_system -%}{%- endif -%}",
        "{{- " + _expression(template.prefix, marks) + " -}}",
        "{%- if system_message -%}{{- " + _expression(template.system, marks, "system_message") + " -}}{%- endif -%}",
        "{%- set turns = namespace(last_user=-1) -%}",
        "{%- for message in loop_messages -%}{%- if message['role'] == 'user' -%}"
        "{%- set turns.last_user = loop.index0 -%}{%- endif -%}{%- endfor -%}",
        "{%- for message in loop_messages -%}",
        "{%- if message['role'] != ('user' if loop.index0 % 2 == 0 else 'assistant') or message['tool_calls'] -%}"
        "{{- raise_exception(" + literal(REFUSED) + ") -}}{%- endif -%}",
        "{%- set content = text_of(message) -%}",
        "{%- if message['role'] == 'user' -%}",
        "{%- if not loop.first -%}{{- " + _expression(template.separator, marks) + " -}}{%- endif -%}",
        "{{- " + _expression(user, marks, "content") + " -}}",
        "{%- if not loop.last or add_generation_prompt -%}{{- " + _expression(template.reply, marks) + " -}}",
    ]
    if reasoning:  # the empty thought ends the last prompt when thinking is off (and the answer has no thought)
        lines.append("{%- set answer = '' if loop.last else text_of(loop_messages[loop.index0 + 1]) -%}"
                     "{%- if loop.index0 == turns.last_user and not enable_thinking"
                     " and not has_thought(remove_thought(answer)) -%}{{- " + thought + " -}}{%- endif -%}")
    lines += ["{%- endif -%}", "{%- else -%}"]
    if reasoning:
        lines.append("{%- if loop.index0 < turns.last_user or not enable_thinking -%}"
                     "{%- set content = remove_thought(content) -%}"
                     "{%- elif not has_thought(content) -%}{%- set content = " + thought + " + content -%}"
                     "{%- endif -%}")
    lines += [
        "{{- " + _expression(template.assistant, marks, "content") + " -}}",
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    return "\n".join(lines)


def recipe_chat_template(data: "DataArgs", tokenizer: "Tokenizer", key: str = "template") -> str | None:
    """The chat template an export of this recipe carries: its template (with default_system and enable_thinking)
    for sft and dpo; None for pt, which trains on plain text and no chat format (the base's files stay as they
    are). A template the vocabulary cannot express is a UserError naming `key` (where the recipe sets template)."""
    if data.stage == "pt":
        return None
    template = data.chat_template()
    template.check(tokenizer, key)
    return jinja_template(template, tokenizer, enable_thinking=data.enable_thinking)
