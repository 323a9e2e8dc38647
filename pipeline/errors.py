"""User mistakes are exceptions of their own, so the CLI can print them without a traceback (exit 2)."""
from __future__ import annotations

from typing import Iterable


class UserError(Exception):
    """One or more user-facing problems; each message names the file and line/row/key where it can."""

    def __init__(self, messages: str | Iterable[str]):
        self.messages: list[str] = [messages] if isinstance(messages, str) else list(messages)
        super().__init__("\n".join(self.messages))


def did_you_mean(word: str, choices: Iterable[str], cutoff: float = 0.6) -> str:
    """A ' (did you mean X?)' suffix, or '' when nothing is close (similarity ratio >= cutoff).

    Compared case-insensitively: 'LoRA' for 'lora' is the likeliest slip of all, yet too many letters differ in
    case for a case-sensitive ratio to reach the cutoff (while 'Lora' did). The suggestion keeps the choice's own
    spelling; an exact match in another case wins over any near one."""
    import difflib

    by_lower: dict[str, str] = {}
    for choice in choices:
        by_lower.setdefault(choice.lower(), choice)
    close = difflib.get_close_matches(word.lower(), list(by_lower), n=1, cutoff=cutoff)
    return f" (did you mean '{by_lower[close[0]]}'?)" if close else ""
