"""Per-token texts follow HELM's conventions and add up to the decoded text; stops cut text and tokens together."""

from __future__ import annotations

import pytest

pytest.importorskip("helm")

from helm.benchmark.metrics.basic_metrics import convert_tokens_to_text, get_num_bytes  # noqa: E402
from helm.common.request import Token  # noqa: E402

from harness.helm.token_text import TokenTexts, cut_at_stops, truncate  # noqa: E402

TEXT = "café ’ \n\n the fox.\nsea"  # two- and three-byte characters split over byte tokens


@pytest.fixture(scope="module")
def tokenizer(tokenizer_dir):
    from runtime.checkpoint import load_tokenizer

    return load_tokenizer(tokenizer_dir)


@pytest.mark.parametrize("byte_level", [True, False])
def test_token_texts_rebuild_the_text_and_count_bytes(tokenizer, byte_level):
    texts = TokenTexts(tokenizer)
    assert texts.byte_level  # the test tokenizer is byte-level BPE; False exercises the generic fallback
    texts.byte_level = byte_level
    ids = tokenizer(TEXT, add_special_tokens=False)["input_ids"]
    r = texts.render(ids)
    assert r.text == TEXT == tokenizer.decode(ids)
    assert len(r.texts) == len(r.ends) == len(ids) and r.ends[-1] == len(TEXT)
    assert all(t for t in r.texts)  # HELM drops an empty first token in language modelling
    if byte_level:
        tokens = [Token(t, 0.0) for t in r.texts]
        assert any(t.startswith("bytes:") for t in r.texts)
        assert "".join(g["text"] for g in convert_tokens_to_text(tokens)) == TEXT
        assert get_num_bytes(tokens) == len(TEXT.encode())


def test_cut_at_first_stop_keeps_tokens_before_it(tokenizer):
    texts = TokenTexts(tokenizer)
    r = texts.render(tokenizer(TEXT, add_special_tokens=False)["input_ids"])
    keep, cut = cut_at_stops(r, ["fox", "\n"])
    assert cut == TEXT.index("\n")
    t = truncate(r, keep, cut)
    assert t.text == TEXT[:cut] and len(t.texts) == keep and t.ends[-1] == cut
    assert cut_at_stops(r, ["\n"], start=cut + 2)[1] == TEXT.index("\n", cut + 2)
    assert cut_at_stops(r, ["zebra"]) is None


def test_cut_inside_a_token_cuts_its_text(tokenizer):
    texts = TokenTexts(tokenizer)
    r = texts.render(tokenizer("the sea", add_special_tokens=False)["input_ids"])
    keep, cut = cut_at_stops(r, ["e s"])  # tokens "t", "he", " sea": the stop starts inside "he"
    t = truncate(r, keep, cut)
    assert t.text == "th" and "".join(t.texts) == "th"


def test_stop_token_sequences_include_tokens_starting_with_the_stop(tokenizer):
    texts = TokenTexts(tokenizer)
    seqs = texts.stop_token_sequences(("\n",))
    assert seqs[0] == tokenizer("\n", add_special_tokens=False)["input_ids"]
    assert all(texts.token_bytes(s[0]).startswith(b"\n") for s in seqs[1:] if len(s) == 1)
    multi = texts.stop_token_sequences(("sea", "\n"))
    assert seqs[0] in multi and tokenizer("sea", add_special_tokens=False)["input_ids"] in multi
