"""Rendering a pipeline chat template with transformers on a real vocabulary: the helpers the chat-template tests
share (tests/vocab/test_chat_template*.py; the family_dirs fixture is in conftest.py)."""
from __future__ import annotations

import functools
from pathlib import Path

from pipeline.data.chat_template import jinja_template
from pipeline.data.model_tokenizer import load_tokenizer
from pipeline.data.templates import Template
from pipeline.data.tokenizer import gpt2


@functools.cache
def hf_tokenizer(directory: Path):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(directory)


def ours(directory: Path):
    """The pipeline's tokenizer of a family directory (GPT-2's built in)."""
    return gpt2() if directory.name.startswith("gpt2") else load_tokenizer(directory)


def render(directory: Path, template: Template, msgs: list[dict], *, tokenize: bool = True,
           add_generation_prompt: bool = True, **kwargs):
    """transformers' apply_chat_template with the pipeline's chat template of `template`: ids, or the text."""
    out = hf_tokenizer(directory).apply_chat_template(
        msgs, chat_template=jinja_template(template, ours(directory)), tokenize=tokenize,
        add_generation_prompt=add_generation_prompt, **kwargs)
    return out["input_ids"] if tokenize else out


def render_marked(directory: Path, template: Template, msgs: list[dict], **kwargs) -> tuple[list[int], list[int]]:
    """The ids of a whole conversation (no generation prompt) and transformers' assistant mask of them: 1 for the
    tokens inside the template's {% generation %} blocks, which TRL's assistant_only_loss trains."""
    out = hf_tokenizer(directory).apply_chat_template(
        msgs, chat_template=jinja_template(template, ours(directory), marked=True), return_dict=True,
        return_assistant_tokens_mask=True, add_generation_prompt=False, **kwargs)
    return out["input_ids"], out["assistant_masks"]
