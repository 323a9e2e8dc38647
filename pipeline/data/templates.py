"""Prompt templates as data, by LLaMA-Factory's names and with its exact strings, plus the book's alpaca.

A template renders an Alpaca row (system, history, instruction/input, output) as turns:
    turn 0 prompt:  prefix, system block (when there is a system prompt), user block
    turn k prompt:  separator, user block
    response:       assistant block
Each block is an "element", tokenized on its own as LLaMA-Factory's `_convert_elements_to_ids` does.
Inside an element, the template's markup tokens (`special_tokens`, and {bos} / {eos}) are cut out and
placed by id; the text between them - template text and user text joined - is encoded in one go, so
its BPE merges are the ones the Hugging Face tokenizer makes. User text is never scanned for special
tokens: "<|im_end|>" typed by a user stays text. {eos} is the tokenizer's EOS, or, for templates with
`replace_eos` (LLaMA-Factory's flag), the first stop word.

- alpaca: the book's prompt, exactly ("Below is an instruction that describes a task. Write a response
  that appropriately completes the request.\\n\\n### Instruction:\\n...", "\\n\\n### Input:\\n..." only when
  the input is non-empty, then "\\n\\n### Response:\\n"), EOS after each response. A row's system prompt
  replaces the first sentence pair. Unlike LLaMA-Factory's alpaca, the system block and the prompt are
  one string (the book tokenizes the prompt whole), and later turns open with "\\n\\n".
- chatml, qwen, qwen3, qwen3_nothink: <|im_start|>role\\n...<|im_end|>\\n; qwen adds Qwen's default system
  prompt; qwen3 is a reasoning template: a response without <think>...</think> gets the empty thought
  "<think>\\n\\n</think>\\n\\n" in front (trained) when enable_thinking, else at the end of the prompt (not
  trained); with mask_history the earlier responses lose their thoughts and only the last turn gets one.
- llama3: <|begin_of_text|> then <|start_header_id|>role<|end_header_id|>\\n\\n...<|eot_id|>.
- openchat-3.6 (a Llama 3 8B): llama3's headers with the roles "GPT4 Correct User" / "GPT4 Correct Assistant", no
  system header (the system prompt as it is after BOS), the answer closed by the tokenizer's EOS; stops at <|eot_id|>.
- deepseekr1 (DeepSeek-R1-Distill-Qwen / -Llama): BOS, the system prompt as it is, then
  <｜User｜>...<｜Assistant｜> and the answer with the tokenizer's EOS (<｜end▁of▁sentence｜>); a reasoning
  template with qwen3's thought rules.
- llama2, mistral (LLaMA-Factory's Llama2Template): the system block opens the first user block's content, inside
  its [INST] ... [/INST] (`system_in_content`); llama2 writes BOS before every user block, mistral once, and answers
  with a space in front. [INST], [/INST] and mistral's tool markup are placed by id where the vocabulary holds them
  (Mistral v0.3's control tokens), else written as text (Llama 2, v0.1 / v0.2): `optional_tokens`, `for_vocabulary`;
  the text after such a token in its block is `Continued` (encoded without a sentencepiece prefix space).
- default: "Human: ...<eos>\\nAssistant:" / "...<eos>\\n" / "System: ...<eos>\\n".
- empty: no markup at all, and no EOS (as LLaMA-Factory's empty template; use it for raw continuation).

Instruction and input are joined by "\\n" (LLaMA-Factory's Alpaca converter) except in the book's alpaca.
Placeholders ({content}, {instruction}, {input}, {system}) are filled by splitting the template text
once and joining the values in: user text is never formatted or scanned again, so a row containing
"{input}" or "{0.__class__}" stays literal.
"""
from __future__ import annotations

import functools
import re
import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, NamedTuple, Sequence, Union

from pipeline.data.hf_encoding import Continued
from pipeline.data.tools import PHI4_MINI_TOOLS, THOUGHT_WORDS
from pipeline.errors import UserError, did_you_mean

if TYPE_CHECKING:
    from pipeline.data.tokenizer import Tokenizer

_SLOT = re.compile(r"\{(content|instruction|input|system)\}")
BOS, EOS = "{bos}", "{eos}"


class Special(NamedTuple):
    """A token the template places by id: a markup token ("<|im_start|>"), or BOS / EOS."""

    token: str


Piece = Union[str, Special]  # a str is encoded as text (a Continued one as the rest of a string); consecutive str
# pieces belong to different elements


@functools.lru_cache(maxsize=None)
def split_slots(fmt: str) -> tuple[str, ...]:
    """Literal, slot, literal, slot, ... (odd indices are slot names)."""
    return tuple(_SLOT.split(fmt))


def fill(fmt: str, **values: str) -> str:
    """Put values into a template string's slots by concatenation (never str.format)."""
    parts = split_slots(fmt)
    if len(parts) == 3:  # one slot, the usual case: no loop
        return parts[0] + values[parts[1]] + parts[2]
    return "".join([values[p] if i % 2 else p for i, p in enumerate(parts)])


class Segment(NamedTuple):
    """A piece of a rendered example: its pieces, whether its tokens are trained, whether it is a response."""

    pieces: tuple[Piece, ...]
    trainable: bool
    response: bool  # an assistant turn
    # the first token's label is the template's EOS (trained), whatever the token: LLaMA-Factory's efficient_eos
    # labels the prompt after an answer so (pipeline.data.tokenize keeps such labels in TokenizedSplit.targets)
    eos_label: bool = False


