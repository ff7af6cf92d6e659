"""ktx.chat_template against transformers' apply_chat_template (the renderer chat templates are written for)."""

from __future__ import annotations

import os
from datetime import datetime
from pathlib import Path

import pytest
import tokenizers
from tokenizers import models

from ktx.chat_template import DEEPSEEK_V3_TEMPLATE, GEMMA_TEMPLATE, TRANSCRIPT_TEMPLATE, render
from ktx.errors import KtxError
from ktx.tokenizer import Tokenizer

FIXTURES = Path(os.environ.get("KTX_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"))
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# A Qwen-style ChatML template written for this test: system default, tools as JSON, a thinking switch,
# role checks through raise_exception, loop variables, namespace, whitespace control.
CHATML = """{%- set ns = namespace(sys_done=false) -%}
{%- if tools %}
<|im_start|>system
{% if messages[0]['role'] == 'system' %}{{ messages[0]['content'] }}
{% set ns.sys_done = true %}{% endif %}
# Tools
<tools>
{% for tool in tools %}
{{ tool | tojson }}
{% endfor %}
</tools><|im_end|>
{% elif messages[0]['role'] != 'system' %}
<|im_start|>system
You are a helpful assistant.<|im_end|>
{% endif %}
{%- for message in messages %}
    {%- if message['role'] not in ['system', 'user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {%- if not (message['role'] == 'system' and ns.sys_done) %}
<|im_start|>{{ message['role'] }}
{{ message['content'] | trim }}<|im_end|>
    {% endif %}
    {%- if loop.last and add_generation_prompt %}
<|im_start|>assistant
{% if enable_thinking is defined and enable_thinking is false %}<think>

</think>

{% endif %}
    {%- endif %}
{%- endfor %}"""

# Exercises the other pieces of transformers' environment: generation blocks, strftime_now, tojson options,
# loop controls, the special-token variables.
EXTRAS = """{{ bos_token }}{% for m in messages %}{% if m.role == 'skip' %}{% continue %}{% endif %}
{% generation %}[{{ m.role | upper }}] {{ m.content }}{% endgeneration %}{{ eos_token }}
{% endfor %}year={{ strftime_now('%Y') }} meta={{ {'b': 'ü<&>', 'a': [1, 2]} | tojson(indent=2, sort_keys=True) }}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}"""

CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "<think>\nadd them\n</think>\n\n4"},
        {"role": "user", "content": "  And 3+3?\n"},
    ],
    [
        {"role": "system", "content": "A"},
        {"role": "system", "content": "B"},
        {"role": "user", "content": "中文 😀\n\n  indented"},
        {"role": "assistant", "content": "Sure."},
    ],
]
CITY = {"type": "object", "properties": {"city": {"type": "string"}}}
TOOLS = [{"type": "function",
          "function": {"name": "get_weather", "description": "Weather <now> & here", "parameters": CITY}}]


def _transformers(template: str):
    from transformers import PreTrainedTokenizerFast

    words = tokenizers.Tokenizer(models.WordLevel({"<unk>": 0, BOS: 1, EOS: 2}, unk_token="<unk>"))
    return PreTrainedTokenizerFast(tokenizer_object=words, chat_template=template, bos_token=BOS, eos_token=EOS,
                                   unk_token="<unk>")


@pytest.mark.parametrize("template", [DEEPSEEK_V3_TEMPLATE, GEMMA_TEMPLATE, TRANSCRIPT_TEMPLATE, CHATML, EXTRAS],
                         ids=["deepseek", "gemma", "transcript", "chatml", "extras"])
@pytest.mark.parametrize("conv", range(len(CONVERSATIONS)))
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_matches_transformers(template, conv, add_generation_prompt):
    hf = _transformers(template)
    messages = CONVERSATIONS[conv]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    got = render(template, messages, add_generation_prompt=add_generation_prompt, bos_token=BOS, eos_token=EOS)
    assert got == expected


@pytest.mark.parametrize("kwargs", [{"tools": TOOLS}, {"enable_thinking": False}, {"enable_thinking": True}])
def test_extra_variables_match_transformers(kwargs):
    hf = _transformers(CHATML)
    messages = CONVERSATIONS[1]
    expected = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
    assert render(CHATML, messages, add_generation_prompt=True, bos_token=BOS, eos_token=EOS, **kwargs) == expected


def test_extras_render_as_expected():
    out = render(EXTRAS, [{"role": "skip", "content": "x"}, {"role": "user", "content": "hi"}],
                 add_generation_prompt=True, bos_token="<s>", eos_token="</s>")
    assert out.startswith("<s>[USER] hi</s>\n")
    assert f"year={datetime.now().year}" in out
    assert '"b": "ü<&>"' in out and out.index('"a"') < out.index('"b"')
    assert out.endswith("[ASSISTANT]")


def test_deepseek_format():
    # The DeepSeek-V3/R1 prompt layout, written out by hand.
    got = render(DEEPSEEK_V3_TEMPLATE, CONVERSATIONS[1], add_generation_prompt=True, bos_token=BOS, eos_token=EOS)
    assert got == (f"{BOS}Be terse.<｜User｜>What is 2+2?<｜Assistant｜>\n\n4{EOS}"
                   "<｜User｜>  And 3+3?\n<｜Assistant｜>")
    got = render(DEEPSEEK_V3_TEMPLATE, CONVERSATIONS[2], add_generation_prompt=False, bos_token=BOS, eos_token=EOS)
    assert got == f"{BOS}A\n\nB<｜User｜>中文 😀\n\n  indented<｜Assistant｜>Sure.{EOS}"


