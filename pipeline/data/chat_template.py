"""A Template as a Jinja chat template, so that an exported model chats in the format it was trained on.

transformers' `tokenizer.apply_chat_template` and vLLM's chat endpoints render a conversation with the Jinja
string in tokenizer_config.json's `chat_template`. merge and export write this one there (pipeline.merge), made
from the recipe's Template (`DataArgs.chat_template()`: its default_system included), so the fields of
pipeline.data.templates stay the one description of every format. As LLaMA-Factory's `_get_jinja_template`,
each block of the template becomes a Jinja expression: its literal text (markup tokens as their text; {bos} and
{eos} as the tokenizer's tokens, the EOS being the first stop word for `replace_eos` templates) joined with
the message's content. The rendering follows `Template.turns(..., mask_history=True)`, which is how eval and
chat encode a prompt (pipeline.data.tokenize.encode_prompt):

- a system message (else the default system prompt) opens the text after the prefix, or (llama2, mistral:
  `system_in_content`) the first user message's content; an empty one is absent;
- turns alternate user (or tool) / assistant; every later prompt opens with the separator;
- the template's `reply` (the assistant header that ends a user block) is written before an answer, or at the
  end with `add_generation_prompt`, as Hugging Face's templates do;
- an efficient_eos template (glm4): the conversation's last answer is followed by the EOS training appends to the
  row (the EOS label training puts on each later prompt's first token is no text: a mark cannot say it);
- a reasoning template (qwen3, glmz1): earlier answers lose their thoughts; the answer after the last prompt (a user
  or tool message) gets the empty thought in front of its block (glmz1's opens with a newline) when it has none, or
  with `enable_thinking=False` (a chat-template argument whose default is the recipe's enable_thinking) loses its
  thought and the empty thought ends the prompt instead.

A message's content is a string, or OpenAI's list of parts (`[{"type": "text", "text": ...}]`, as chat clients
send it): its text parts joined by "\n", as vLLM joins them for a template that takes strings, so both render the
same prompt; a part that is not text raises. A missing or None content (transformers drops None keys) is "".

Function calling, for a template with a tool format (pipeline.data.tools; the macros: chat_template_tools), renders
as training renders the equivalent LLaMA-Factory sharegpt row (a `tools` column, function_call and observation
turns): `tools=` (a list, even empty, is the row's tools column: "[]" opens the system block, empty, as
LLaMA-Factory's `if system or tools` does, glm4_moe's too, where GLM-4.5's own template takes tools=[] as none) adds
its tool text to the system prompt; an assistant message's `tool_calls` are the function_call turn, written after
the message's text (a thought or words before the call, as LLaMA-Factory keeps them in front); a "tool" message is
the observation turn, on the prompt's side like a user turn (the last prompt, user or tool, is the one a reasoning
template's rules call last).
A template without a tool format (alpaca) refuses all three, and every template refuses turns out of training's
order (several tool results go in one tool message: training's observation turn is one), rather than render a
prompt the model was not trained on.

With `marked=True` each assistant message is written inside `{% generation %}` ... `{% endgeneration %}`
(transformers' Jinja extension; the rendered text is the same): `apply_chat_template(...,
return_assistant_tokens_mask=True)` then marks the tokens training trains (Template.segments' answer segment: the
text, the end-of-turn markup after it, a function call, a reasoning template's thought), so TRL's
`assistant_only_loss` can go on training the export on the same tokens. Exports carry that one in a file of its own
(TRAINING_TEMPLATE_FILE), not as the tokenizer's chat_template: engines that render templates without
transformers' extension (llama-cpp-python, minijinja in TGI and mistral.rs, text-generation-webui) refuse the
unknown tag and could not serve the model at all. Two renderings differ from training with mask_history false,
where the marks cannot match token for token: a reasoning template's earlier answers (without thoughts here, as at
inference) and a token the tokenizer merges across a block's edge (below), which transformers marks whole.

Where the rendered string is tokenized whole, the ids equal training's (each block tokenized on its own) as long
as the tokenizer does not merge across two blocks; the markup between blocks keeps them apart in every shipped
template except `empty` (nothing between a system prompt and the user's text, nor between turns) on a byte-level
vocabulary. On a sentencepiece one (Llama 2, Mistral) each block's text is written with the space that becomes the
prefix "▁" training's separate encoding gives it (pipeline.data.chat_template_blocks), so that every template it
expresses, llama2's `<s> [INST]` and `[/INST] {answer}` included, gives training's ids.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.data.chat_template_blocks import CONTINUED, LEAD_MACRO, START, TEXT, Blocks, after
from pipeline.data.chat_template_tools import tool_macros
from pipeline.data.tools import VERBATIM_TOOLS
from pipeline.data.jinja_text import literal
from pipeline.data.templates import EOS, Template, tool_templates

if TYPE_CHECKING:
    from pipeline.data.args import DataArgs
    from pipeline.data.tokenizer import Tokenizer

# The export's copy of its chat template with {% generation %} blocks, beside the tokenizer files: a name no engine
# reads by itself (transformers reads chat_template.jinja and additional_chat_templates/, llama.cpp's converter too).
TRAINING_TEMPLATE_FILE = "chat_template.generation.jinja"

ORDER = ("this chat template (written by pipeline merge / export) renders turns in training's order: an optional "
         "system message, then a user message (or a tool message, with tools) and an assistant message in turn; "
         "several results of parallel tool calls go in one tool message, as training's observation turn")


TOOLS_TWICE = ("this chat template (written by pipeline merge / export) takes the tools once: as the system message's "
               "\"tools\" string or as tools=, not both")


def no_tools(name: str) -> str:
    """Why a chat template without a tool format refuses tools, tool_calls and tool messages."""
    return (f"this chat template (written by pipeline merge / export) renders no tool calls: its template '{name}' "
            f"has no tool format, so the model was not trained on any; templates that render them: "
            f"{', '.join(tool_templates())}")


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


def _edges(template: Template, blocks: Blocks) -> dict[str, str]:
    """What each block follows in the rendered string (chat_template_blocks: where a space is written): the system
    block the prefix, the first prompt the system block (inside the first user block for llama2 / mistral) or the
    prefix, a later one the separator or the answer before it, the reply its prompt (of which it is the end), an
    answer the reply or the prompt."""
    prefix = blocks.ending(template.prefix)
    answers = after(blocks.ending(template.assistant), blocks.ending(template.function or template.assistant))
    prompts = [blocks.ending(_prompt_part(fmt, template.reply)) for fmt in (template.user, template.observation
                                                                            or template.user)]
    if template.fuse_system:  # the book's alpaca: the system block or the separator and the prompt are one string
        first = first_system = later = CONTINUED
    else:
        first = after(prefix)
        first_system = first if template.system_in_content else after(blocks.ending(template.system))
        later = after(blocks.ending(template.separator)) if template.separator else answers
    prompt_end = after(*prompts) if any(prompts) else None
    return {"system": after(prefix), "separator": answers, "first": first, "first_system": first_system,
            "later": later,
            "reply": CONTINUED if prompt_end == TEXT else prompt_end or after(first_system, later),
            "answer": after(blocks.ending(template.reply)) if template.reply else
            prompt_end or after(first_system, later)}


def _turn_expression(blocks: Blocks, fmt: str, edges: dict[str, str], shown: str) -> str:
    """A prompt block (user or observation): one expression, or the first turn's (after the system block when
    `shown`, a Jinja condition, holds) and a later turn's where they differ in a space."""
    first_system, first, later = (blocks.expression(fmt, "content", edges[k])
                                  for k in ("first_system", "first", "later"))
    if first_system != first:
        first = f"({first_system}) if {shown} else ({first})"
    return first if first == later else f"({first}) if loop.first else ({later})"