@dataclass(frozen=True)
class Template:
    name: str
    system: str = "{system}"  # how a system prompt opens the text: slot {system}
    default_system: str = ""  # used when the row has no system prompt ("" = no system block)
    user: str = "{content}"  # one turn's prompt: slot {content}
    reply: str = ""  # the end of `user` (and `observation`) that opens the answer: the chat template's
    # generation prompt
    query: str = "{instruction}\n{input}"  # how a non-empty input joins the instruction
    assistant: str = "{content}{eos}"  # the response: slot {content}
    prefix: str = ""  # before the first turn ({bos} for llama3)
    separator: str = ""  # opens every later prompt (the book's alpaca: "\n\n")
    fuse_system: bool = False  # system block and first prompt are one string (the book's alpaca)
    system_in_content: bool = False  # the system block opens the first user block's content (LLaMA-Factory's
    # Llama2Template: llama2's <<SYS>> ... <</SYS>> and mistral's system inside the first [INST] ... [/INST])
    optional_tokens: tuple[str, ...] = ()  # markup placed by id where the vocabulary holds it (Mistral v0.3's
    # control tokens [INST], [TOOL_CALLS], ...), else text (the Llama 2 / Mistral v0.1 / v0.2 vocabularies):
    # for_vocabulary, as LLaMA-Factory's encode finds an added token in the template's text or leaves it text
    special_tokens: tuple[str, ...] = ()  # markup tokens the vocabulary must have
    stop_words: tuple[str, ...] = ()  # generation stops at these tokens (those the vocabulary has)
    replace_eos: bool = False  # {eos} is stop_words[0] (LLaMA-Factory's replace_eos)
    thought_words: tuple[str, str] | None = None  # a reasoning template: (open, close) of a thought
    # LLaMA-Factory's efficient_eos (glm4): no EOS in the answer block; the supervised processor labels the first token
    # of each later prompt with the EOS (the answer before it learns to end there) and appends a trained EOS to the row
    # (data/processor/supervised.py:68-104); train_on_prompt is refused with it, as LLaMA-Factory's get_template_and_fix_tokenizer
    efficient_eos: bool = False
    tool_format: str | None = None  # pipeline.data.tools.FORMATS; None: function-calling data is refused
    observation: str | None = None  # a tool result's block (slot {content}); None: as a user turn
    function: str | None = None  # a function_call turn's block (slot {content}); None: as an assistant turn
    description: str = ""

    def __post_init__(self) -> None:
        for fmt, slots in ((self.system, ["system"]), (self.user, ["content"]), (self.assistant, ["content"]),
                           (self.query, ["instruction", "input"]), (self.prefix, []), (self.separator, []),
                           (self.observation or "{content}", ["content"]), (self.function or "{content}", ["content"])):
            if list(split_slots(fmt)[1::2]) != slots:
                raise ValueError(f"template {self.name}: {fmt!r} must have the slots {slots} in that order")
        for fmt in (self.user, self.observation or self.reply):
            if not fmt.endswith(self.reply):
                raise ValueError(f"template {self.name}: {fmt!r} must end with its reply {self.reply!r}")
        if self.replace_eos and not self.stop_words:
            raise ValueError(f"template {self.name}: replace_eos needs stop words")

    # ------------------------------------------------------------ rendering
    @functools.cached_property
    def _splitter(self) -> re.Pattern[str]:
        tokens = sorted({*self.special_tokens, BOS, EOS}, key=len, reverse=True)
        return re.compile("(" + "|".join(map(re.escape, tokens)) + ")")

    def split_markup(self, text: str) -> list[Piece]:
        """A template string's text cut at its markup tokens and {bos} / {eos} (as Specials; text between, "" too)."""
        return [Special(b) if j % 2 else b for j, b in enumerate(self._splitter.split(text))]

    def _element(self, fmt: str, lead: str = "", **values: str | Sequence[Piece]) -> list[Piece]:
        """One block: template text split at its markup tokens, the values joined into the text between (a value
        given as pieces keeps its markup: the system block inside a user block, with the tools' markup)."""
        parts = split_slots(fmt)
        out: list[Piece] = []
        text = lead

        def flush() -> None:  # the text so far; after a markup token (not BOS / EOS) the rest of its string
            if text:
                markup = bool(out) and isinstance(out[-1], Special) and out[-1].token not in (BOS, EOS)
                out.append(Continued(text) if markup else text)

        for i, part in enumerate(parts):
            bits = ([values[part]] if isinstance(values[part], str) else values[part]) if i % 2 else \
                self.split_markup(part)
            for bit in bits:
                if isinstance(bit, Special):
                    flush()
                    out.append(bit)
                    text = ""
                else:
                    text += bit
        flush()
        return out

    def _content(self, instruction: str, input: str) -> str:
        return fill(self.query, instruction=instruction, input=input) if input else instruction

    def _thought(self) -> str:
        assert self.thought_words is not None
        return self.thought_words[0] + self.thought_words[1]

    def _has_thought(self, text: str) -> bool:
        assert self.thought_words is not None
        return any(w.strip() in text for w in self.thought_words)

    def remove_thought(self, text: str) -> str:
        """A response without its thought (LLaMA-Factory's remove_thought)."""
        if self.thought_words is None:
            return text
        start, end = map(re.escape, self.thought_words)
        return re.sub(f"{start}(.*?){end}", "", text, flags=re.DOTALL).lstrip("\n")

    def turns(self, instruction: str, input: str = "", output: str = "", system: str | None = None,
              history: Iterable[Sequence[str]] = (), *, mask_history: bool = False,
              enable_thinking: bool = True, tools: str = "", roles: Sequence[str] = ()
              ) -> list[tuple[list[Piece], list[Piece]]]:
        """(prompt pieces, response pieces) per turn, oldest first.

        Function-calling rows (LLaMA-Factory's Template._encode): `tools` (the JSON list of function schemas)
        adds its tool_text after the system prompt, a system block is written when there is either; `roles`
        names each turn, prompts 'user' or 'observation' (the template's observation block), responses
        'assistant' or 'function' (the call written in the template's tool format, then its assistant block).
        """
        pairs = [(str(q), str(a)) for q, a in [*history, (self._content(instruction, input), output)]]
        roles = list(roles) or ["user", "assistant"] * len(pairs)
        if self.tool_format is None and (tools or set(roles) - {"user", "assistant"}):
            raise UserError(tool_refusal(self.name))  # data built for another template
        system = system or self.default_system
        tool_pieces = self._tool_pieces(tools) if tools else []
        system_value = [system, *tool_pieces] if tool_pieces else system
        if tools:  # the book's alpaca fuses one string (and renders no tools: refused above)
            system += self.text(tool_pieces)
        last = len(pairs) - 1
        out = []
        for k, (q, a) in enumerate(pairs):
            prompt: list[Piece] = []
            if k == 0:
                prompt += self._element(self.prefix)
            user = self.observation if roles[2 * k] == "observation" and self.observation else self.user
            if self.fuse_system:  # the book's alpaca: one string from the system block (or separator) on
                opening = (fill(self.system, system=system) if system else "") if k == 0 else self.separator
                prompt += self._element(user, lead=opening, content=q)
            else:
                opening = k == 0 and bool(system or tools)
                content: str | list[Piece] = q
                if opening and self.system_in_content:  # one element: the system block inside the user's block
                    content = [*self._element(self.system, system=system_value), q]
                elif opening:
                    prompt += self._element(self.system, system=system_value)
                elif k > 0:
                    prompt += self._element(self.separator)
                prompt += self._element(user, content=content)
            response: list[Piece] = []
            if self.thought_words is not None:
                if not enable_thinking or (mask_history and k != last):
                    a = self.remove_thought(a)
                if (k == last or not mask_history) and not self._has_thought(a):
                    if enable_thinking:
                        response += self._element(self._thought())
                    else:
                        prompt += self._element(self._thought())
            answer = self.assistant
            if roles[2 * k + 1] == "function":
                a, answer = self._function_text(a), self.function or self.assistant
            response += self._element(answer, content=self._thought_markup(a))
            out.append((prompt, response))
        return out

    def _thought_markup(self, text: str) -> str | list[Piece]:
        """An answer whose thought words hold markup tokens (gpt_oss's <|channel|>analysis<|message|>): those words
        placed by id, as LLaMA-Factory's encode finds them in the answer's text; other markup in it stays text.
        Unchanged where the thought words hold none (qwen3's <think>: text, an added token the vocabulary finds)."""
        if self.thought_words is None or not any(self.split_markup(w)[1:] for w in self.thought_words):
            return text
        words = "|".join(map(re.escape, sorted(set(self.thought_words), key=len, reverse=True)))
        return [piece for j, bit in enumerate(re.split(f"({words})", text)) if bit
                for piece in (self._element(bit) if j % 2 else [bit])]

    def _tool_pieces(self, tools: str) -> list[Piece]:
        """The text the tool descriptions add after the system prompt, its markup (Mistral v0.3's [AVAILABLE_TOOLS]
        where the vocabulary holds it) placed by id, as LLaMA-Factory's encode finds added tokens in that text."""
        from pipeline.data.tools import tool_text

        assert self.tool_format is not None
        text = tool_text(tools, self.tool_format)
        if not self.special_tokens:
            return [text] if text else []
        return [Special(b) if j % 2 else b for j, b in enumerate(self._markup.split(text)) if b]

    @functools.cached_property
    def _markup(self) -> re.Pattern[str]:
        """The template's markup tokens (not {bos} / {eos}: a tool description may say "{eos}")."""
        return re.compile("(" + "|".join(map(re.escape, sorted(self.special_tokens, key=len, reverse=True))) + ")")

    def _function_text(self, content: str) -> str:
        from pipeline.data.tools import function_text

        assert self.tool_format is not None
        return function_text(content, self.tool_format, self.thought_words)

    def segments(self, row: dict, *, train_on_prompt: bool = False, mask_history: bool = False,
                 enable_thinking: bool = True) -> list[Segment]:
        """The (pieces, trainable) parts of a full example, so masks are built per turn.

        Responses are trained (every turn, or only the last with mask_history); prompts only with
        train_on_prompt, every turn's prompt even with mask_history: LLaMA-Factory 0.9.5's supervised processor
        (data/processor/supervised.py:83-91) labels each source with train_on_prompt before mask_history masks the
        earlier targets. efficient_eos: the EOS label on a prompt's first token goes where that processor puts it, on
        the sources of turn_idx != 0 of its (with mask_history reversed) order: every prompt but the first, or with
        mask_history every prompt but the last (the first's is position 0, never a target); then a trained EOS.
        """
        if self.efficient_eos and train_on_prompt:
            raise ValueError(f"template {self.name}: train_on_prompt with efficient_eos (refused by the recipe rules)")
        turns = self.turns(row["instruction"], row.get("input") or "", row["output"], row.get("system"),
                           row.get("history") or (), mask_history=mask_history, enable_thinking=enable_thinking,
                           tools=row.get("tools") or "", roles=row.get("roles") or ())
        last = len(turns) - 1
        out = []
        for k, (p, a) in enumerate(turns):
            trained = not mask_history or k == last
            relabel = self.efficient_eos and (k != last if mask_history else k > 0)
            out.append(Segment(tuple(p), train_on_prompt, False, relabel))
            out.append(Segment(tuple(a), trained, True))
        if self.efficient_eos:
            out.append(Segment((Special(EOS),), True, True))
        return out

    # ------------------------------------------------------------ text views and ids
    @staticmethod
    def text(pieces: Iterable[Piece], eos: str = "<|endoftext|>", bos: str = "") -> str:
        """Pieces as one string (markup tokens as their text); for reports and tests, not for encoding."""
        return "".join(p if isinstance(p, str) else {EOS: eos, BOS: bos}.get(p.token, p.token) for p in pieces)

    def prompt(self, instruction: str, input: str = "", system: str | None = None,
               history: Iterable[Sequence[str]] = (), eos: str = "<|endoftext|>", bos: str = "", *,
               tools: str = "", roles: Sequence[str] = ()) -> str:
        """Everything before the last response, as text (EOS written as `eos`)."""
        turns = self.turns(instruction, input, "", system, history, tools=tools, roles=roles)
        pieces = [x for p, a in turns[:-1] for x in (*p, *a)] + turns[-1][0]
        return self.text(pieces, eos, bos)

    def response(self, output: str, eos: str = "") -> str:
        """The response text as appended after the prompt (EOS written as `eos`, by default nothing)."""
        return self.text(self._element(self.assistant, content=output), eos)

    def missing_tokens(self, tokenizer: "Tokenizer") -> list[str]:
        """Markup tokens this template needs that the vocabulary lacks."""
        return [t for t in self.special_tokens if not tokenizer.has_token(t)]

    def for_vocabulary(self, tokenizer: "Tokenizer") -> "Template":
        """This template as `tokenizer` writes it: the optional tokens the vocabulary holds are markup placed by id,
        the others stay text (joined with the text around them, so that "[INST] hi" is encoded whole where [INST]
        is no token). Every encoding of rows and prompts renders the template this way."""
        held = tuple(t for t in self.optional_tokens if tokenizer.has_token(t))
        if not held:
            return self
        return dataclasses.replace(self, special_tokens=(*self.special_tokens, *held), optional_tokens=())

    def vocabulary_problem(self, tokenizer: "Tokenizer") -> str | None:
        """Why the tokenizer cannot express this template's markup, or None when it can."""
        missing = self.missing_tokens(tokenizer)
        if not missing:
            return None
        return (f"'{self.name}' needs the special token{'s' if len(missing) > 1 else ''} {', '.join(missing)}, "
                f"which the tokenizer {tokenizer.name} does not have; choose a template of this model's family "
                f"({', '.join(templates_for(tokenizer))})")

    def check(self, tokenizer: "Tokenizer", key: str = "template") -> None:
        """UserError (exit 2) when the tokenizer cannot express this template's markup."""
        problem = self.vocabulary_problem(tokenizer)
        if problem:
            raise UserError(f"{key}: {problem}")

    def ids(self, tokenizer: "Tokenizer") -> dict[str, int | None]:
        """Token string -> id for every Special this template places (BOS may be None: then it is left out)."""
        self.check(tokenizer)
        eos = tokenizer.token_id(self.stop_words[0]) if self.replace_eos else tokenizer.eos_id
        return {BOS: tokenizer.bos_id, EOS: eos, **{t: tokenizer.token_id(t) for t in self.special_tokens}}

    @property
    def ends_answers(self) -> bool:
        """Whether each response is followed by the template's EOS ({eos}, or a replace_eos template's first stop
        word; efficient_eos: as a label): every template but `empty`, whose answers end with their last word
        (LLaMA-Factory's too)."""
        return self.efficient_eos or EOS in self.assistant or (self.replace_eos and self.stop_words[0] in self.assistant)

    def stop_ids(self, tokenizer: "Tokenizer") -> tuple[int, ...]:
        """Where generation stops (eval, generate / chat, the exports' generation_config.json): the template's EOS,
        its stop words the vocabulary has, the tokenizer's stops (generation_config.json's eos list, which
        transformers' generate stops at). Stage ppo's rollouts stop elsewhere: ppo_stop_ids."""
        eos = self.ids(tokenizer)[EOS]
        return tuple(dict.fromkeys([t for t in (eos, *self._word_ids(tokenizer, self.stop_words), *tokenizer.stop_ids)
                                    if t is not None]))

    def ppo_stop_ids(self, tokenizer: "Tokenizer") -> tuple[int, ...]:
        """Where stage ppo's rollouts stop: LLaMA-Factory 0.9.5's set. Its PPOTrainer builds the rollouts'
        GenerationConfig with eos_token_id=[tokenizer.eos_token_id] + tokenizer.additional_special_tokens_ids
        (llamafactory/train/ppo/trainer.py:159-163), on the tokenizer as Template.fix_special_tokens left it
        (llamafactory/data/template.py:189-215): its EOS is the first stop word under replace_eos, else the
        checkpoint's; the other stop words are appended to the checkpoint's additional_special_tokens where missing
        (replace_additional_special_tokens=False; Tokenizer.additional_special_ids). An explicit eos_token_id is
        not merged with the model's generation_config.json, so that file's eos list is not read here: a Llama 3
        Instruct rollout runs on past <|end_of_text|>, and a Qwen2.5 one stops at <|im_start|>,
        <|object_ref_start|>, ... (its tokenizer_config.json's additional_special_tokens). The recipe's
        add_special_tokens are not among them (LLaMA-Factory adds them with add_tokens(special_tokens=True),
        llamafactory/model/patcher.py:286-287, which leaves additional_special_tokens as it is). Stop words the
        vocabulary lacks are left out (LLaMA-Factory adds them as new ids that an unresized model never samples)."""
        words = self.stop_words[1:] if self.replace_eos else self.stop_words
        eos = self.ids(tokenizer)[EOS]
        return tuple(dict.fromkeys([eos, *tokenizer.additional_special_ids, *self._word_ids(tokenizer, words)]))

    @staticmethod
    def _word_ids(tokenizer: "Tokenizer", words: Sequence[str]) -> list[int]:
        """The ids of the stop words the vocabulary has."""
        return [tokenizer.token_id(w) for w in words if tokenizer.has_token(w)]


