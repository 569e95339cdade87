"""Token ids -> the per-token texts HELM's `Token` carries, and text-level stop sequences.

HELM's convention (from OpenAI's API, kept by its metrics): each token's text is the piece of the output
it produced, and a token that is only part of a UTF-8 character is written `bytes:\\xe2\\x80` with its raw
bytes, so that `basic_metrics.get_num_bytes` counts bytes exactly (bits per byte) and
`convert_tokens_to_text` can rebuild the characters. A token's text is never empty for such a partial
token: HELM drops an empty first token when it strips conditioning tokens in language modelling.

Byte-level BPE tokenizers (GPT-2, OPT, Llama 3, ...) give every token's raw bytes exactly; others fall
back to incremental decoding (each token's text is what decoding it added to the text so far).
"""

from __future__ import annotations

import codecs
import itertools
import re
from dataclasses import dataclass
from functools import lru_cache

# More single-token stop variants than this per stop string are not worth checking at every decode
# step (the runtime's stop checker is a Python loop over all stop sequences); text truncation still
# catches them.
MAX_STOP_VARIANTS = 32


@dataclass(frozen=True)
class Rendered:
    """Texts of a token sequence: per token, and the whole, with each token's end offset in the whole."""

    texts: list[str]
    ends: list[int]
    """Characters of `text` complete after each token (a partial character counts with the token ending it)."""
    text: str

    def starts(self) -> list[int]:
        return [0] + self.ends[:-1]


