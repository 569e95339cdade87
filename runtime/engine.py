"""`Engine`: batch-level generation and scoring on a local checkpoint; token ids in, ids and floats out.

Every call sorts its prompts by length into blocks (`plan_blocks`), pads each block (generation on the left,
scoring on the right: `runtime.scoring`), splits it into micro-batches and runs the block schedule
(`run_layers`); a prefix that every prompt of a block shares runs once per micro-batch, as a one-row step before
the rows' own tokens (`runtime.shapes.prefix_computed_once`). Results come back in the caller's order.
"""

from __future__ import annotations

import os
import time
import weakref
from collections import Counter
from collections.abc import Sequence
from dataclasses import replace

import torch

from runtime import batching
from runtime.checkpoint import Checkpoint
from runtime.compressed import weight_codec
from runtime.device import PeakMemory, compute_dtype, resolve_device
from runtime.disk import DiskIO
from runtime.errors import InputError
from runtime.families import get_family
from runtime.kv_cache import PrefixSlot
from runtime.layers import StepContext
from runtime.offload import OffloadDir
from runtime.policy import Policy, WeightFormat
from runtime.results import CallStats, GenerateResult, Generation, RollingResult, Score, ScoreResult
from runtime.rotary import Rotary
from runtime.sampling import Sampler, StopChecker, validate_sampling
from runtime.schedule import BlockRunner
from runtime.scoring import ScoringHead
from runtime.shapes import prefix_computed_once
from runtime.weights import WeightStore