ALPACA_SYSTEM = ("Below is an instruction that describes a task. "
                 "Write a response that appropriately completes the request.")
QWEN_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
IM = ("<|im_start|>", "<|im_end|>")
IM_REPLY = "<|im_start|>assistant\n"
_CHATML = dict(system="<|im_start|>system\n{system}<|im_end|>\n",
               user="<|im_start|>user\n{content}<|im_end|>\n" + IM_REPLY,
               reply=IM_REPLY, assistant="{content}<|im_end|>\n", special_tokens=IM)
_QWEN_TOOLS = dict(tool_format="qwen",  # Hermes style; the tool result comes back as a user turn
                   observation="<|im_start|>user\n<tool_response>\n{content}\n</tool_response><|im_end|>\n" + IM_REPLY)
ALPACA_REPLY = "### Response:\n"
LLAMA3_REPLY = "<|start_header_id|>assistant<|end_header_id|>\n\n"
LLAMA3_MARKUP = ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>")
OPENCHAT_REPLY = "<|start_header_id|>GPT4 Correct Assistant<|end_header_id|>\n\n"
DEFAULT_REPLY = "Assistant:"
DEEPSEEK_REPLY = "<｜Assistant｜>"  # fullwidth bars (U+FF5C), as DeepSeek's tokenizer spells them
INST = ("[INST]", "[/INST]")  # text in the Llama 2 and Mistral v0.1 / v0.2 vocabularies, v0.3's control tokens
MISTRAL_TOOL_MARKUP = ("[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_CALLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]")