class TokenTexts:
    """Renders token ids the way HELM's clients do; one per tokenizer (caches per-token bytes)."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.byte_level = _is_byte_level(tokenizer)
        self._bytes: dict[int, bytes] = {}
        self._whole: dict[int, str] = {}
        """Text of each byte-level token that is whole UTF-8 on its own (most are): rendered without a decoder."""
        self._stop_ids: dict[str, list[list[int]]] = {}
        if self.byte_level:
            self._byte_of = {c: b for b, c in _bytes_to_unicode().items()}
            self._added = {i: t.content for i, t in tokenizer.added_tokens_decoder.items()}

    # ---- rendering ------------------------------------------------------------------------------
    def render(self, ids: list[int]) -> Rendered:
        return self._render_bytes(ids) if self.byte_level else self._render_incremental(ids)

    def token_bytes(self, token_id: int) -> bytes:
        """Raw bytes of one token of a byte-level tokenizer (special tokens: their text)."""
        b = self._bytes.get(token_id)
        if b is None:
            if token_id in self._added:
                b = self._added[token_id].encode()
            else:
                piece = self.tokenizer.convert_ids_to_tokens(token_id)
                try:
                    b = bytes(self._byte_of[c] for c in piece)
                except (KeyError, TypeError):  # not in the byte alphabet: trust the tokenizer's decode
                    b = self.tokenizer.decode([token_id]).encode()
            self._bytes[token_id] = b
        return b

    def _vocab_bytes(self) -> list[bytes]:
        n = len(self.tokenizer)
        if len(self._bytes) < n:  # one bulk conversion instead of a call per token
            for i, piece in enumerate(self.tokenizer.convert_ids_to_tokens(list(range(n)))):
                if i not in self._bytes and i not in self._added and piece is not None:
                    if all(c in self._byte_of for c in piece):
                        self._bytes[i] = bytes(self._byte_of[c] for c in piece)
        return [self.token_bytes(i) for i in range(n)]

    def _render_bytes(self, ids: list[int]) -> Rendered:
        whole = self._whole
        texts = [whole.get(t) for t in ids]
        if None not in texts:  # every token whole: its text is its piece (the usual case, ~10x faster)
            return Rendered(texts, list(itertools.accumulate(map(len, texts))), "".join(texts))
        for t, text in zip(ids, texts):
            if text is None:
                try:
                    whole[t] = self.token_bytes(t).decode("utf-8")
                except UnicodeDecodeError:
                    pass
        if None not in (texts := [whole.get(t) for t in ids]):
            return Rendered(texts, list(itertools.accumulate(map(len, texts))), "".join(texts))
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        texts, ends, parts, n = [], [], [], 0
        for t in ids:
            b = self.token_bytes(t)
            try:
                texts.append(b.decode("utf-8"))
            except UnicodeDecodeError:
                texts.append("bytes:" + "".join(f"\\x{x:02x}" for x in b))
            piece = decoder.decode(b)
            parts.append(piece)
            n += len(piece)
            ends.append(n)
        tail = decoder.decode(b"", final=True)  # bytes of an unfinished last character
        if tail:
            parts.append(tail)
            ends[-1] += len(tail)
        return Rendered(texts, ends, "".join(parts))

    def _render_incremental(self, ids: list[int]) -> Rendered:
        """Text each token adds, decoding a short window (vLLM's prefix/read offsets) so the cost is linear."""
        texts, ends, parts = [], [], []
        prefix, read, n = 0, 0, 0
        for i in range(len(ids)):
            before = self._decode(ids[prefix:read])
            now = self._decode(ids[prefix:i + 1])
            last = i == len(ids) - 1
            if len(now) > len(before) and (not now.endswith("\ufffd") or last):
                piece = now[len(before):]
                prefix, read = read, i + 1
            else:
                piece = ""  # an unfinished character: the token that completes it carries it
            texts.append(self._fallback_text(ids[i], piece))
            parts.append(piece)
            n += len(piece)
            ends.append(n)
        return Rendered(texts, ends, "".join(parts))

    def _fallback_text(self, token_id: int, piece: str) -> str:
        """SentencePiece byte-fallback tokens (`<0xE2>`) in HELM's bytes form; else the added text, or the
        token's own decoding when it added nothing yet (never empty, see the module docstring)."""
        name = self.tokenizer.convert_ids_to_tokens(token_id)
        m = re.fullmatch(r"<0x([0-9A-Fa-f]{2})>", name) if isinstance(name, str) else None
        if m:
            return f"bytes:\\x{m.group(1).lower()}"
        return piece or self._decode([token_id]) or name

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    # ---- stop sequences -------------------------------------------------------------------------
    def stop_token_sequences(self, stops: tuple[str, ...]) -> list[list[int]]:
        """Token sequences that end generation early for text stops: each stop's own encoding, plus every
        single token whose text starts with the stop (e.g. "\\n\\n" for "\\n"), since a model rarely emits a
        stop the way the tokenizer encodes it in isolation. Dropping such a token loses nothing: the text is
        cut at the stop anyway."""
        out: list[list[int]] = []
        for stop in stops:
            if stop not in self._stop_ids:
                self._stop_ids[stop] = self._variants(stop)
            out.extend(s for s in self._stop_ids[stop] if s not in out)
        return out

    def _variants(self, stop: str) -> list[list[int]]:
        if not stop:
            return []
        seqs = [self.tokenizer(stop, add_special_tokens=False)["input_ids"]]
        if self.byte_level:
            target = stop.encode()
            singles = [i for i, b in enumerate(self._vocab_bytes()) if b.startswith(target)]
        else:
            singles = [i for i in range(len(self.tokenizer)) if self._decode([i]).startswith(stop)]
        if len(singles) <= MAX_STOP_VARIANTS:
            seqs.extend([i] for i in singles if [i] != seqs[0])
        return seqs


def cut_at_stops(rendered: Rendered, stops: tuple[str, ...] | list[str], start: int = 0) -> tuple[int, int] | None:
    """Where the first stop occurs in `rendered.text` at or after character `start`: (tokens to keep, cut char).

    Kept are the tokens that contribute a character before the cut; the last of them may extend past it.
    """
    found = [i for i in (rendered.text.find(s, start) for s in stops if s) if i >= 0]
    if not found:
        return None
    cut = min(found)
    keep = sum(1 for s in rendered.starts() if s < cut)
    return keep, cut


def truncate(rendered: Rendered, keep: int, cut: int) -> Rendered:
    """`rendered` cut to its first `keep` tokens and `cut` characters (a straddling token's text is cut too)."""
    texts, ends = rendered.texts[:keep], [min(e, cut) for e in rendered.ends[:keep]]
    if keep and ends[-1] < rendered.ends[keep - 1]:
        start, end = rendered.starts()[keep - 1], rendered.ends[keep - 1]
        if texts[-1] == rendered.text[start:end]:  # a whole-character token: cut its text at the stop too
            texts[-1] = rendered.text[start:cut]
    return Rendered(texts, ends, rendered.text[:cut])


def _is_byte_level(tokenizer) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    decoder = getattr(backend, "decoder", None)
    return decoder is not None and re.match(r"ByteLevel\b", str(decoder)) is not None


@lru_cache(maxsize=1)
def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible map from bytes to printable characters (the alphabet of byte-level BPE tokens)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))
