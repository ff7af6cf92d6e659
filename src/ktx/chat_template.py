"""Chat templates: render a conversation to prompt text the way HF transformers does.

A GGUF stores the model's Jinja template under `tokenizer.chat_template`. Templates are written for
transformers' renderer, so this one copies its environment: a sandbox (templates are untrusted code),
`trim_blocks` and `lstrip_blocks`, the loop-control extension, a `tojson` filter that keeps non-ASCII
text and takes indent/separators/sort_keys, and the globals `raise_exception(msg)` and
`strftime_now(fmt)`. The template sees `messages`, `add_generation_prompt`, `tools` and `documents`
(None unless given), the special tokens (`bos_token`, `eos_token`) and any extra keyword arguments
(`enable_thinking=False`, ...). `{% generation %}` blocks, which mark assistant text for training, render
their body.

Files without a template whose vocabulary has DeepSeek's `<｜User｜>`, or whose architecture is deepseek2, get
DEEPSEEK_V3_TEMPLATE, the DeepSeek-V3/R1 format:

    <｜begin▁of▁sentence｜>{system}<｜User｜>{user}<｜Assistant｜>{answer}<｜end▁of▁sentence｜><｜User｜>...<｜Assistant｜>

System messages are joined with blank lines and go first; an earlier answer keeps only what follows its
`</think>` (R1 does not see its old reasoning).

Gemma-3 GGUFs (a vocabulary with `<start_of_turn>`) that carry no template get GEMMA_TEMPLATE, Gemma's
turn format; a system message has no turn of its own and goes in front of the first user text:

    <bos><start_of_turn>user\n{system}\n\n{user}<end_of_turn>\n<start_of_turn>model\n{answer}<end_of_turn>\n...<start_of_turn>model\n

Only when the file's name says it was instruction-tuned, though (`general.finetune` or `general.name`
holding "it", "instruct" or "chat"): a pretrained base model, such as the default Gemma-3-270M, has the
turn tokens in its vocabulary but was never taught them, and answers them by repeating the question.
Such models, and vocabularies with neither Gemma's nor DeepSeek's turn tokens, get TRANSCRIPT_TEMPLATE, a
plain text exchange that a base model continues sensibly; the reply ends at TRANSCRIPT_STOP, where the
model starts the next question itself:

    {system}\n\nQuestion: {user}\nAnswer: {answer}\nQuestion: ...\nAnswer:
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ktx.errors import KtxError

DEEPSEEK_V3_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + message['content'] -%}"
    "{%- endfor -%}"
    "{{- bos_token + ns.system -}}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}"
    "{{- '<｜User｜>' + message['content'] -}}"
    "{%- elif message['role'] == 'assistant' -%}"
    "{{- '<｜Assistant｜>' + message['content'].split('</think>')[-1] + '<｜end▁of▁sentence｜>' -}}"
    "{%- elif message['role'] != 'system' -%}"
    "{{- raise_exception('the built-in DeepSeek template has no ' + message['role'] + ' role; "
    "use a GGUF with its own chat template') -}}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<｜Assistant｜>' -}}{%- endif -%}"
)

GEMMA_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + message['content'] + '\\n\\n' -%}"
    "{%- endfor -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- set role = 'model' if message['role'] == 'assistant' else message['role'] -%}"
    "{{- '<start_of_turn>' + role + '\\n' + (ns.system if loop.first else '') + message['content'] | trim + '<end_of_turn>\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<start_of_turn>model\\n' -}}{%- endif -%}"
)

TRANSCRIPT_TEMPLATE = (
    "{{- bos_token -}}"
    "{%- for message in messages if message['role'] == 'system' -%}"
    "{{- message['content'] | trim + '\\n\\n' -}}"
    "{%- endfor -%}"
    "{%- for message in messages if message['role'] != 'system' -%}"
    "{%- set text = message['content'].split('</think>')[-1] if message['role'] == 'assistant' else message['content'] -%}"
    "{{- ('Answer: ' if message['role'] == 'assistant' else 'Question: ') + text | trim + '\\n' -}}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- 'Answer:' -}}{%- endif -%}"
)
TRANSCRIPT_STOP = ("\nQuestion:",)


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` renders its body (transformers uses it to mark assistant text)."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes '<' and '&', which would corrupt tool schemas in a prompt.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                        extensions=[_GenerationBlock, jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render(template: str, messages: list[dict], add_generation_prompt: bool = True, **variables: Any) -> str:
    """Prompt text for `messages` ([{'role': ..., 'content': ...}, ...]) through the Jinja `template`."""
    context = {"tools": None, "documents": None, **variables}
    try:
        return _compile(template).render(messages=messages, add_generation_prompt=add_generation_prompt, **context)
    except jinja2.exceptions.TemplateError as e:
        raise KtxError(f"chat template: {e}; check the messages (roles, order) or pass another template") from e