TEMPLATES: dict[str, Template] = {
    t.name: t
    for t in (
        Template(name="alpaca", system="{system}\n\n", default_system=ALPACA_SYSTEM,
                 user="### Instruction:\n{content}\n\n" + ALPACA_REPLY, reply=ALPACA_REPLY,
                 query="{instruction}\n\n### Input:\n{input}",
                 assistant="{content}{eos}", separator="\n\n", fuse_system=True,
                 description="the book's Alpaca prompt"),
        Template(name="chatml", **_CHATML, stop_words=("<|im_end|>", "<|im_start|>"), replace_eos=True,
                 tool_format="default", observation="<|im_start|>tool\n{content}<|im_end|>\n" + IM_REPLY,
                 description="ChatML: <|im_start|>role ... <|im_end|>"),
        Template(name="qwen", **_CHATML, **_QWEN_TOOLS, default_system=QWEN_SYSTEM, stop_words=("<|im_end|>",),
                 replace_eos=True,
                 description="Qwen / Qwen2 / Qwen2.5: ChatML with Qwen's default system prompt"),
        Template(name="qwen3", **_CHATML, **_QWEN_TOOLS, stop_words=("<|im_end|>",), replace_eos=True,
                 thought_words=THOUGHT_WORDS,
                 description="Qwen3 (reasoning): ChatML, an empty <think></think> where a response has none"),
        Template(name="qwen3_nothink", **_CHATML, **_QWEN_TOOLS, stop_words=("<|im_end|>",), replace_eos=True,
                 description="Qwen3 without thinking (Qwen3-Instruct-2507 and non-reasoning use)"),
        Template(name="llama3", prefix="{bos}",
                 system="<|start_header_id|>system<|end_header_id|>\n\n{system}<|eot_id|>",
                 user="<|start_header_id|>user<|end_header_id|>\n\n{content}<|eot_id|>" + LLAMA3_REPLY,
                 reply=LLAMA3_REPLY,
                 assistant="{content}<|eot_id|>",
                 special_tokens=LLAMA3_MARKUP,
                 stop_words=("<|eot_id|>", "<|eom_id|>"), replace_eos=True, tool_format="llama3",
                 observation="<|start_header_id|>ipython<|end_header_id|>\n\n{content}<|eot_id|>" + LLAMA3_REPLY,
                 description="Llama 3 / 3.1 / 3.2 Instruct"),
        Template(name="openchat-3.6", prefix="{bos}",
                 user="<|start_header_id|>GPT4 Correct User<|end_header_id|>\n\n{content}<|eot_id|>" + OPENCHAT_REPLY,
                 reply=OPENCHAT_REPLY, special_tokens=LLAMA3_MARKUP, stop_words=("<|eot_id|>",),
                 description="OpenChat 3.6 (a Llama 3 8B): GPT4 Correct User / Assistant headers, the tokenizer's EOS"),
        # LLaMA-Factory 0.9.5 src/llamafactory/data/template.py:827-833: register_template's defaults (:533-550) for the
        # rest, tools included: the default tool format, a call in the answer's block, a tool result as a user turn
        Template(name="deepseekr1", prefix="{bos}", user="<｜User｜>{content}" + DEEPSEEK_REPLY, reply=DEEPSEEK_REPLY,
                 special_tokens=("<｜User｜>", DEEPSEEK_REPLY), thought_words=THOUGHT_WORDS, tool_format="default",
                 description="DeepSeek-R1-Distill-Qwen / -Llama (reasoning): <｜User｜> ... <｜Assistant｜>, an empty "
                             "<think></think> where a response has none"),
        # LLaMA-Factory 0.9.5 src/llamafactory/data/template.py:1393-1398 (llama2: BOS in every user block, the
        # assistant block the default {content}{eos}, Llama2Template) and :1780-1791 (mistral, "mistral tokenizer
        # v3", with its tool format)
        Template(name="llama2", system="<<SYS>>\n{system}\n<</SYS>>\n\n", user="{bos}[INST] {content} [/INST]",
                 system_in_content=True, optional_tokens=INST, tool_format="default",
                 description="Llama 2 chat: <s>[INST] <<SYS>> system <</SYS>> ... [/INST], the system inside the first "
                             "[INST]"),
        Template(name="mistral", prefix="{bos}", system="{system}\n\n", user="[INST] {content}[/INST]",
                 assistant=" {content}{eos}", system_in_content=True, optional_tokens=(*INST, *MISTRAL_TOOL_MARKUP),
                 tool_format="mistral", function="[TOOL_CALLS] {content}{eos}",
                 observation='[TOOL_RESULTS] {"content": {content}}[/TOOL_RESULTS]',
                 description="Mistral-7B-Instruct v0.1 / v0.2 / v0.3: <s>[INST] ...[/INST] answer</s>, the system "
                             "inside the first [INST]"),
        Template(name="default", system="System: {system}{eos}\n", user="Human: {content}{eos}\n" + DEFAULT_REPLY,
                 reply=DEFAULT_REPLY,
                 assistant="{content}{eos}\n", tool_format="default",
                 description="LLaMA-Factory's default: Human: / Assistant:"),
        Template(name="empty", assistant="{content}", tool_format="default",
                 description="no markup and no EOS: the prompt is the instruction (and input), the response follows"),
    )
}

