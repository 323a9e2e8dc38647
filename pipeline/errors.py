"""User mistakes are exceptions of their own, so the CLI can print them without a traceback (exit 2)."""
from __future__ import annotations

import hashlib
import os
import sys
from typing import Callable, Iterable

# Set by pipeline.launch for the ranks it starts: a folder where the first rank to print a message leaves a mark.
REPORTED_ENV = "PIPELINE_REPORTED_ERRORS"


class UserError(Exception):
    """One or more user-facing problems; each message names the file and line/row/key where it can."""

    def __init__(self, messages: str | Iterable[str]):
        self.messages: list[str] = [messages] if isinstance(messages, str) else list(messages)
        super().__init__("\n".join(self.messages))


def print_errors(err: UserError) -> None:
    """`error: ...` lines on stderr, each once per job: a recipe or data problem is found by every rank, and
    eight ranks printed it eight times. Ranks started by pipeline.launch share a folder (REPORTED_ENV); the
    first to create a message's mark prints it. A message that differs between ranks is printed by each; a
    process outside the launcher (one rank, or on another node) prints everything."""
    for message in err.messages:
        if _first_report(message):
            print(f"error: {message}", file=sys.stderr)


def _first_report(message: str) -> bool:
    folder = os.environ.get(REPORTED_ENV)
    if not folder:
        return True
    mark = os.path.join(folder, hashlib.sha256(message.encode()).hexdigest())
    try:
        os.close(os.open(mark, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o600))
    except FileExistsError:
        return False
    except OSError:  # the folder is gone or not writable: printing twice beats not printing
        return True
    return True


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.6,
                 show: Callable[[str], str] | None = None) -> str:
    """A ' (did you mean X?)' suffix, or '' when nothing is close (similarity ratio >= cutoff); `show` writes the
    closest choice as the user would type it (a folder name compared alone, shown with its parent path: whole paths
    sharing a long prefix are all 'close').

    Compared case-insensitively: 'LoRA' for 'lora' is the likeliest slip of all, yet too many letters differ in
    case for a case-sensitive ratio to reach the cutoff (while 'Lora' did). The suggestion keeps the choice's own
    spelling; an exact match in another case wins over any near one."""
    import difflib

    by_lower: dict[str, str] = {}
    for choice in choices:
        by_lower.setdefault(choice.lower(), choice)
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=cutoff)
    if not close:
        return ""
    return f" (did you mean '{(show or str)(by_lower[close[0]])}'?)"


def article(word: str) -> str:
    """'a' or 'an' for `word` as it is said, for a message that puts a value after the article ("an 'assistant'
    turn", "a 'gpt' turn", "an Olmo2ForCausalLM", "a UTF-16 byte order mark"): a fixed article reads wrong for half
    the values a message can name. By the sound of the first letters: a vowel letter (but a 'u' said 'you', as in
    user, unit, UTF, and 'one'), a capital acronym by its first letter's name (an HF, a GPU), a number by
    its first word (an 8, an 11, an 18, an 80; a 1024)."""
    text = word.lstrip("'\"`(")
    head = text.split("-")[0].split("_")[0]
    if not text:
        return "a"
    if text[0].isdigit():
        digits = len(text) - len(text.lstrip("0123456789"))
        return "an" if text[0] == "8" or (text[:2] in ("11", "18") and digits % 3 == 2) else "a"
    if len(head) > 1 and head[:2].isupper():  # an acronym, said letter by letter
        return "an" if head[0] in "AEFHILMNORSX" else "a"
    lower = text.lower()
    if lower.startswith(("one", "once", "uni", "use", "usu", "uti", "utf", "eu", "ur")):
        return "a"
    return "an" if lower[0] in "aeiou" else "a"
