"""Tokenizer built from GGUF metadata (llama.cpp conventions), encoding through HF `tokenizers`.

A GGUF file carries its vocabulary as parallel arrays, one entry per token id:

    tokenizer.ggml.tokens      [n_vocab] str    the piece text
    tokenizer.ggml.token_type  [n_vocab] int    1 normal, 2 unknown, 3 control, 4 user-defined, 5 unused, 6 byte
    tokenizer.ggml.scores      [n_vocab] f32    SentencePiece only: merge priority of the piece
    tokenizer.ggml.merges      [n_merges] str   byte-level BPE only: "left right", rank = position

Two model families, as `tokenizer.ggml.model` names them:

- 'gpt2': byte-level BPE (DeepSeek-V3/R1, Qwen, Llama-3). The text is first split by a list of regexes
  (`tokenizer.ggml.pre` picks the list, the ones llama.cpp uses); each regex is applied in turn to every
  piece, keeping both its matches and the gaps between them. Each piece's UTF-8 bytes are mapped to
  GPT-2's 256-character alphabet, then merged by rank. Pieces store that alphabet ('Ġ' is a space).
- 'llama': SentencePiece BPE (Llama-2, Mistral, Gemma-3). Spaces become '▁' and, with
  `add_space_prefix`, a '▁' goes in front of every stretch of text (at the start and after each special
  token, as llama.cpp does). Symbols start as characters; the adjacent pair whose concatenation is the
  highest-scoring piece merges first. `tokenizers` knows only ranked merges, so every split of a piece
  into two pieces becomes a merge, ranked by the piece's score: the same choice at every step.
  Characters outside the vocabulary fall back to byte pieces '<0xAB>'.

In both, control, user-defined and unknown tokens are matched in the raw text first (longest first) and
become their own ids, as llama.cpp's parse_special does.

Decoding is done here, token by token, as bytes: a normal piece maps back through the byte alphabet (gpt2)
or '▁' -> ' ' (llama), a byte piece is its byte, control/user-defined tokens are their text, unused
tokens are nothing. The bytes are joined and read as UTF-8 with U+FFFD for broken sequences, so a
multi-byte character split over tokens comes out whole. With `add_space_prefix`, the one space that
encoding put in front of a stretch of text is dropped again, so decode(encode(s)) == s.
"""

from __future__ import annotations

import codecs
import re
import warnings
from collections.abc import Iterable, Mapping
from typing import Any

import tokenizers
from tokenizers import AddedToken, Regex, models, normalizers, pre_tokenizers

from ktx.errors import KtxError

NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
_ADDED_TYPES = (UNKNOWN, CONTROL, USER_DEFINED)  # matched in raw text before the model sees it

# Turn-ending tokens that chat models emit instead of (or besides) the metadata's EOS.
_END_TEXTS = (
    "<|im_end|>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>", "<end_of_turn>",
    "<｜end▁of▁sentence｜>", "<|EOT|>", "<EOT>",
)
# A GGUF name or finetune tag of an instruction-tuned model: "gemma-3-270m-it", "Qwen2.5 0.5B Instruct", "chat".
_TUNED_RE = re.compile(r"(?i)(?:^|[^a-z])(?:it|instruct|chat)(?:[^a-z]|$)")

# ---- pre-tokenizer regex lists (the splits llama.cpp applies for each `tokenizer.ggml.pre`) ----

# English contractions, spelled case-insensitively by hand because llama.cpp's regex engine has no (?i:).
_CONTRACTION = r"'(?:[sStTmMdD]|[rR][eE]|[vV][eE]|[lL][lL])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"


def _tiktoken_style(numbers: str) -> str:
    """The Llama-3 / Qwen2 split: contractions, words with one leading non-letter, numbers, punctuation runs."""
    return (
        rf"{_CONTRACTION}|[^\r\n\p{{L}}\p{{N}}]?\p{{L}}+|{numbers}"
        r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
    )


# DeepSeek-LLM's own list of cased letters (Latin, Greek, Cyrillic, Armenian, Georgian, ...), as code points.
_DEEPSEEK_LLM_LETTERS = (
    "A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1\u03a3-\u03f5"
    "\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd\u1c90-\u1cba"
    "\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d\u1f20-\u1f45"
    "\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4\u1fb6-\u1fbc\u1fbe"
    "\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec\u1ff2-\u1ff4\u1ff6-\u1ffc"
    "\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128\u212a-\u212d\u212f-\u2134\u2139"
    "\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3"
    "\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06"
    "\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a\U00010400-\U0001044f\U000104b0-\U000104d3"
    "\U000104d8-\U000104fb\U00010c80-\U00010cb2\U00010cc0-\U00010cf2\U000118a0-\U000118df"
    "\U0001e900-\U0001e943"
)
_CJK_HANGUL = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"  # CJK ideographs, U+0800..U+4E00, Hangul