# LLaMA-Factory 0.9.5 src/llamafactory/data/template.py:1886-1927: phi (Phi-3 / Phi-3.5-mini-instruct), phi4
# (microsoft/phi-4), phi4_mini (Phi-4-mini-instruct; its format_tools writes the tools text as given inside
# <|tool|>...<|/tool|>, tokens in Phi-4-mini's vocabulary and text where a vocabulary lacks them; a call in the default
# format as an answer, a tool result as a user turn: register_template's defaults, :534-550); every answer ends at the
# template's own end token (replace_eos)
PHI_MARKUP = ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>")
PHI4_MARKUP = ("<|im_start|>", "<|im_sep|>", "<|im_end|>")
PHI4_REPLY = "<|im_start|>assistant<|im_sep|>"
TEMPLATES.update({t.name: t for t in (
    Template(name="phi", system="<|system|>\n{system}<|end|>\n", user="<|user|>\n{content}<|end|>\n<|assistant|>\n",
             reply="<|assistant|>\n", assistant="{content}<|end|>\n", special_tokens=PHI_MARKUP,
             stop_words=("<|end|>",), replace_eos=True,
             description="Phi-3 / Phi-3.5-mini-instruct: <|user|> ...<|end|> <|assistant|>, a newline after each"),
    Template(name="phi4", system="<|im_start|>system<|im_sep|>{system}<|im_end|>",
             user="<|im_start|>user<|im_sep|>{content}<|im_end|>" + PHI4_REPLY, reply=PHI4_REPLY,
             assistant="{content}<|im_end|>", special_tokens=PHI4_MARKUP, stop_words=("<|im_end|>",), replace_eos=True,
             description="Phi-4 (microsoft/phi-4): <|im_start|>user<|im_sep|> ...<|im_end|>, no newlines"),
    Template(name="phi4_mini", system="<|system|>{system}<|end|>", user="<|user|>{content}<|end|><|assistant|>",
             reply="<|assistant|>", assistant="{content}<|end|>", special_tokens=PHI_MARKUP, stop_words=("<|end|>",),
             replace_eos=True, tool_format="phi4_mini", optional_tokens=PHI4_MINI_TOOLS,
             description="Phi-4-mini-instruct: <|user|> ...<|end|><|assistant|>, no newlines"),
)})
# LLaMA-Factory 0.9.5 src/llamafactory/data/template.py:966-978 (gemma) and :997-1011 (gemma3: gemma's strings, an
# image plugin beside): Llama2Template, the system prompt and a blank line opening the first user turn's content;
# BOS once; each answer closed by <end_of_turn> and a newline, <end_of_turn> the EOS generation stops at (replace_eos).
# Tools in the default format (register_template's default format_tools / format_function, the call in the answer's
# block, :534-550), a tool result in its own <start_of_turn>tool block. :981-994: gemma2, the same strings with
# efficient_eos and no replace_eos: the answer keeps <end_of_turn>\n, the tokenizer's EOS (<eos>) is learnt as the next
# prompt's first label and ends the row; it stops at <eos> / <end_of_turn>.
_GEMMA_REPLY = "<start_of_turn>model\n"
_GEMMA = dict(prefix="{bos}", system="{system}\n\n", user="<start_of_turn>user\n{content}<end_of_turn>\n" + _GEMMA_REPLY,
              reply=_GEMMA_REPLY, assistant="{content}<end_of_turn>\n", system_in_content=True,
              special_tokens=("<start_of_turn>", "<end_of_turn>"), stop_words=("<end_of_turn>",), replace_eos=True,
              tool_format="default", observation="<start_of_turn>tool\n{content}<end_of_turn>\n" + _GEMMA_REPLY)
