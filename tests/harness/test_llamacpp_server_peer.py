"""W6's second peer, llama.cpp's prebuilt wheel driven as llama-server (harness/bench/llamacpp_server_peer.py), where
`xllamacpp` and the SmolLM2 GGUF are installed (the test and bench extras): one request of more prompts than slots
gives each prompt the tokens it gets alone, in the prompts' order, and `eos` cuts a continuation before its first
EOS id."""

from __future__ import annotations

import pytest

pytest.importorskip("xllamacpp")


def test_prompts_spread_over_slots_keep_their_greedy_tokens_and_order(smollm2_gguf):
    from harness.bench.llamacpp_peer import PeerSettings
    from harness.bench.llamacpp_server_peer import ServerPeer

    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 339, 1500], list(range(200, 260)), [1, 19, 20, 21, 22], [1, 7000]]
    with ServerPeer(smollm2_gguf, PeerSettings(1, 2), 80) as alone:
        expected = [alone.generate([p], 6)[0] for p in prompts]
    assert all(len(e) == 6 for e in expected)
    assert len({tuple(e) for e in expected}) == len(prompts)  # distinct continuations: the order is checked
    eos = frozenset({expected[2][3]})  # a token that prompt 2 emits fourth: its ids end before it
    with ServerPeer(smollm2_gguf, PeerSettings(2, 2), 80) as peer:
        assert peer.generate(prompts, 6) == expected  # 5 prompts through 2 slots, one request
        ended = peer.generate(prompts, 6, eos)
    assert ended[2] == expected[2][:3]
