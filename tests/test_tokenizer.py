"""ktx.tokenizer against independent references.

- The tiny-dsv3 fixture: its GGUF vocabulary (DeepSeek-Coder, pre 'deepseek-coder') against the HF
  tokenizer.json that llama.cpp's converter started from, and against tokens.npy.
- Other byte-level pre-tokenizers: a small BPE trained here with `tokenizers`' own trainer, split by the
  regexes as the models' published tokenizer.json files write them (case-insensitive groups, original
  character lists); ktx gets the same vocabulary and merges as GGUF metadata plus the pre name.
- SentencePiece: a tiny BPE model trained here with `sentencepiece`, exported as GGUF metadata; ktx must
  reproduce sentencepiece's own ids and text.
"""

from __future__ import annotations

import functools
import json
import os
import random
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from hypothesis import given, settings
from hypothesis import strategies as st
from tokenizers import AddedToken, Regex, models, pre_tokenizers, trainers

from ktx.errors import KtxError
from ktx.tokenizer import StreamDecoder, Tokenizer

FIXTURES = Path(os.environ.get("KTX_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"))
DSV3 = FIXTURES / "tiny-dsv3"

FRAGMENTS = [
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)\n", "    ", "\t\t", "\n\n\n", "\r\n", " \n ",
    "12345", "3.14159", "1,000,000", "0x1F", "中文字符", "한국어", "日本語のテキストです", "😀", "👩‍👩‍👧", "🇺🇸",
    "can't", "I'LL", "We've", "  leading", "trailing  ", "x=y*2;", "<div>", '{"a": [1, 2]}', "é", "ñ", "Ω",
    "Ж", "\u00a0", "\u3000", "...", "!!!", "--", "Hello world", " the", "ĠÃ", "İstanbul", "ǅ", "\u0301",
]
TEXT = st.lists(st.one_of(st.text(max_size=12), st.sampled_from(FRAGMENTS)), max_size=10).map("".join)


def gguf_metadata(path: Path) -> dict:
    """GGUF key/values as python values (gguf-py's field.contents())."""
    import gguf

    reader = gguf.GGUFReader(path)
    return {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}


# ---------------------------------------------------------------- tiny-dsv3 fixture (DeepSeek-Coder vocab)


@pytest.fixture(scope="module")
def dscoder():
    if not (DSV3 / "tiny-dsv3-BF16.gguf").exists():
        pytest.skip(f"fixture {DSV3} absent")
    tok = Tokenizer.from_metadata(gguf_metadata(DSV3 / "tiny-dsv3-BF16.gguf"))
    ref = tokenizers.Tokenizer.from_file(str(DSV3 / "hf" / "tokenizer.json"))
    return tok, ref


def test_fixture_reference_tokens(dscoder):
    tok, ref = dscoder
    text = (DSV3 / "ref_text.txt").read_text(encoding="utf-8")
    expected = np.load(DSV3 / "tokens.npy").tolist()
    assert tok.encode(text) == expected  # add_bos_token=True in the file
    assert ref.encode(text).ids == expected
    assert tok.decode(expected, skip_special=True) == text


def test_fixture_special_ids(dscoder):
    tok, ref = dscoder
    assert tok.vocab_size == 32256
    assert tok.bos_id == ref.token_to_id("<｜begin▁of▁sentence｜>") == 32013
    assert tok.eos_id == ref.token_to_id("<｜end▁of▁sentence｜>") == 32014
    assert tok.eos_ids == {32014, ref.token_to_id("<|EOT|>")}
    assert tok.token_to_id("<|User|>") == ref.token_to_id("<|User|>")
    assert tok.token_to_id("not a token at all") is None


