"""Chat formatting: messages -> prompt string -> token ids, for the Phi-3, Phi-3.5 and Phi-4-mini formats.

A checkpoint's own Jinja `chat_template` is rendered when it ships one, in the same sandboxed Jinja
environment transformers' `apply_chat_template` uses (trim_blocks, lstrip_blocks, loop controls,
`raise_exception`, a non-escaping `tojson`), so the string and ids match it. Checkpoints without a
template fall back to a built-in one per family:

    phi-3-2024-04  <s><|user|>\\nQ<|end|>\\n<|assistant|>\\nA<|end|>\\n...     (system messages dropped)
    phi-3          <|system|>\\nS<|end|>\\n<|user|>\\nQ<|end|>\\n<|assistant|>\\n  (eos instead of the cue)
    phi-3-medium   as phi-3-2024-04 without the leading <s>
    phi-3.5        as phi-3, but an empty system message is skipped
    phi-4-mini     <|system|>S<|end|><|user|>Q<|end|><|assistant|>             (no newlines)

References: ../shared/reference/phi-family.md section 8; transformers `utils/chat_template_utils.py`;
llama-models `models/llama3/chat_format.py`.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache

from .tokenizer import Tokenizer

VALID_ROLES = ("system", "user", "assistant")
END_MARKERS = ("<|end|>", "<|endoftext|>")  # end of a turn, end of a document

# Verbatim copies of the official tokenizer_config.json templates (sources: tests/fixtures/tokenizers/*.json).
BUILTIN_TEMPLATES = {
    # the first Phi-3-mini release (April 2024): bos first, system messages dropped
    'phi-3-2024-04': "{{ bos_token }}{% for message in messages %}{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}",
    # Phi-3-mini 4k/128k after the mid-2024 updates: every role, a newline after each tag
    'phi-3': "{% for message in messages %}{% if message['role'] == 'system' %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
    # Phi-3-medium: as the April mini template but without bos
    'phi-3-medium': "{% for message in messages %}{% if (message['role'] == 'user') %}{{'<|user|>' + '\n' + message['content'] + '<|end|>' + '\n' + '<|assistant|>' + '\n'}}{% elif (message['role'] == 'assistant') %}{{message['content'] + '<|end|>' + '\n'}}{% endif %}{% endfor %}",
    # Phi-3.5-mini: as phi-3, but an empty system message is skipped
    'phi-3.5': "{% for message in messages %}{% if message['role'] == 'system' and message['content'] %}{{'<|system|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'user' %}{{'<|user|>\n' + message['content'] + '<|end|>\n'}}{% elif message['role'] == 'assistant' %}{{'<|assistant|>\n' + message['content'] + '<|end|>\n'}}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% else %}{{ eos_token }}{% endif %}",
    # Phi-4-mini: no newlines; a system message may carry a `tools` string
    'phi-4-mini': "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}",
}


class ChatFormatError(ValueError):
    """Messages that cannot be rendered; the message says which one and why."""


@lru_cache(maxsize=16)
def _compile(template: str):
    import jinja2
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise jinja2.exceptions.TemplateError(message)

    def tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)


def validate(messages: list[dict]) -> None:
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages must be a non-empty list")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ChatFormatError(f"message {i} must be an object with 'role' and 'content'")
        if m.get("role") not in VALID_ROLES:
            raise ChatFormatError(f"message {i} has role {m.get('role')!r}; expected one of {', '.join(VALID_ROLES)}")
        if not isinstance(m.get("content"), str):
            raise ChatFormatError(f"message {i} content must be a string")


def family_template(family: str) -> str:
    if family not in BUILTIN_TEMPLATES:
        raise ChatFormatError(f"no built-in chat template {family!r}; choose one of {', '.join(BUILTIN_TEMPLATES)}")
    return BUILTIN_TEMPLATES[family]


def guess_family(tokenizer: Tokenizer) -> str:
    """Built-in template for a checkpoint without one: Phi-4-mini's tokenizer is byte-level BPE (o200k),
    the Phi-3 family's is SentencePiece with byte fallback."""
    from tokenizers import decoders

    return "phi-4-mini" if isinstance(tokenizer.backend.decoder, decoders.ByteLevel) else "phi-3.5"


def render(messages: list[dict], tokenizer: Tokenizer, add_generation_prompt: bool = True,
           template: str | None = None) -> str:
    """The prompt string for messages, from `template` or the tokenizer's own or its family's built-in one."""
    validate(messages)
    template = template or tokenizer.chat_template or family_template(guess_family(tokenizer))
    import jinja2

    try:
        return _compile(template).render(
            messages=messages, add_generation_prompt=add_generation_prompt, tools=None, documents=None,
            bos_token=tokenizer.bos_token or "", eos_token=tokenizer.eos_token or "",
            unk_token=tokenizer.unk_token or "", pad_token=tokenizer.pad_token or "")
    except jinja2.exceptions.TemplateError as e:
        raise ChatFormatError(f"chat template failed: {e}") from None


def encode_chat(messages: list[dict], tokenizer: Tokenizer, add_generation_prompt: bool = True,
                template: str | None = None) -> list[int]:
    """Token ids of the rendered prompt (special tokens come from the text, none are added)."""
    return tokenizer.encode(render(messages, tokenizer, add_generation_prompt, template), add_special_tokens=False)


def stop_ids(tokenizer: Tokenizer) -> set[int]:
    """Generation stops at: generation_config eos ids, the tokenizer's eos, and the template's end markers."""
    template = tokenizer.chat_template or family_template(guess_family(tokenizer))
    return tokenizer.stop_ids(tuple(m for m in END_MARKERS if m in template or m == tokenizer.eos_token))
