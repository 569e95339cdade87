"""llama.cpp as W6's peer: greedy generation of many sequences at once through llama-cpp-python's C API.

It runs the GGUF file itself with its own kernels (on this CPU the build's AMX / AVX-512 VNNI int8 dot products
of Q4_1 weights against 8-bit activations), as a user running llama.cpp for batched offline work would: `n_seq`
parallel slots with continuous batching, like llama-server's `--parallel`: a finished sequence frees its slot and
KV cells, the next prompt takes them in the same decode call, and each `llama_decode` call carries the new
prompts' tokens (logits only at their last position) together with one token of every sequence generating.

Prompts come as token ids (the harness's own tokenization of the same vocabulary), so both engines see the same
inputs; the choice is the argmax of each row's fp32 logits, as the harness's greedy sampler does.
"""

from __future__ import annotations

import ctypes
import os
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PeerSettings:
    """One llama.cpp configuration of the sweep."""

    n_seq: int
    """Parallel sequences (slots), llama-server's `--parallel`."""
    n_threads: int
    n_batch: int = 2048
    """Most tokens one `llama_decode` call takes (llama.cpp's logical batch); prompts are split to fit."""
    n_ubatch: int = 512
    """Tokens the graph computes at once (physical batch)."""
    kv_unified: bool = False
    """One KV buffer for all sequences; llama.cpp advises off for sequences that share no prefix."""
    flash_attn: bool = True
    extra_buffers: bool = True
    """llama.cpp's extra weight buffer types: the AMX and CPU repacked layouts (`--no-repack` turns them off)."""

    def label(self) -> str:
        return (f"--parallel {self.n_seq} -t {self.n_threads} -b {self.n_batch} -ub {self.n_ubatch} "
                f"--kv-unified {'on' if self.kv_unified else 'off'} -fa {'on' if self.flash_attn else 'off'}"
                + ("" if self.extra_buffers else " --no-repack"))


def version() -> str:
    import llama_cpp

    return f"llama-cpp-python {llama_cpp.__version__}"


def system_info() -> str:
    import llama_cpp

    return llama_cpp.llama_print_system_info().decode().strip()


class LlamaCppPeer:
    """A loaded GGUF model and one context of `settings.n_seq` slots of `seq_len` positions each."""

    def __init__(self, gguf: str | os.PathLike, settings: PeerSettings, seq_len: int) -> None:
        import llama_cpp as lc

        self.lc, self.settings = lc, settings
        lc.llama_backend_init()
        lc.llama_log_set(_QUIET, ctypes.c_void_p(0))
        mparams = lc.llama_model_default_params()
        mparams.n_gpu_layers = 0
        mparams.use_extra_bufts = settings.extra_buffers
        self.model = lc.llama_model_load_from_file(os.fsencode(gguf), mparams)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {gguf}")
        cparams = lc.llama_context_default_params()
        per_seq = -(-seq_len // 256) * 256
        cparams.n_ctx = per_seq * settings.n_seq
        cparams.n_batch, cparams.n_ubatch = settings.n_batch, settings.n_ubatch
        cparams.n_seq_max = settings.n_seq
        cparams.n_threads = cparams.n_threads_batch = settings.n_threads
        cparams.kv_unified = settings.kv_unified
        cparams.flash_attn_type = 1 if settings.flash_attn else 0
        cparams.no_perf = True
        self.ctx = lc.llama_init_from_model(self.model, cparams)
        if not self.ctx:
            lc.llama_model_free(self.model)
            raise RuntimeError(f"llama.cpp could not create a context of {cparams.n_ctx} positions")
        self.memory = lc.llama_get_memory(self.ctx)
        self.n_vocab = lc.llama_vocab_n_tokens(lc.llama_model_get_vocab(self.model))
        self.batch = lc.llama_batch_init(settings.n_batch, 0, 1)

    def close(self) -> None:
        lc = self.lc
        lc.llama_batch_free(self.batch)
        lc.llama_free(self.ctx)
        lc.llama_model_free(self.model)

    def __enter__(self) -> LlamaCppPeer:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int,
                 eos: frozenset[int] = frozenset()) -> list[list[int]]:
        """Greedy continuations of every prompt (each up to `max_new_tokens`, ending early at an `eos` id, which is
        left out)."""
        lc, n_batch = self.lc, self.settings.n_batch
        lc.llama_memory_clear(self.memory, True)
        waiting = deque(range(len(prompts)))
        free = list(range(self.settings.n_seq))[::-1]
        out: list[list[int]] = [[] for _ in prompts]
        # slot -> [prompt index, next position, tokens still to feed]
        active: dict[int, list] = {}
        while waiting or active:
            while waiting and free:
                i = waiting.popleft()
                active[free.pop()] = [i, 0, list(prompts[i])]
            entries = []  # (slot, token, position, wants logits)
            room = n_batch
            for slot, (i, pos, feed) in active.items():
                take = min(len(feed), room)
                if take == 0:
                    continue
                for j in range(take):
                    entries.append((slot, feed[j], pos + j, j == take - 1 and take == len(feed)))
                active[slot] = [i, pos + take, feed[take:]]
                room -= take
                if room == 0:
                    break
            self._decode(entries)
            for k, (slot, _, _, logits) in enumerate(entries):
                if not logits:
                    continue
                i = active[slot][0]
                row = np.ctypeslib.as_array(lc.llama_get_logits_ith(self.ctx, k), shape=(self.n_vocab,))
                token = int(row.argmax())
                if token not in eos:  # as the harness's engine, the ids end before the EOS
                    out[i].append(token)
                if token in eos or len(out[i]) >= max_new_tokens:
                    lc.llama_memory_seq_rm(self.memory, slot, -1, -1)
                    del active[slot]
                    free.append(slot)
                else:
                    active[slot][2] = [token]
        return out

    def _decode(self, entries: list[tuple[int, int, int, bool]]) -> None:
        b = self.batch
        for k, (slot, token, pos, logits) in enumerate(entries):
            b.token[k], b.pos[k], b.n_seq_id[k], b.logits[k] = token, pos, 1, logits
            b.seq_id[k][0] = slot
        b.n_tokens = len(entries)
        rc = self.lc.llama_decode(self.ctx, b)
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc} on a batch of {len(entries)} tokens")


@ctypes.CFUNCTYPE(None, ctypes.c_int, ctypes.c_char_p, ctypes.c_void_p)
def _QUIET(level, text, user_data):  # llama.cpp logs every load and context creation at length
    pass