TEMPLATES.update({t.name: t for t in (
    Template(name="gemma", **_GEMMA, description="Gemma / Gemma 2 / Gemma 3 instruct: <start_of_turn>user ..."
                                                 "<end_of_turn>, the system prompt inside the first user turn"),
    Template(name="gemma3", **_GEMMA, description="Gemma 3 (text): gemma's strings"),
    Template(name="gemma2", **{**_GEMMA, "stop_words": ("<eos>", "<end_of_turn>"), "replace_eos": False},
             efficient_eos=True, description="Gemma 2 (LLaMA-Factory's gemma2): gemma's strings, the EOS learnt as a "
                                             "label (efficient_eos)"),
)})

# LLaMA-Factory 0.9.5 src/llamafactory/data/template.py:1206-1215: granite3 (Granite 3.x instruct: its tokenizer's EOS
# <|end_of_text|> closes every block, a newline after it) and :1820-1824: olmo (LLaMA-Factory's one OLMo template, the
# OLMo-7B-Instruct format: the EOS as prefix, the system prompt bare, <|user|>\n...<|assistant|>\n, the answer then EOS;
# <|user|> / <|assistant|> are text in OLMo 2's vocabulary, tokens in others': optional_tokens)
GRANITE_MARKUP = ("<|start_of_role|>", "<|end_of_role|>", "<|end_of_text|>")
GRANITE_REPLY = "<|start_of_role|>assistant<|end_of_role|>"
TEMPLATES.update({t.name: t for t in (
    Template(name="granite3", system="<|start_of_role|>system<|end_of_role|>{system}<|end_of_text|>\n",
             user="<|start_of_role|>user<|end_of_role|>{content}<|end_of_text|>\n" + GRANITE_REPLY,
             reply=GRANITE_REPLY, assistant="{content}<|end_of_text|>\n", special_tokens=GRANITE_MARKUP,
             description="Granite 3.x instruct: <|start_of_role|>user<|end_of_role|> ...<|end_of_text|>, a newline "
                         "after each block"),
    Template(name="olmo", prefix="{eos}", user="<|user|>\n{content}<|assistant|>\n", reply="<|assistant|>\n",
             optional_tokens=("<|user|>", "<|assistant|>"),
             description="OLMo (LLaMA-Factory's olmo): EOS, then <|user|>\\n ...<|assistant|>\\n, the answer and EOS"),
)})