@settings(max_examples=150, deadline=None)
@given(TEXT)
def test_fixture_encode_matches_hf(dscoder, text):
    tok, ref = dscoder
    ids = tok.encode(text, add_bos=False)
    assert ids == ref.encode(text, add_special_tokens=False).ids
    assert tok.encode(text) == ref.encode(text).ids  # HF's post-processor puts BOS first
    assert tok.decode(ids) == text
    # HF's byte-level decoder garbles user-defined tokens ('õ', 'ö', ...: stored as text, not as bytes)
    user_defined = {i for i, t in ref.get_added_tokens_decoder().items() if not t.special}
    if not user_defined.intersection(ids):
        assert tok.decode(ids) == ref.decode(ids, skip_special_tokens=False)


def test_fixture_special_tokens_in_text(dscoder):
    tok, ref = dscoder
    text = "<｜begin▁of▁sentence｜>You are helpful.<|User|>hi there<|Assistant|>Hello!<|EOT|>"
    ids = tok.encode(text)
    assert ids == ref.encode(text, add_special_tokens=False).ids  # no second BOS
    assert ids.count(tok.bos_id) == 1
    assert tok.decode(ids) == text
    assert tok.decode(ids, skip_special=True) == "You are helpful.hi thereHello!"


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.integers(0, 32255), st.sampled_from([12394, 233, 209, 759, 167, 230, 237, 32013])),
                max_size=40), st.booleans())
def test_fixture_stream_decoder(dscoder, ids, skip_special):
    tok, _ = dscoder
    dec = StreamDecoder(tok, skip_special=skip_special)
    pieces = [dec.push(i) for i in ids]
    assert "".join(pieces) + dec.flush() == tok.decode(ids, skip_special=skip_special)


def test_fixture_stream_holds_back_split_characters(dscoder):
    tok, _ = dscoder
    ids = tok.encode("a😀b中", add_bos=False)
    assert len(ids) > 4  # the emoji's 4 bytes are spread over several tokens
    dec = StreamDecoder(tok)
    pieces = [dec.push(i) for i in ids]
    assert all("\ufffd" not in p for p in pieces)
    assert "".join(pieces) + dec.flush() == "a😀b中"


def test_bad_token_id(dscoder):
    tok, _ = dscoder
    with pytest.raises(KtxError):
        tok.decode([tok.vocab_size])


# ---------------------------------------------------------------- other byte-level pre-tokenizers