def _prompt_part(fmt: str, reply: str) -> str:
    """A user or observation block without the reply that ends it (written with the generation prompt)."""
    return fmt[:len(fmt) - len(reply)]


def jinja_template(template: Template, tokenizer: "Tokenizer", *, enable_thinking: bool = True,
                   marked: bool = False) -> str:
    """The chat template of `template` for `tokenizer` (UserError when the vocabulary lacks its markup); `marked`:
    each answer inside {% generation %} blocks (the training copy, TRAINING_TEMPLATE_FILE)."""
    blocks = Blocks.of(template, tokenizer)
    edges = _edges(template, blocks)
    prompts = (_prompt_part(template.user, template.reply),
               _prompt_part(template.observation or template.user, template.reply))
    tools = template.tool_format is not None
    # training: `system += tool_text(tools)`, and a system block when there is either (an empty list counts)
    shown = "system_message or (tools is defined and tools is not none)" if tools else "system_message"
    user, observation = (_turn_expression(blocks, fmt, edges, shown) for fmt in prompts)
    reasoning = template.thought_words is not None
    thought = literal(template.thought_words[0] + template.thought_words[1]) if reasoning else "''"
    prompt_roles = "('user', 'tool')" if tools else "('user',)"
    lines = [
        f"{{#- the '{template.name}' template of pipeline (pipeline/data/templates.py), as the model was trained -#}}",
        "{%- set default_system = " + literal(template.default_system) + " -%}",
    ]
    if reasoning:
        lines += [_thought_macros(template),
                  "{%- if enable_thinking is not defined -%}{%- set enable_thinking = "
                  + ("true" if enable_thinking else "false") + " -%}{%- endif -%}"]
    lines.append(_TEXT_MACRO)
    macros_end = len(lines)
    if tools:
        lines.append(tool_macros(template.tool_format))
    lines += [
        "{%- if messages and messages[0]['role'] == 'system' -%}",
        "{%- set system_message = text_of(messages[0]) -%}{%- set loop_messages = messages[1:] -%}",
        "{%- else -%}{%- set system_message = '' -%}{%- set loop_messages = messages -%}{%- endif -%}",
        "{%- if not system_message -%}{%- set system_message = default_system -%}{%- endif -%}",
        "{{- " + blocks.expression(template.prefix, edge=START) + " -}}",
    ]
    if template.tool_format in VERBATIM_TOOLS:  # the system message's "tools" string, as Phi-4-mini's own template
        # takes them (microsoft/Phi-4-mini-instruct's chat_template: message['tools'] written as given)
        lines.append("{%- if messages and messages[0]['role'] == 'system' and messages[0]['tools'] is defined"
                     " and messages[0]['tools'] is not none -%}"
                     "{%- if tools is defined and tools is not none -%}{{- raise_exception(" + literal(TOOLS_TWICE)
                     + ") -}}{%- endif -%}{%- set tools = messages[0]['tools'] -%}{%- endif -%}")
    if tools:
        given = "tools is defined and tools is not none" if template.tool_format in VERBATIM_TOOLS else "tools"
        lines.append("{%- if " + given + " -%}{%- set system_message = system_message ~ tool_text(tools) -%}{%- endif -%}")
    else:
        lines.append("{%- if tools -%}{{- raise_exception(" + literal(no_tools(template.name)) + ") -}}{%- endif -%}")
    lines.append("{%- if " + shown + " -%}")
    system = blocks.expression(template.system, "system_message",
                               CONTINUED if template.system_in_content else edges["system"])
    if template.system_in_content:  # Llama2Template: the block opens the first user message's content
        lines.append("{%- set system_block = " + system + " -%}{%- else -%}{%- set system_block = '' -%}"
                     "{%- endif -%}")
    else:
        lines.append("{{- " + system + " -}}{%- endif -%}")
    lines += [
        "{%- set turns = namespace(last_prompt=-1) -%}",
        "{%- for message in loop_messages -%}{%- if message['role'] in " + prompt_roles + " -%}"
        "{%- set turns.last_prompt = loop.index0 -%}{%- endif -%}{%- endfor -%}",
        "{%- for message in loop_messages -%}",
    ]
    if not tools:
        lines.append("{%- if message['role'] == 'tool' or message['tool_calls'] -%}"
                     "{{- raise_exception(" + literal(no_tools(template.name)) + ") -}}{%- endif -%}")
    lines += [
        "{%- if not (message['role'] in " + prompt_roles + " if loop.index0 % 2 == 0 else message['role'] == "
        "'assistant') -%}{{- raise_exception(" + literal(ORDER) + ") -}}{%- endif -%}",
        "{%- set content = text_of(message) -%}",
        "{%- if loop.first -%}{%- set content = system_block ~ content -%}{%- endif -%}"
        if template.system_in_content else "",
        "{%- if loop.index0 % 2 == 0 -%}",
        "{%- if not loop.first -%}{{- " + blocks.expression(template.separator, edge=edges["separator"])
        + " -}}{%- endif -%}",
        "{{- " + (f"({observation}) if message['role'] == 'tool' else ({user})" if observation != user else user)
        + " -}}",
        "{%- if not loop.last or add_generation_prompt -%}{{- " + blocks.expression(template.reply, edge=edges["reply"])
        + " -}}",
    ]
    if reasoning:  # the empty thought ends the last prompt when thinking is off (and the answer has no thought)
        lines.append("{%- set answer = '' if loop.last else text_of(loop_messages[loop.index0 + 1]) -%}"
                     "{%- if loop.index0 == turns.last_prompt and not enable_thinking"
                     " and not has_thought(remove_thought(answer)) -%}{{- " + thought + " -}}{%- endif -%}")
    lines += ["{%- endif -%}", "{%- else -%}"]
    if reasoning:
        # the empty thought goes in front of the answer block, as training puts it (glmz1's block opens with "\n")
        lines.append("{%- set empty_thought = '' -%}"
                     "{%- if loop.index0 < turns.last_prompt or not enable_thinking -%}"
                     "{%- set content = remove_thought(content) -%}"
                     "{%- elif not has_thought(content) -%}{%- set empty_thought = " + thought + " -%}"
                     "{%- endif -%}")
    if tools:  # the function_call turn: the message's text (kept in front, as training keeps it), then the calls
        lines.append("{%- if message['tool_calls'] -%}"
                     "{%- set content = content ~ call_text(message['tool_calls']) -%}{%- endif -%}")
    answer = blocks.expression(template.assistant, "content", edges["answer"])
    if template.function:  # a function_call turn has its own block (mistral's [TOOL_CALLS])
        answer = (f"({blocks.expression(template.function, 'content', edges['answer'])}) if message['tool_calls'] "
                  f"else ({answer})")
    if reasoning:
        answer = f"empty_thought ~ ({answer})"
    if template.efficient_eos:  # the trained EOS that ends training's row (Template.segments), after the last answer
        answer = f"({answer}) ~ (({blocks.expression(EOS)}) if loop.last else '')"
    lines += [
        ("{%- generation -%}" if marked else "") + "{{- " + answer + " -}}" + ("{%- endgeneration -%}" if marked else ""),
        "{%- endif -%}",
        "{%- endfor -%}",
    ]
    if blocks.uses_lead:
        lines.insert(macros_end, LEAD_MACRO)
    return "\n".join(lines)


def recipe_chat_template(data: "DataArgs", tokenizer: "Tokenizer", key: str = "template", *,
                         marked: bool = False) -> str | None:
    """The chat template an export of this recipe carries: its template (with default_system and enable_thinking)
    for sft and dpo; None for pt, which trains on plain text and no chat format (the base's files stay as they
    are). A template the vocabulary cannot express is a UserError naming `key` (where the recipe sets template).
    `marked`: the copy with {% generation %} blocks (TRAINING_TEMPLATE_FILE)."""
    if data.stage == "pt":
        return None
    template = data.chat_template()
    template.check(tokenizer, key)
    return jinja_template(template, tokenizer, enable_thinking=data.enable_thinking, marked=marked)