# LLaMA-Factory 0.9.5 src/llamafactory/data/template.py:1081-1092: glm4 (GLM-4-9B-0414, GLM-4-32B-0414, glm-4-9b-chat):
# the prefix [gMASK]<sop>, the answer after a newline with no end token (efficient_eos: it learns the EOS at the next
# prompt's first token, and a trained EOS ends the row), stops at <|user|> / <|observation|>; :1178-1191: glmz1
# (GLM-Z1-9B-0414 / -32B-0414), the same strings as a reasoning template (ReasoningTemplate, the default thought
# words: an empty <think></think> in front of a response without one). Both use the glm4 tool format (a Chinese tool
# prompt with each schema as json.dumps(indent=4), a call as "name\narguments" right after <|assistant|>, no parallel
# calls) and a tool result in an <|observation|> block.
GLM4_MARKUP = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>")
_GLM4 = dict(prefix="[gMASK]<sop>", system="<|system|>\n{system}", user="<|user|>\n{content}<|assistant|>",
             reply="<|assistant|>", assistant="\n{content}", special_tokens=GLM4_MARKUP,
             stop_words=("<|user|>", "<|observation|>"), efficient_eos=True, tool_format="glm4", function="{content}",
             observation="<|observation|>\n{content}<|assistant|>")
TEMPLATES.update({t.name: t for t in (
    Template(name="glm4", **_GLM4, description="GLM-4 / GLM-4-0414: [gMASK]<sop><|user|> ...<|assistant|> answer, its "
                                               "EOS learnt as a label (efficient_eos)"),
    Template(name="glmz1", **_GLM4, thought_words=THOUGHT_WORDS,
             description="GLM-Z1-0414 (reasoning): glm4's strings, an empty <think></think> where a response has none"),
)})
# :1095-1108: glm4_moe (GLM-4.5 / GLM-4.6, LLaMA-Factory's template for zai-org/GLM-4.5-Air): glmz1 (glm4's strings as a
# ReasoningTemplate) with its own tool format (GLM4MOEToolUtils, tool_utils.py:684-713: the tools as qwen lists them,
# a call as "\n<tool_call>name" with <arg_key> / <arg_value> pairs, parallel calls allowed)
TEMPLATES["glm4_moe"] = Template(name="glm4_moe", **{**_GLM4, "tool_format": "glm4_moe"}, thought_words=THOUGHT_WORDS,
                                 description="GLM-4.5 / GLM-4.6 (reasoning): glmz1's strings, calls with <arg_key> / "
                                             "<arg_value> pairs")

# LLaMA-Factory 0.9.5 src/llamafactory/data/template.py:1194-1203: gpt_oss (openai/gpt-oss-20b / -120b), the harmony
# format as LLaMA-Factory writes it: a system block (its default system prompt ChatGPT's), user blocks ending in
# <|start|>assistant, the answer after it with no end token (efficient_eos: the tokenizer's EOS <|return|> is learnt
# as a label), a reasoning template (ReasoningTemplate) whose thought is the analysis channel closed by the final
# channel's header: an answer without one gets the empty thought in front. No developer block. Tools: register_template's
# defaults (:534-550), as for the gemma family: the default tool format, a call in the answer's block (its empty thought
# in front too), a tool result as a user turn.
GPT_OSS_REPLY = "<|start|>assistant"
TEMPLATES["gpt_oss"] = Template(
    name="gpt_oss", system="<|start|>system<|message|>{system}<|end|>",
    default_system="You are ChatGPT, a large language model trained by OpenAI.",
    user="<|start|>user<|message|>{content}<|end|>" + GPT_OSS_REPLY, reply=GPT_OSS_REPLY, assistant="{content}",
    special_tokens=("<|start|>", "<|message|>", "<|end|>", "<|channel|>"),
    thought_words=("<|channel|>analysis<|message|>", "<|end|><|start|>assistant<|channel|>final<|message|>"),
    efficient_eos=True, tool_format="default",
    description="gpt-oss (reasoning): <|start|>user<|message|> ...<|end|><|start|>assistant, the analysis channel's "
                "thought (empty where the answer has none), then the final channel; its EOS learnt as a label")

# LLaMA-Factory 0.9.5 src/llamafactory/data/template.py:2072-2121 (Qwen2-VL / Qwen2.5-VL and Qwen3-VL, "copied from qwen
# template"): on text their strings are qwen's and qwen3's; only an image plugin is beside (images are refused here).
# qwen2_vl differs from qwen in its default system prompt alone; qwen3_vl is qwen3 (ReasoningTemplate) and
# qwen3_vl_nothink qwen3_nothink, letter for letter: the same Template under LLaMA-Factory's names.
TEMPLATES.update({t.name: t for t in (
    dataclasses.replace(TEMPLATES["qwen"], name="qwen2_vl", default_system="You are a helpful assistant.",
                        description="Qwen2-VL / Qwen2.5-VL on text: qwen's strings, the default system prompt "
                                    "\"You are a helpful assistant.\""),
    dataclasses.replace(TEMPLATES["qwen3"], name="qwen3_vl", description="Qwen3-VL (reasoning) on text: qwen3"),
    dataclasses.replace(TEMPLATES["qwen3_nothink"], name="qwen3_vl_nothink",
                        description="Qwen3-VL-Instruct on text: qwen3_nothink"),
)})