# As the models' tokenizer.json files write them (not llama.cpp's rewrites).
_ORIG_LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_ORIG_QWEN2 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_ORIG_DSV3 = (r"\p{N}{1,3}", "[一-龥぀-ゟ゠-ヿ]+",
              r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
              r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
_LETTERS_DSLLM = "".join(chr(a) if a == b else f"{chr(a)}-{chr(b)}" for a, b in [
    (0x41, 0x5A), (0x61, 0x7A), (0xB5, 0xB5), (0xC0, 0xD6), (0xD8, 0xF6), (0xF8, 0x1BA), (0x1BC, 0x1BF),
    (0x1C4, 0x293), (0x295, 0x2AF), (0x370, 0x373), (0x376, 0x377), (0x37B, 0x37D), (0x37F, 0x37F),
    (0x386, 0x386), (0x388, 0x38A), (0x38C, 0x38C), (0x38E, 0x3A1), (0x3A3, 0x3F5), (0x3F7, 0x481),
    (0x48A, 0x52F), (0x531, 0x556), (0x10A0, 0x10C5), (0x13A0, 0x13F5), (0x13F8, 0x13FD), (0x1C90, 0x1CBA),
    (0x1CBD, 0x1CBF), (0x1D00, 0x1D2B), (0x1D6B, 0x1D77), (0x1D79, 0x1D9A), (0x1E00, 0x1F15), (0x1F18, 0x1F1D),
    (0x1F20, 0x1F45), (0x1F48, 0x1F4D), (0x1F50, 0x1F57), (0x1F59, 0x1F59), (0x1F5B, 0x1F5B), (0x1F5D, 0x1F5D),
    (0x1F5F, 0x1F7D), (0x1F80, 0x1FB4), (0x1FB6, 0x1FBC), (0x1FBE, 0x1FBE), (0x1FC2, 0x1FC4), (0x1FC6, 0x1FCC),
    (0x1FD0, 0x1FD3), (0x1FD6, 0x1FDB), (0x1FE0, 0x1FEC), (0x1FF2, 0x1FF4), (0x1FF6, 0x1FFC), (0x2102, 0x2102),
    (0x2107, 0x2107), (0x210A, 0x2113), (0x2115, 0x2115), (0x2119, 0x211D), (0x2124, 0x2124), (0x2126, 0x2126),
    (0x2128, 0x2128), (0x212A, 0x212D), (0x212F, 0x2134), (0x2139, 0x2139), (0x213C, 0x213F), (0x2145, 0x2149),
    (0x214E, 0x214E), (0x2183, 0x2184), (0x2C00, 0x2C7B), (0x2C7E, 0x2CE4), (0x2CEB, 0x2CEE), (0x2CF2, 0x2CF3),
    (0xA640, 0xA66D), (0xA680, 0xA69B), (0xA722, 0xA76F), (0xA771, 0xA787), (0xA78B, 0xA78E), (0xAB70, 0xABBF),
    (0xFB00, 0xFB06), (0xFB13, 0xFB17), (0xFF21, 0xFF3A), (0xFF41, 0xFF5A), (0x10400, 0x1044F),
    (0x104B0, 0x104D3), (0x104D8, 0x104FB), (0x10C80, 0x10CB2), (0x10CC0, 0x10CF2), (0x118A0, 0x118DF),
    (0x1E900, 0x1E943)])
_ORIG_DSLLM = ("[\r\n]", f"\\s?[{_LETTERS_DSLLM}]+", "\\s?[!-/:-~！-／：-～‘-‟　-。]+", r"\s+$",
               "[一-龥ࠀ-一가-퟿]+", r"\p{N}+")


def _splits(*regexes: str) -> list:
    return [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]


_BYTES = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
REFERENCE_PRE = {  # pre name -> (reference pre-tokenizer, ignore_merges)
    "llama-bpe": (pre_tokenizers.Sequence([*_splits(_ORIG_LLAMA3), _BYTES]), True),
    "qwen2": (pre_tokenizers.Sequence([*_splits(_ORIG_QWEN2), _BYTES]), False),
    "deepseek-v3": (pre_tokenizers.Sequence([*_splits(*_ORIG_DSV3), _BYTES]), False),
    "deepseek-llm": (pre_tokenizers.Sequence([*_splits(*_ORIG_DSLLM), _BYTES]), False),
    "gpt2": (pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True), False),  # GPT-2's built-in split
}
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


# Repeated in the corpus often enough to get merges across the places where the pre-tokenizers differ.
PHRASES = ["Ελληνικά кириллица", "naïve straße", "the 中文", "x日本語", "カタカナ ok", "v2.0", "#1234567", "a1b22"]


def _corpus(n_lines: int, seed: int = 0) -> list[str]:
    rnd = random.Random(seed)
    words = ("the quick brown fox jumps over lazy dog it's we'll THEY'RE don't return def class import self "
             "Ελληνικά кириллица straße naïve 中文 日本語 한국어 ひらがな カタカナ 😀 ✓ == != -> { } ( ) [ ] ; : , .").split()
    words += PHRASES * 3
    lines = []
    for _ in range(n_lines):
        parts = [rnd.choice(words) for _ in range(rnd.randint(3, 12))]
        parts.insert(rnd.randint(0, len(parts)), str(rnd.randint(0, 10**rnd.randint(1, 7))))
        sep = rnd.choice([" ", " ", "  ", "\t", "\n", "\n    "])
        lines.append(sep.join(parts) + rnd.choice(["", ".", "!\n", "\r\n", "  "]))
    return lines