def test_template_errors_are_ktx_errors():
    with pytest.raises(KtxError, match="Unknown role: tool"):
        render(CHATML, [{"role": "tool", "content": "x"}], bos_token=BOS, eos_token=EOS)
    with pytest.raises(KtxError, match="tool"):
        render(DEEPSEEK_V3_TEMPLATE, [{"role": "tool", "content": "x"}], bos_token=BOS, eos_token=EOS)


def test_sandbox_blocks_python_internals():
    with pytest.raises(Exception):
        render("{{ messages.__class__.__mro__ }}{{ ''.__class__.__subclasses__() }}", [])


def _vocab_md(**extra):
    tokens = ["a", "b", "ab", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "qwen2", "tokenizer.ggml.tokens": tokens,
            "tokenizer.ggml.token_type": [1, 1, 1, 3, 3, 3, 3], "tokenizer.ggml.merges": ["a b"],
            "tokenizer.ggml.bos_token_id": 3, "tokenizer.ggml.eos_token_id": 4, **extra}


def test_tokenizer_uses_file_template():
    tok = Tokenizer.from_metadata(_vocab_md(**{"tokenizer.chat_template": CHATML}))
    messages = CONVERSATIONS[0]
    expected = _transformers(CHATML).apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat_template(messages) == expected
    assert tok.eos_ids == {4, 6}  # eos + <|im_end|>


def test_tokenizer_without_turn_tokens_gets_the_transcript():
    tok = Tokenizer.from_metadata(_vocab_md())
    assert tok.chat_format == "transcript" and tok.chat_stop == ("\nQuestion:",)
    assert tok.apply_chat_template(CONVERSATIONS[0]) == "<s>Question: Hello!\nAnswer:"
    assert tok.apply_chat_template(CONVERSATIONS[1]) == ("<s>Be terse.\n\nQuestion: What is 2+2?\nAnswer: 4\n"
                                                         "Question: And 3+3?\nAnswer:")
    assert tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=False) == "<s>Question: Hello!\n"


def _turn_vocab_md(turn_tokens, **extra):
    md = _vocab_md(**extra)
    md["tokenizer.ggml.tokens"] = md["tokenizer.ggml.tokens"] + turn_tokens
    md["tokenizer.ggml.token_type"] = md["tokenizer.ggml.token_type"] + [3] * len(turn_tokens)
    return md


def test_tokenizer_falls_back_to_deepseek_for_a_deepseek_vocabulary():
    tok = Tokenizer.from_metadata(_turn_vocab_md(["<｜User｜>", "<｜Assistant｜>"]))
    assert tok.chat_format == "deepseek" and tok.chat_stop == ()
    assert tok.apply_chat_template(CONVERSATIONS[0]) == "<s><｜User｜>Hello!<｜Assistant｜>"
    assert tok.apply_chat_template(CONVERSATIONS[0], add_generation_prompt=False) == "<s><｜User｜>Hello!"


@pytest.mark.parametrize("name, finetune, fmt", [
    ("Gemma 3 270m", None, "transcript"),              # google/gemma-3-270m, the pretrained model
    ("Gemma 3 270m It", None, "gemma"), ("gemma-3-270m-it", None, "gemma"), ("Gemma 3 270m", "it", "gemma"),
    ("Gemma 3 1b Instruct", None, "gemma"), ("Gemma Italian", None, "transcript"), ("Gemma 3 Edit", None, "transcript"),
])
def test_gemma_vocabulary_gets_turns_only_when_instruction_tuned(name, finetune, fmt):
    extra = {"general.name": name} | ({"general.finetune": finetune} if finetune else {})
    tok = Tokenizer.from_metadata(_turn_vocab_md(["<start_of_turn>", "<end_of_turn>"], **extra))
    assert tok.chat_format == fmt
    if fmt == "gemma":
        assert tok.apply_chat_template(CONVERSATIONS[0]) == "<s><start_of_turn>user\nHello!<end_of_turn>\n<start_of_turn>model\n"


def test_fixture_gguf_has_no_template_and_gets_deepseek():
    path = FIXTURES / "tiny-dsv3" / "tiny-dsv3-BF16.gguf"
    if not path.exists():
        pytest.skip(f"fixture {path} absent")
    import gguf

    md = {k: f.contents() for k, f in gguf.GGUFReader(path).fields.items() if k.startswith(("tokenizer.", "general."))}
    assert "tokenizer.chat_template" not in md
    tok = Tokenizer.from_metadata(md)
    prompt = tok.apply_chat_template(CONVERSATIONS[1])
    assert prompt == render(DEEPSEEK_V3_TEMPLATE, CONVERSATIONS[1], bos_token=BOS, eos_token=EOS)
    assert tok.encode(prompt)[:2] == [tok.bos_id, tok.encode("Be", add_bos=False)[0]]  # one BOS, from the template