# LLaMA-Factory 0.9.5 src/llamafactory/data/template.py:1794-1804: mistral_small ("mistral tokenizer v7 tekken": Mistral
# Small 3 / 3.1 / 3.2). The default Template class, not mistral's Llama2Template: BOS once, the system prompt in a block
# of its own ([SYSTEM_PROMPT] ... [/SYSTEM_PROMPT], the tools text after it inside, Template._encode :149-153), then
# [INST]{query}[/INST] without spaces, the answer closed by the tokenizer's EOS (register_template's default
# format_assistant, :534-536; no stop words, no replace_eos); a call after [TOOL_CALLS] with the EOS, a result inside
# [TOOL_RESULTS] (the mistral tool format). Tekken holds all of this markup as control tokens.
TEMPLATES["mistral_small"] = Template(
    name="mistral_small", prefix="{bos}", system="[SYSTEM_PROMPT]{system}[/SYSTEM_PROMPT]", user="[INST]{content}[/INST]",
    special_tokens=(*INST, "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]"), optional_tokens=MISTRAL_TOOL_MARKUP,
    tool_format="mistral", function="[TOOL_CALLS]{content}{eos}",
    observation='[TOOL_RESULTS]{"content": {content}}[/TOOL_RESULTS]',
    description="Mistral Small 3 / 3.1 / 3.2 (Tekken): <s>[SYSTEM_PROMPT]...[/SYSTEM_PROMPT][INST]...[/INST]answer</s>")

# LLaMA-Factory 0.9.5 src/llamafactory/data/template.py:820-824: deepseek3 (DeepSeek-V3 / -V3-0324 chat,
# extras/constants.py:480-493; Moonlight-16B-A3B-Instruct has LLaMA-Factory's moonlight template, below): BOS,
# the system prompt as it is (register_template's default format_system, :547), <｜User｜>...<｜Assistant｜>, the answer
# with the tokenizer's EOS; the default tool format (:533-550: a call as an answer, a tool result as a user turn).
# :827-833, deepseekr1, is these strings as a ReasoningTemplate: deepseek3 is deepseekr1 without its thought handling.
TEMPLATES["deepseek3"] = dataclasses.replace(
    TEMPLATES["deepseekr1"], name="deepseek3", thought_words=None,
    description="DeepSeek-V3 chat: <｜begin▁of▁sentence｜>system<｜User｜> ...<｜Assistant｜>answer"
                "<｜end▁of▁sentence｜>; deepseekr1's strings without <think>")

# LLaMA-Factory 0.9.5 src/llamafactory/data/template.py:1490-1500: moonlight (Moonlight-16B-A3B-Instruct,
# extras/constants.py:2133-2145): Kimi's <|im_user|>user<|im_middle|> ...<|im_end|> blocks with no newlines, Moonshot's
# default system prompt, every answer ending at <|im_end|> (replace_eos); register_template's defaults (:533-550) for
# tools: the default tool format, a call in the answer's block, a tool result as a user turn
MOONLIGHT_REPLY = "<|im_assistant|>assistant<|im_middle|>"
TEMPLATES["moonlight"] = Template(
    name="moonlight", system="<|im_system|>system<|im_middle|>{system}<|im_end|>",
    default_system="You are a helpful assistant provided by Moonshot-AI.",
    user="<|im_user|>user<|im_middle|>{content}<|im_end|>" + MOONLIGHT_REPLY, reply=MOONLIGHT_REPLY,
    assistant="{content}<|im_end|>", special_tokens=("<|im_system|>", "<|im_user|>", "<|im_assistant|>", "<|im_middle|>",
                                                     "<|im_end|>"),
    stop_words=("<|im_end|>",), replace_eos=True, tool_format="default",
    description="Moonlight-16B-A3B-Instruct: <|im_user|>user<|im_middle|> ...<|im_end|>, Moonshot's default system prompt")

# Every markup string a template places by id or stops at: in user text these stay literal whatever the checkpoint
# (pipeline.data.tokenizer_files.markup_tokens), so that data cannot forge a turn boundary.
TEMPLATE_MARKUP: frozenset[str] = frozenset(token for t in TEMPLATES.values()
                                            for token in (*t.special_tokens, *t.optional_tokens, *t.stop_words))


# Templates for LLaMA-Factory's multiple-choice benchmarks only (eval with task; recipe rule
# fewshot_is_for_benchmarks refuses them elsewhere), kept out of TEMPLATES: never trained on, exported or offered.
# fewshot: LLaMA-Factory 0.9.5 src/llamafactory/data/template.py:958-963, the template of its eval example
# (examples/train_lora/llama3_lora_eval.yaml): each shot's answer followed by a blank line, no markup, no BOS.
BENCHMARK_TEMPLATES: dict[str, Template] = {
    "fewshot": Template(name="fewshot", assistant="{content}\n\n",
                        description="LLaMA-Factory's benchmark prompt (eval with task): question, answer, a blank line"),
}


def get_template(name: str) -> Template:
    try:
        return TEMPLATES[name] if name in TEMPLATES else BENCHMARK_TEMPLATES[name]
    except KeyError:
        raise UserError(f"template '{name}' is not known{did_you_mean(name, TEMPLATES)}; "
                        f"choose one of {', '.join(TEMPLATES)}") from None


def recipe_template(name: str, default_system: str | None = None) -> Template:
    """The named template with the recipe's default_system as its default system prompt (LLaMA-Factory:
    template.default_system = data_args.default_system when set); "" removes the template's own (Qwen's)."""
    template = get_template(name)
    return template if default_system is None else dataclasses.replace(template, default_system=default_system)


def tool_templates() -> list[str]:
    """The templates that render function calling (those with a tool format)."""
    return [name for name, t in TEMPLATES.items() if t.tool_format]


def tool_refusal(template: str) -> str:
    """Why function-calling data cannot be used with `template`, and which templates render it."""
    able = ", ".join(tool_templates())
    return (f"function-calling data (tool descriptions and function_call/observation turns) needs a template that "
            f"renders tools, and template '{template}' does not; use one that does ({able}) or name a dataset "
            "without tools")


def templates_for(tokenizer: "Tokenizer") -> list[str]:
    """The templates whose markup this tokenizer can express."""
    return [name for name, t in TEMPLATES.items() if not t.missing_tokens(tokenizer)]