class Engine:
    """A loaded model plus its policy. Construct once, call many times."""

    def __init__(self, model_dir: str | os.PathLike, policy: Policy | None = None, progress: bool = False,
                 offload_dir: str | os.PathLike | None = None) -> None:
        self.policy = policy or Policy()
        self.device = resolve_device(self.policy.device)
        ckpt = Checkpoint(model_dir)
        self.path, self.spec = ckpt.path, ckpt.spec
        storage = ckpt.storage_dtype()
        self.dtype = compute_dtype(self.device, storage)
        keep = self.policy.weight_format == WeightFormat.CHECKPOINT and storage.is_floating_point
        self.layers = get_family(self.spec.family).build_layers(self.spec)
        io = offload = None
        codec = weight_codec(self.policy.compress_weight, self.policy.compute, self.device,
                             self.policy.int4_dense_rows)
        if self.policy.offloads():
            offload, io = OffloadDir(offload_dir), DiskIO()
            self._finalizer = weakref.finalize(self, _release, io, offload)
        try:
            self.weights = WeightStore(ckpt, self.layers, self.device, storage if keep else self.dtype, self.dtype,
                                       self.policy.weights, io, offload, self.policy.pin_host_memory, progress,
                                       codec)
        except BaseException:
            _release(io, offload)
            raise
        ckpt.close()
        self.runner = BlockRunner(self.layers, self.weights, self.spec, self.policy, self.device, self.dtype,
                                  io, offload)
        self.pad_id = self.spec.pad_token_id if self.spec.pad_token_id is not None else 0
        self.rotary = Rotary(self.spec.rope, self.spec.head_dim, self.device) if self.spec.rope else None
        self._memory = PeakMemory(self.device)
        self.calls: Counter[tuple[str, int]] = Counter()
        """Calls that returned so far, by (method, rows): a `generate` of 8 prompts counts 1 at ("generate", 8)."""

    def close(self) -> None:
        """Remove this engine's scratch files and stop its I/O threads (also done when it is collected)."""
        if hasattr(self, "_finalizer"):
            self._finalizer()

    # ---- generation -------------------------------------------------------------------------
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, stop_token_sequences: Sequence[Sequence[int]] = (),
                 seed: int = 0, stop_at_eos: bool = True) -> GenerateResult:
        """Continue each prompt by up to `max_new_tokens` tokens (greedy when temperature is 0)."""
        batching.validate_ids(prompts, "prompts", self.spec.vocab_size)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        validate_sampling(temperature, top_k, top_p)
        for i, p in enumerate(prompts):
            self._check_length(len(p) + max_new_tokens, f"prompt {i} ({len(p)} tokens) + max_new_tokens "
                               f"({max_new_tokens})")
        eos = self.spec.eos_token_ids if stop_at_eos else ()
        checkers = [StopChecker(stop_token_sequences, eos) for _ in prompts]
        timer = _Timer(self.device)
        self._memory.reset()
        for block in batching.plan_blocks([len(p) for p in prompts], self.policy.block_size):
            sampler = Sampler(temperature, top_k, top_p, seed, block)
            rows = [checkers[i] for i in block]

            def choose(step: int, logits: torch.Tensor, rows=rows, sampler=sampler) -> torch.Tensor | None:
                tokens, logprobs = sampler(logits[:, -1])  # (b,), (b,)
                for checker, t, lp in zip(rows, tokens.tolist(), logprobs.tolist()):
                    if checker.reason is None:
                        checker.push(t, lp)
                done = all(c.reason is not None for c in rows)
                return None if done else tokens

            self._run_block([prompts[i] for i in block], max_new_tokens, choose, timer)
        generations = []
        for c in checkers:
            generations.append(Generation(c.ids, c.logprobs, c.reason or "length"))
        emitted = sum(c.emitted for c in checkers)
        self.calls["generate", len(prompts)] += 1
        return GenerateResult(generations, self._stats(timer, sum(map(len, prompts)), emitted))

    def trace_logits(self, prompts: Sequence[Sequence[int]], forced: Sequence[Sequence[int]]) -> list[torch.Tensor]:
        """Teacher-forced logits for tests and debugging, as one block: [(B, T, V) prefill, (B, 1, V) per step].

        Step t feeds `forced[r][t]` to row r; all rows need the same number of forced tokens.
        """
        batching.validate_ids(prompts, "prompts", self.spec.vocab_size)
        steps = {len(f) for f in forced}
        if len(steps) != 1 or len(forced) != len(prompts):
            raise InputError("trace_logits needs one forced continuation per prompt, all of one length")
        n = steps.pop()
        out: list[torch.Tensor] = []

        def choose(step: int, logits: torch.Tensor) -> torch.Tensor | None:
            out.append(logits.float().clone())
            return torch.tensor([f[step] for f in forced], device=self.device) if step < n else None

        self._run_block(list(prompts), n + 1, choose, _Timer(self.device), all_prefill_logits=True)
        return out

    def _run_block(self, seqs: list[Sequence[int]], max_new_tokens: int, choose, timer: _Timer,
                   all_prefill_logits: bool = False) -> None:
        """Prefill one block, then decode; `choose(step, logits (b, T, V))` gives the next tokens or None to stop."""
        window = self.spec.sliding_window
        shared = 0 if all_prefill_logits else prefix_computed_once(
            batching.shared_prefix(seqs), max(map(len, seqs)), max_new_tokens, window, scoring=False)
        ids, valid = batching.pad(seqs, self.pad_id, self.device, prefix=shared)  # (n, T)
        n, T = ids.shape
        total = T + max_new_tokens
        mbs = batching.split(range(n), self.policy.gpu_batch_size)
        full_valid = torch.zeros(n, total, dtype=torch.bool, device=self.device)
        full_valid[:, :T] = valid
        caches = self.runner.new_caches([mb.stop - mb.start for mb in mbs], total)
        try:
            self._prefill_and_decode(ids, valid, full_valid, mbs, caches, max_new_tokens, choose, timer,
                                     all_prefill_logits, shared)
        finally:
            self.runner.close_caches(caches)
        timer.shared += shared * (n - 1)

    def _prefill_and_decode(self, ids, valid, full_valid, mbs, caches, max_new_tokens, choose, timer,
                            all_prefill_logits, shared) -> None:
        T = ids.shape[1]
        with torch.inference_mode():
            timer.start()
            pos = batching.positions(valid)
            window = self.spec.sliding_window
            xs, ctxs = [], []
            if shared:
                # the shared prefix once per micro-batch, as a (1, shared) row: in the same pass over the layers, its
                # keys and values go into every row's cache before the rows' own tokens (below) attend to them
                first = [slice(mb.start, mb.start + 1) for mb in mbs]
                xs = [ids[r, :shared] for r in first]
                ctxs = [self._context(pos[r, :shared], None, 0, slice(shared - 1, shared)) for r in first]
            own = slice(shared, T)
            masks = [batching.prefill_mask(valid[mb], window, explicit=shared > 0) for mb in mbs]  # (b, 1, T, T)
            xs += [ids[mb, own] for mb in mbs]
            ctxs += [self._context(pos[mb, own], None if m is None else m[:, :, own], shared,
                                   None if all_prefill_logits else slice(T - shared - 1, T - shared))
                     for mb, m in zip(mbs, masks)]
            outs = self.runner.forward(xs, ctxs, caches * (2 if shared else 1))
            logits = _cat(outs[len(outs) - len(mbs):])
            next_ids = choose(0, logits)
            timer.stop("prefill")
            last_pos = pos[:, -1]  # (n,)
            for step in range(1, max_new_tokens):
                if next_ids is None:
                    break
                timer.start()
                S = T + step
                full_valid[:, S - 1] = True
                last_pos = last_pos + 1
                ctxs = [self._context(last_pos[mb, None], batching.decode_mask(full_valid[mb, :S], window), S - 1)
                        for mb in mbs]
                xs = [next_ids[mb, None] for mb in mbs]  # (b, 1)
                logits = _cat(self.runner.forward(xs, ctxs, caches))
                next_ids = choose(step, logits)
                timer.stop("decode")

    # ---- scoring ----------------------------------------------------------------------------
    def score(self, contexts: Sequence[Sequence[int]], continuations: Sequence[Sequence[int]]) -> ScoreResult:
        """Log-likelihood of each continuation given its context, and whether it is the greedy one."""
        batching.validate_ids(contexts, "contexts", self.spec.vocab_size)
        batching.validate_ids(continuations, "continuations", self.spec.vocab_size)
        if len(contexts) != len(continuations):
            raise InputError(f"{len(contexts)} contexts but {len(continuations)} continuations")
        timer = _Timer(self.device)
        self._memory.reset()
        per_token, greedy = self._score_items(list(contexts), list(continuations), timer)
        scores = [Score(sum(lp), g, lp) for lp, g in zip(per_token, greedy)]
        self.calls["score", len(contexts)] += 1
        return ScoreResult(scores, self._stats(timer, sum(len(c) + len(x) for c, x in zip(contexts, continuations)), 0))

    def score_rolling(self, streams: Sequence[Sequence[int]], window: int | None = None, stride: int | None = None,
                      prefix_token_id: int | None = None) -> RollingResult:
        """Per-token log-probs over long token streams, for perplexity.

        Each window feeds at most `window` tokens and scores the `stride` newest ones, so every scored
        token sees at least `window - stride` tokens of context (stride == window: disjoint windows, as
        lm-evaluation-harness does). With `prefix_token_id` (e.g. EOS), the first token is scored given
        it; without, the first token of a stream is not scored.
        """
        batching.validate_ids(streams, "streams", self.spec.vocab_size)
        window = window or self.spec.max_positions
        stride = stride or window
        if not 1 <= stride <= window:
            raise InputError(f"stride must be in [1, window={window}], got {stride}")
        self._check_length(window, f"window {window}")
        contexts, conts, owner = [], [], []
        for i, stream in enumerate(streams):
            seq = ([prefix_token_id] if prefix_token_id is not None else []) + list(stream)
            a = 1  # first target index in seq
            while a < len(seq):
                b = min(a + stride, len(seq))
                s = max(0, b - 1 - window)
                contexts.append(seq[s:a])
                conts.append(seq[a:b])
                owner.append(i)
                a = b
        timer = _Timer(self.device)
        self._memory.reset()
        out: list[list[float]] = [[] for _ in streams]
        if contexts:
            per_token, _ = self._score_items(contexts, conts, timer)
            for i, lp in zip(owner, per_token):
                out[i].extend(lp)
        self.calls["score_rolling", len(streams)] += 1
        return RollingResult(out, self._stats(timer, sum(map(len, streams)), 0))

    def _score_items(self, contexts: list, continuations: list, timer: _Timer) -> tuple[list[list[float]], list[bool]]:
        inputs = []
        for i, (c, x) in enumerate(zip(contexts, continuations)):
            inputs.append(list(c) + list(x)[:-1])  # the last continuation token is a target, never an input
            self._check_length(len(inputs[-1]), f"item {i}: context ({len(c)}) + continuation ({len(x)}) - 1")
        per_token: list[list[float]] = [[] for _ in inputs]
        greedy = [False] * len(inputs)
        head = ScoringHead(self.layers[-1], self.spec.vocab_size, continuations, per_token, greedy)
        window = self.spec.sliding_window
        cached = [i for i, layer in enumerate(self.layers) if layer.has_cache]
        with torch.inference_mode():
            for block in batching.plan_blocks([len(s) for s in inputs], self.policy.block_size):
                timer.start()
                seqs = [inputs[i] for i in block]
                mbs = batching.split(block, self.policy.gpu_batch_size)
                T = max(map(len, seqs))
                shared = 0
                if window is None or T <= window:
                    # right-padded: plain causal attention, no mask (`runtime.scoring`); pads come after a row's
                    # tokens, so no token sees them, and their positions run on past the row's end
                    ids, _ = batching.pad(seqs, self.pad_id, self.device, left=False)
                    pos = torch.arange(T, device=self.device).expand(len(block), T)
                    masks = [None] * len(mbs)
                    ends = [len(s) for s in seqs]
                    # a shared prefix stops before the first scored column (a context's last token: sharing within
                    # the contexts leaves it out)
                    common = batching.shared_prefix([inputs[i][:len(contexts[i])] for i in block])
                    shared = prefix_computed_once(common, T, 0, window, scoring=True)
                else:  # a sliding window needs its mask anyway
                    ids, valid = batching.pad(seqs, self.pad_id, self.device)
                    pos = batching.positions(valid)
                    masks = [batching.prefill_mask(valid[mb], window) for mb in mbs]
                    ends = [T] * len(seqs)
                xs, ctxs, caches = [], [], None
                if shared:
                    # the prefix once per micro-batch (its keys and values kept in a `PrefixSlot`), then the rows'
                    # own tokens, each seeing all of it and its own tokens causally: (1, 1, T - shared, T)
                    first = [slice(mb.start, mb.start + 1) for mb in mbs]
                    xs = [ids[r, :shared] for r in first]
                    ctxs = [replace(self._context(pos[r, :shared], None, 0), score=[]) for r in first]
                    see = torch.ones(T - shared, T, dtype=torch.bool, device=self.device).tril(shared)[None, None]
                    masks = [see] * len(mbs)
                    caches = [{i: PrefixSlot() for i in cached} for _ in mbs] * 2
                items = list(zip(block, [e - shared for e in ends]))
                own = slice(shared, T)
                xs += [ids[mb, own] for mb in mbs]
                ctxs += [replace(self._context(pos[mb, own], mask, shared), score=items[mb])
                         for mb, mask in zip(mbs, masks)]
                self.runner.forward(xs, ctxs, caches, head=head)
                timer.shared += shared * (len(block) - 1)
                timer.stop("prefill")
        return per_token, greedy

    # ---- helpers ----------------------------------------------------------------------------
    def _context(self, positions: torch.Tensor, mask: torch.Tensor | None, cache_start: int,
                 logit_positions: slice | None = None) -> StepContext:
        """A micro-batch's step context; rotary models get their cos/sin here, once for all layers."""
        rot = self.rotary(positions, self.dtype) if self.rotary is not None else None
        return StepContext(positions, mask, cache_start, logit_positions, self.dtype, rot)

    def _check_length(self, n: int, what: str) -> None:
        if n > self.spec.max_positions:
            raise InputError(f"{what} = {n} tokens exceeds the model's {self.spec.max_positions} positions; "
                             "shorten the prompt or ask for fewer tokens")

    def _stats(self, timer: _Timer, prompt_tokens: int, generated: int) -> CallStats:
        weights = self.weights.bytes_by_tier()
        planned = {tier: weights[tier] + self.runner.cache_peak[tier] for tier in weights}
        peaks = self._memory.read()
        # measured: weights stored on disk (read in place or prepared) plus the most blocks the scratch files
        # (KV cache, activations) have occupied, counted while they existed
        peaks["disk"] = weights["disk"] + self.runner.scratch_peak
        return CallStats(timer.totals["prefill"], timer.totals["decode"], prompt_tokens, generated, peaks,
                         planned, timer.shared)


class _Timer:
    """Wall time per phase; synchronizes CUDA so that asynchronous kernels are counted where they run."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"
        self.totals = {"prefill": 0.0, "decode": 0.0}
        self.shared = 0  # prompt tokens not computed per row: a block's shared prefix times its other rows
        self._t0 = 0.0

    def start(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self._t0 = time.perf_counter()

    def stop(self, phase: str) -> None:
        if self.cuda:
            torch.cuda.synchronize()
        self.totals[phase] += time.perf_counter() - self._t0


def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _release(io: DiskIO | None, offload: OffloadDir | None) -> None:
    if io is not None:
        io.close()
    if offload is not None:
        offload.close()