@functools.cache
def _unsplit_bpe() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A byte-level BPE trained on whole lines: its merges cross every split point, so a wrong split shows."""
    trainer_tok = tokenizers.Tokenizer(models.BPE())
    trainer_tok.pre_tokenizer = _BYTES
    trainer = trainers.BpeTrainer(vocab_size=1500, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    trainer_tok.train_from_iterator(_corpus(1500), trainer=trainer)
    model = json.loads(trainer_tok.to_str())["model"]
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ", 1)) for m in model["merges"]]
    return model["vocab"], merges


def _trained_bpe(pre_name: str) -> tuple[tokenizers.Tokenizer, dict]:
    """(reference tokenizer with the published split, the same vocabulary as GGUF-style metadata)."""
    pre, ignore_merges = REFERENCE_PRE[pre_name]
    vocab, merges = _unsplit_bpe()
    tokens = sorted(vocab, key=vocab.get)
    assert [vocab[t] for t in tokens] == list(range(len(tokens)))

    ref = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    ref.pre_tokenizer = pre
    ref.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIALS])
    md = {
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": pre_name,
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.token_type": np.array([3 if t in SPECIALS else 1 for t in tokens], dtype=np.int32),
        "tokenizer.ggml.merges": [f"{a} {b}" for a, b in merges],
        "tokenizer.ggml.bos_token_id": vocab["<|endoftext|>"],
        "tokenizer.ggml.eos_token_id": vocab["<|im_end|>"],
        "tokenizer.ggml.add_bos_token": False,
    }
    return ref, md


@pytest.fixture(scope="module", params=sorted(REFERENCE_PRE))
def trained_bpe(request):
    ref, md = _trained_bpe(request.param)
    return Tokenizer.from_metadata(md), ref


@settings(max_examples=40, deadline=None)
@given(TEXT)
def test_pre_tokenizers_match_reference(trained_bpe, text):
    tok, ref = trained_bpe
    ids = tok.encode(text)
    assert ids == ref.encode(text).ids
    assert tok.decode(ids) == text


def test_pre_tokenizers_fixed_cases(trained_bpe):
    tok, ref = trained_bpe
    for text in ["It's 2024: WE'LL see!", "x  =\t\t1234567;\n\n\n  y", "中文和日本語のカタカナ", "ǅemal Ωmega naïve",
                 "Ελληνικά кириллица straße", "the 中文 and 日本語 カタカナ", "x 中文字符 y", *PHRASES,
                 "<|im_start|>user\nhi<|im_end|>\n", "   \n", "a\r\n\r\nb"]:
        assert tok.encode(text) == ref.encode(text).ids, text
    assert tok.eos_ids == {tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")}
    assert tok.encode("hi") == ref.encode("hi").ids  # add_bos_token=False: no BOS


@pytest.mark.parametrize("pre, expected", [("llama-bpe", ["abc"]), ("qwen2", ["a", "bc"])])
def test_ignore_merges(pre, expected):
    # 'abc' is a token, but merging by rank ends at a|bc: Llama-3 takes a word that is a token whole.
    tokens = ["a", "b", "c", "ab", "bc", "abc"]
    md = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre, "tokenizer.ggml.tokens": tokens,
          "tokenizer.ggml.merges": ["b c", "a b", "ab c"]}
    tok = Tokenizer.from_metadata(md)
    assert [tokens[i] for i in tok.encode("abc")] == expected


def test_unknown_pre_falls_back_to_gpt2():
    ref, md = _trained_bpe("gpt2")
    md["tokenizer.ggml.pre"] = "some-future-model"
    with pytest.warns(UserWarning, match="some-future-model"):
        tok = Tokenizer.from_metadata(md)
    text = "It's 12345 words,  spaces\tand\nlines"
    assert tok.encode(text) == ref.encode(text).ids


def test_unsupported_model_is_a_ktx_error():
    with pytest.raises(KtxError, match="bert"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(KtxError):
        Tokenizer.from_metadata({"general.architecture": "llama"})
    with pytest.raises(KtxError, match="merges"):  # merge result 'ab' is not a token
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b"],
                                 "tokenizer.ggml.merges": ["a b"]})


# ---------------------------------------------------------------- SentencePiece ('llama' model)


def _sentencepiece_metadata(sp) -> dict:
    n = sp.get_piece_size()
    types = [2 if sp.is_unknown(i) else 3 if sp.is_control(i) else 5 if sp.is_unused(i) else 6 if sp.is_byte(i) else 1
             for i in range(n)]
    return {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": [sp.id_to_piece(i) for i in range(n)],
        "tokenizer.ggml.scores": np.array([sp.get_score(i) for i in range(n)], dtype=np.float32),
        "tokenizer.ggml.token_type": np.array(types, dtype=np.int32),
        "tokenizer.ggml.bos_token_id": sp.bos_id(),
        "tokenizer.ggml.eos_token_id": sp.eos_id(),
        "tokenizer.ggml.unknown_token_id": sp.unk_id(),
        "tokenizer.ggml.add_bos_token": True,
    }


@pytest.fixture(scope="module", params=[True, False], ids=["llama-prefix", "gemma-no-prefix"])
def spm(request, tmp_path_factory):
    import sentencepiece

    prefix = tmp_path_factory.mktemp("spm") / "m"
    sentencepiece.SentencePieceTrainer.train(
        sentence_iterator=iter(_corpus(1500, seed=1)), model_prefix=str(prefix), model_type="bpe",
        vocab_size=600, byte_fallback=True, normalization_rule_name="identity", remove_extra_whitespaces=False,
        add_dummy_prefix=request.param, split_digits=True, minloglevel=2,
    )
    sp = sentencepiece.SentencePieceProcessor(model_file=f"{prefix}.model")
    md = _sentencepiece_metadata(sp)
    md["tokenizer.ggml.add_space_prefix"] = request.param
    return Tokenizer.from_metadata(md), sp


@settings(max_examples=80, deadline=None)
@given(TEXT)
def test_sentencepiece_matches(spm, text):
    tok, sp = spm
    text = text.replace("▁", "_")  # SentencePiece writes spaces as '▁': a literal '▁' comes back as ' '.
    ids = tok.encode(text, add_bos=False)
    assert ids == sp.encode(text)
    assert tok.decode(ids) == sp.decode(ids) == text
    assert tok.encode(text) == [sp.bos_id(), *ids]


def test_sentencepiece_special_tokens_in_text(spm):
    tok, sp = spm
    # llama.cpp starts every stretch of text after a special token as a fresh one (space prefix again).
    ids = tok.encode("Hello world</s>again <s>x")
    assert ids == [sp.bos_id(), *sp.encode("Hello world"), sp.eos_id(), *sp.encode("again "), sp.bos_id(),
                   *sp.encode("x")]
    assert tok.decode(ids, skip_special=True) == "Hello worldagain x"
    assert tok.decode(ids) == "<s>Hello world</s>again <s>x"


@settings(max_examples=60, deadline=None)
@given(st.data())
def test_sentencepiece_stream_decoder(spm, data):
    tok, sp = spm
    byte_ids = [sp.piece_to_id(f"<0x{b:02X}>") for b in "é😀中".encode()]
    ids = data.draw(st.lists(st.one_of(st.integers(0, tok.vocab_size - 1), st.sampled_from(byte_ids)), max_size=40))
    dec = StreamDecoder(tok)
    assert "".join(dec.push(i) for i in ids) + dec.flush() == tok.decode(ids)
    text = data.draw(TEXT).replace("▁", "_")
    dec = StreamDecoder(tok)
    assert "".join(dec.push(i) for i in sp.encode(text)) + dec.flush() == text