# name -> (regexes applied in order, ignore_merges: a piece that is itself a token is taken whole)
_PRE_SPLITS: dict[str, tuple[tuple[str, ...], bool]] = {
    "gpt2": ((_GPT2,), False),
    "default": (
        (r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"),
        False,
    ),
    "llama-bpe": ((_tiktoken_style(r"\p{N}{1,3}"),), True),
    "qwen2": ((_tiktoken_style(r"\p{N}"),), False),
    "deepseek-coder": (("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_HANGUL, r"\p{N}"), False),
    "deepseek-llm": (
        (
            "[\r\n]",
            rf"\s?[{_DEEPSEEK_LLM_LETTERS}]+",
            "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
            r"\s+$",
            _CJK_HANGUL,
            r"\p{N}+",
        ),
        False,
    ),
    "deepseek-v3": (
        (
            r"\p{N}{1,3}",
            "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",  # CJK ideographs, hiragana, katakana
            r"[!-/:-@\[-`{-~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+| ?[\p{P}\p{S}]+[\r\n]*"
            r"|\s*[\r\n]+|\s+(?!\S)|\s+",
        ),
        False,
    ),
}
_PRE_ALIASES = {
    "gpt-2": "gpt2", "llama3": "llama-bpe", "llama-v3": "llama-bpe", "smaug-bpe": "llama-bpe",
    "dbrx": "llama-bpe", "deepseek-r1-qwen": "qwen2", "stablelm2": "qwen2",
}


def _gpt2_byte_chars() -> list[str]:
    """GPT-2's byte alphabet: printable Latin-1 bytes stand for themselves, the other 68 for U+0100.. in order."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, n_extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(0x100 + n_extra))
            n_extra += 1
    return chars


_BYTE_OF_CHAR = {c: b for b, c in enumerate(_gpt2_byte_chars())}


def _first_ids(tokens: list[str]) -> dict[str, int]:
    """piece -> id; a repeated piece keeps its first id (llama.cpp would refuse the file)."""
    vocab: dict[str, int] = {}
    for i, t in enumerate(tokens):
        vocab.setdefault(t, i)
    return vocab


def _split_merge(merge: str) -> tuple[str, str]:
    """'left right' -> (left, right); the separator is the first space after the first character."""
    i = merge.find(" ", 1)
    return (merge[:i], merge[i + 1:]) if i > 0 else (merge, "")


def _bpe_model(md: Mapping[str, Any], vocab: dict[str, int], path: str) -> tokenizers.Tokenizer:
    merges_raw = md.get("tokenizer.ggml.merges")
    if merges_raw is None:
        raise KtxError(f"{path}: tokenizer.ggml.model is 'gpt2' but tokenizer.ggml.merges is missing; "
                       "re-convert the model")
    pre = md.get("tokenizer.ggml.pre") or "default"
    name = _PRE_ALIASES.get(pre, pre)
    if name not in _PRE_SPLITS:
        warnings.warn(f"{path}: unknown tokenizer.ggml.pre {pre!r}; splitting text the GPT-2 way, tokens may differ")
        name = "gpt2"
    regexes, ignore_merges = _PRE_SPLITS[name]
    merges = [_split_merge(m) for m in merges_raw]
    # tokenizers panics on a merge outside the vocabulary; say which one instead.
    bad = next((m for m in merges if m[0] not in vocab or m[1] not in vocab or m[0] + m[1] not in vocab), None)
    if bad is not None:
        raise KtxError(f"{path}: merge {' '.join(bad)!r} in tokenizer.ggml.merges names pieces missing from "
                       "tokenizer.ggml.tokens; the file is damaged, re-convert it")
    hf = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges))
    hf.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Split(Regex(r), behavior="isolated") for r in regexes]
        + [pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
    )
    return hf


def _spm_merges(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """Every (left, right) split of a normal piece into two normal pieces, best-scoring piece first."""
    normal = {t: i for i, t in enumerate(tokens) if types[i] == NORMAL}
    ranked = []
    for piece, i in normal.items():
        for k in range(1, len(piece)):
            left, right = piece[:k], piece[k:]
            if left in normal and right in normal:
                ranked.append((-scores[i], i, normal[left], left, right))
    ranked.sort()
    return [(left, right) for _, _, _, left, right in ranked]


def _spm_model(tokens: list[str], vocab: dict[str, int], types: list[int], scores: list[float],
               unk_id: int | None, add_space_prefix: bool) -> tokenizers.Tokenizer:
    unk = tokens[unk_id] if unk_id is not None else None
    has_bytes = any(t == BYTE for t in types)
    model = models.BPE(vocab=vocab, merges=_spm_merges(tokens, types, scores), unk_token=unk,
                       fuse_unk=True, byte_fallback=has_bytes)
    hf = tokenizers.Tokenizer(model)
    # The normalizer runs on each stretch of text between added tokens, so the prefix lands after each one.
    steps = [normalizers.Prepend("▁")] if add_space_prefix else []
    hf.normalizer = normalizers.Sequence(steps + [normalizers.Replace(" ", "▁")])
    return hf


def _opt_id(md: Mapping[str, Any], key: str, n_vocab: int) -> int | None:
    v = md.get(f"tokenizer.ggml.{key}")
    return int(v) if v is not None and 0 <= int(v) < n_vocab else None


class Tokenizer:
    """Text <-> token ids for one GGUF vocabulary. Build with `Tokenizer.from_metadata(md)`."""

    def __init__(self, hf: tokenizers.Tokenizer, tokens: list[str], vocab: dict[str, int], types: list[int], *,
                 byte_level: bool, bos_id: int | None, eos_id: int | None, eos_ids: set[int], add_bos: bool,
                 add_space_prefix: bool, chat_template: str | None, tuned_name: bool = False, arch: str = ""):
        self._hf = hf
        self._tokens = tokens
        self._types = types
        self._byte_level = byte_level
        self._ids = vocab
        self._piece_cache: dict[int, bytes] = {}
        self.bos_id = bos_id
        self.eos_id = eos_id
        self.eos_ids = eos_ids
        self.add_bos = add_bos
        self.add_space_prefix = add_space_prefix
        self.chat_template = chat_template
        self.tuned_name = tuned_name  # the file's name says instruction-tuned ("-it", "Instruct", "Chat")
        self.arch = arch  # general.architecture

    @classmethod
    def from_metadata(cls, md: Mapping[str, Any], path: str = "GGUF") -> Tokenizer:
        """Build from GGUF key/values (strings as str, arrays as lists or numpy arrays)."""
        kind = md.get("tokenizer.ggml.model")
        tokens = md.get("tokenizer.ggml.tokens")
        if kind is None or tokens is None:
            raise KtxError(f"{path}: no tokenizer in the metadata (tokenizer.ggml.model / .tokens missing); "
                           "use a GGUF converted with its vocabulary")
        tokens = [str(t) for t in tokens]
        n, vocab = len(tokens), _first_ids(tokens)
        raw_types = md.get("tokenizer.ggml.token_type")
        types = [int(t) for t in raw_types] if raw_types is not None else [NORMAL] * n
        unk_id = _opt_id(md, "unknown_token_id", n)
        if kind == "gpt2":
            hf = _bpe_model(md, vocab, path)
            add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", False))
            add_bos_default = False
        elif kind == "llama":
            raw_scores = md.get("tokenizer.ggml.scores")
            scores = [float(s) for s in raw_scores] if raw_scores is not None else [0.0] * n
            if unk_id is None and UNKNOWN in types:
                unk_id = types.index(UNKNOWN)
            add_space_prefix = bool(md.get("tokenizer.ggml.add_space_prefix", True))
            hf = _spm_model(tokens, vocab, types, scores, unk_id, add_space_prefix)
            add_bos_default = True
        else:
            raise KtxError(f"{path}: tokenizer.ggml.model {kind!r} is not supported (ktx reads 'gpt2' and 'llama')")
        hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                               for i in range(n) if types[i] in (CONTROL, UNKNOWN)])
        hf.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                       for i in range(n) if types[i] == USER_DEFINED])

        bos_id, eos_id = _opt_id(md, "bos_token_id", n), _opt_id(md, "eos_token_id", n)
        eos_ids = {i for i in (eos_id, _opt_id(md, "eot_token_id", n), _opt_id(md, "eom_token_id", n))
                   if i is not None}
        eos_ids |= {vocab[t] for t in _END_TEXTS if t in vocab and types[vocab[t]] in (CONTROL, USER_DEFINED)}
        return cls(hf, tokens, vocab, types, byte_level=kind == "gpt2", bos_id=bos_id, eos_id=eos_id, eos_ids=eos_ids,
                   add_bos=bool(md.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos_id is not None,
                   add_space_prefix=add_space_prefix, chat_template=md.get("tokenizer.chat_template"),
                   tuned_name=any(_TUNED_RE.search(str(md.get(k, ""))) for k in ("general.finetune", "general.name")),
                   arch=str(md.get("general.architecture", "")))

    @property
    def vocab_size(self) -> int:
        return len(self._tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._ids.get(token)

    def id_to_token(self, token_id: int) -> str:
        return self._tokens[token_id]

    def encode(self, text: str, add_bos: bool | None = None) -> list[int]:
        """Token ids of `text`; special-token text in it becomes those tokens.

        add_bos=None follows tokenizer.ggml.add_bos_token. No second BOS is added when the text already
        starts with one (a chat template usually writes it). add_eos_token is not applied: prompts are
        encoded for generation, where a trailing EOS would end the turn.
        """
        ids = self._hf.encode(text, add_special_tokens=False).ids
        if add_bos is None:
            add_bos = self.add_bos
        if add_bos and self.bos_id is not None and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Iterable[int], skip_special: bool = False) -> str:
        strip, out = self.add_space_prefix, bytearray()
        for tid in ids:
            piece, strip = self._token_bytes(int(tid), skip_special, strip)
            out += piece
        return out.decode("utf-8", errors="replace")

    @property
    def chat_format(self) -> str:
        """How chat() renders a conversation: 'file' (the GGUF's own template), 'gemma' or 'deepseek' (the
        built-in turn formats, for files without one: Gemma's for an instruction-tuned Gemma, DeepSeek-V3's for
        a DeepSeek vocabulary or architecture) or 'transcript' (any other model, taken for a pretrained base
        model: a plain Question/Answer exchange); see ktx.chat_template."""
        if self.chat_template:
            return "file"
        if "<start_of_turn>" in self._ids and self.tuned_name:
            return "gemma"
        if "<｜User｜>" in self._ids or self.arch == "deepseek2":
            return "deepseek"
        return "transcript"

    @property
    def chat_stop(self) -> tuple[str, ...]:
        """Stop strings that end a chat reply besides the EOS tokens (the transcript's next question)."""
        from ktx.chat_template import TRANSCRIPT_STOP

        return TRANSCRIPT_STOP if self.chat_format == "transcript" else ()

    def apply_chat_template(self, messages: list[dict], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """Render a conversation in `chat_format`: the GGUF's chat template, or a built-in one."""
        from ktx.chat_template import DEEPSEEK_V3_TEMPLATE, GEMMA_TEMPLATE, TRANSCRIPT_TEMPLATE, render

        special = {"bos_token": self._text_of(self.bos_id), "eos_token": self._text_of(self.eos_id)}
        template = {"file": self.chat_template, "gemma": GEMMA_TEMPLATE, "deepseek": DEEPSEEK_V3_TEMPLATE,
                    "transcript": TRANSCRIPT_TEMPLATE}[self.chat_format]
        return render(template, messages, add_generation_prompt=add_generation_prompt, **{**special, **kwargs})

    def _text_of(self, token_id: int | None) -> str:
        return "" if token_id is None else self._tokens[token_id]

    def _token_bytes(self, tid: int, skip_special: bool, strip: bool) -> tuple[bytes, bool]:
        """One token's bytes, and whether the next token's leading space is encoding's prefix to drop."""
        if not 0 <= tid < len(self._tokens):
            raise KtxError(f"token id {tid} is outside the vocabulary (0..{len(self._tokens) - 1})")
        kind = self._types[tid]
        if kind in _ADDED_TYPES:
            hidden = skip_special and kind != USER_DEFINED
            return (b"" if hidden else self._tokens[tid].encode()), self.add_space_prefix
        piece = self._piece_cache.get(tid)
        if piece is None:
            piece = self._piece_cache[tid] = self._piece(tid)
        if strip and piece[:1] == b" ":
            piece = piece[1:]
        return piece, False

    def _piece(self, tid: int) -> bytes:
        text, kind = self._tokens[tid], self._types[tid]
        if kind == UNUSED:
            return b""
        if kind == BYTE:  # '<0xAB>'
            return bytes([int(text[3:5], 16)])
        if self._byte_level:
            if all(c in _BYTE_OF_CHAR for c in text):
                return bytes(_BYTE_OF_CHAR[c] for c in text)
            return text.encode()  # not a byte-alphabet piece: take it as plain text
        return text.replace("▁", " ").encode()


class StreamDecoder:
    """Incremental text for streaming: `push(id)` returns what can be shown now, `flush()` the rest.

    Bytes of a character split over several tokens (byte-level BPE pieces, '<0xAB>' fallback pieces) are
    held back until the character is complete; the concatenated pushes equal `tok.decode(ids)`.
    """

    def __init__(self, tok: Tokenizer, skip_special: bool = False):
        self._tok = tok
        self._skip_special = skip_special
        self._strip = tok.add_space_prefix
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors="replace")

    def push(self, token_id: int) -> str:
        piece, self._strip = self._tok._token_bytes(int(token_id), self._skip_special, self._strip)
        return self._utf8.decode(piece)

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)
