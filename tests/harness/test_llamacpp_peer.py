"""W6's llama.cpp peer (harness/bench/llamacpp_peer.py) where a llama.cpp build and the SmolLM2 GGUF are installed
(the bench extra; skipped elsewhere): continuous batching over fewer slots than prompts gives each prompt the
tokens it gets alone, ends at EOS without it, and frees its slot for the next prompt."""

from __future__ import annotations

import pytest

pytest.importorskip("llama_cpp")


def test_slots_are_reused_and_batching_does_not_change_greedy_tokens(smollm2_gguf):
    from harness.bench.llamacpp_peer import LlamaCppPeer, PeerSettings

    prompts = [[1, 504, 3458, 282, 4649, 314], [1, 339, 1500], list(range(200, 260)), [1, 19, 20, 21, 22], [1, 7000]]
    # extra weight buffers off: llama.cpp's AMX kernels crash on some machines (llama.cpp issue 20824)
    with LlamaCppPeer(smollm2_gguf, PeerSettings(1, 2, extra_buffers=False), 80) as alone:
        expected = [alone.generate([p], 6)[0] for p in prompts]
        assert all(len(e) == 6 for e in expected)
        eos = frozenset({expected[2][3]})  # a token that prompt 2 emits fourth: it ends there, without it
    with LlamaCppPeer(smollm2_gguf, PeerSettings(2, 2, extra_buffers=False), 80) as peer:
        assert peer.generate(prompts, 6) == expected  # 5 prompts through 2 slots
        ended = peer.generate(prompts, 6, eos)
    assert ended[2] == expected[2][:3]
