"""llama.cpp's prebuilt CPU wheel (PyPI `xllamacpp`) as W6's second peer: llama-server, run in process and driven
over its own HTTP API as its users drive it.

This is what a user gets without compiling anything: `pip install xllamacpp` brings a build for a generic x86-64
CPU with AVX2 (no AVX-512, no AMX; `get_system_info()` says which). `llamacpp_peer` drives a build compiled for the
machine instead (llama-cpp-python with -march=native), through llama.cpp's C API; this one leaves the batching to
the server, as a llama-server user would: one `/completion` request carries every prompt (as token ids, the
harness's tokenization), and the server spreads them over its `n_parallel` slots with continuous batching, a
finished sequence's slot taking the next prompt. Greedy: the server's top-1 sampler (argmax of each row's logits).
No prompt cache (`cache_prompt: false`), as in `llamacpp_peer`, where every call starts from an empty cache: the
timed call must not reuse the warm-up's KV cells.
"""

from __future__ import annotations

import json
import os
import urllib.request
from collections.abc import Sequence

from harness.bench.llamacpp_peer import PeerSettings


def version() -> str:
    from importlib.metadata import version

    return f"xllamacpp {version('xllamacpp')} (prebuilt wheel)"


def system_info() -> str:
    import xllamacpp

    return xllamacpp.get_system_info().strip()


class ServerPeer:
    """A llama-server of `settings.n_seq` slots of `seq_len` positions each, on a loaded GGUF model."""

    def __init__(self, gguf: str | os.PathLike, settings: PeerSettings, seq_len: int) -> None:
        import xllamacpp

        p = xllamacpp.CommonParams()
        p.model.path = os.fspath(gguf)
        p.n_gpu_layers = 0
        p.n_parallel = settings.n_seq
        p.n_ctx = -(-seq_len // 256) * 256 * settings.n_seq  # each slot gets n_ctx / n_parallel positions
        p.n_batch, p.n_ubatch = settings.n_batch, settings.n_ubatch
        p.cpuparams.n_threads = p.cpuparams_batch.n_threads = settings.n_threads
        p.kv_unified = settings.kv_unified
        p.flash_attn_type = 1 if settings.flash_attn else 0
        p.no_extra_bufts = not settings.extra_buffers
        p.cont_batching = True
        p.verbosity = -1  # the server logs every request and slot at length
        try:
            self.server = xllamacpp.Server(p)
        except (RuntimeError, ValueError) as e:
            raise RuntimeError(f"llama-server could not load {gguf}: {e}") from e
        self.url = self.server.listening_address + "/completion"

    def close(self) -> None:
        del self.server  # stops the server's loop and frees the model

    def __enter__(self) -> ServerPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 eos: frozenset[int] = frozenset()) -> list[list[int]]:
        """Greedy continuations of every prompt (each up to `max_new_tokens`). With `eos`, each ends at the server's
        end-of-generation tokens (the GGUF's EOS among them), and the ids are cut before the first of `eos`; without,
        every continuation runs its `max_new_tokens` (`ignore_eos`)."""
        body = {"prompt": [list(p) for p in prompts], "n_predict": max_new_tokens, "samplers": ["top_k"],
                "top_k": 1, "temperature": 0.0, "ignore_eos": not eos, "cache_prompt": False, "return_tokens": True}
        request = urllib.request.Request(self.url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(request) as response:
            results = json.loads(response.read())
        if isinstance(results, dict):  # one prompt: one result, not a list
            results = [results]
        out: list[list[int]] = [[] for _ in prompts]
        for r in results:
            ids = r["tokens"]
            cut = next((k for k, t in enumerate(ids) if t in eos), len(ids))
            out[r["index"]] = ids[:cut]
        return out
