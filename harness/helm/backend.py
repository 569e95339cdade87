"""`RuntimeBackend`: a batch of HELM `Request`s in, their `RequestResult`s out, in as few engine calls as possible.

One backend holds one `Engine` and its tokenizer; `get_backend()` keeps one per (model folder, policy)
per process, shared by HELM's client, the batching executor and flexhelm's own runner. A batch becomes:
- one `Engine.score` call for all echo requests (language modelling: `echo_prompt` with `max_tokens=0`),
  the first prompt token serving as context and reported with log-prob 0.0, as HELM's other clients do;
- one `Engine.generate` call per group of generation requests that share sampling parameters, each
  request's prompt repeated `num_completions` times.
Every result carries `batch_size` (requests served by its engine call) and `batch_request_time` (that
call's wall time), which HELM's efficiency metrics use for offline batched models.
"""

from __future__ import annotations

import json
import os
import threading
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from harness.helm.token_text import Rendered, TokenTexts, cut_at_stops, truncate
from harness.planning import auto_policy
from runtime.results import CallStats

FINISH_REASONS = {"eos": "endoftext", "stop": "stop", "length": "length"}  # runtime -> HELM's names


@dataclass(frozen=True)
class EngineCall:
    """One engine call made for a batch of HELM requests, with the runtime's own timing and memory."""

    kind: str
    """`score` or `generate`."""
    num_requests: int
    """HELM requests it served."""
    num_sequences: int
    """Rows it ran (requests times completions)."""
    wall_s: float
    """Wall time of the call (tokenizing and rendering excluded)."""
    stats: CallStats
    """The runtime's `CallStats`: prefill/decode seconds, prompt and generated tokens, peak memory per tier."""

    def to_json(self) -> dict:
        return {"kind": self.kind, "num_requests": self.num_requests, "num_sequences": self.num_sequences,
                "wall_s": self.wall_s, **self.stats.to_json()}


@dataclass(frozen=True)
class BatchOutput:
    results: list
    """One `helm.common.request.RequestResult` per request, in order."""
    calls: list[EngineCall]


@dataclass
class _Plan:
    """What one request needs from the engine."""

    request: object
    prompt_ids: list[int] = field(default_factory=list)
    """Tokens echoed back (echo requests) or fed to generation."""
    echo: bool = False
    scores: list[float] | None = None
    """Echo: log-prob of each prompt token (the first is 0.0)."""
    generations: list | None = None
    """Runtime `Generation`s, one per completion."""
    calls: list[EngineCall] = field(default_factory=list)
    error: str | None = None


class RuntimeBackend:
    """One loaded model serving HELM requests; `process()` is thread-safe (calls run one at a time)."""

    def __init__(self, model_dir: str | os.PathLike, policy=None, offload_dir: str | os.PathLike | None = None):
        from runtime.checkpoint import load_tokenizer
        from runtime.engine import Engine

        self.model_dir = Path(model_dir).expanduser().resolve()
        self.policy = policy_from(policy, self.model_dir)
        self.engine = Engine(self.model_dir, self.policy, offload_dir=offload_dir)
        self.tokenizer = load_tokenizer(self.model_dir)
        self.texts = TokenTexts(self.tokenizer)
        self.max_positions: int = self.engine.spec.max_positions
        self.eos_token_id = self.engine.spec.eos_token_id
        self.prefix_ids = default_prefix(self.tokenizer)
        self.calls: list[EngineCall] = []
        """Every engine call so far (see `drain_calls`)."""
        self._lock = threading.Lock()
        self._warned: set[str] = set()

    def process(self, requests: Sequence) -> list:
        return self.process_batch(requests).results

    def drain_calls(self) -> list[EngineCall]:
        """The engine calls logged since the last drain (for runners that report runtime stats)."""
        with self._lock:
            calls, self.calls = self.calls, []
        return calls

    def process_batch(self, requests: Sequence) -> BatchOutput:
        """Serve `requests` together; failures come back as unsuccessful results, never as exceptions."""
        with self._lock:
            started = time.time()
            plans = self._plan_all(requests)
            calls: list[EngineCall] = []
            self._score([p for p in plans if p.error is None and p.echo and len(p.prompt_ids) > 1], calls)
            groups: dict[tuple, list[_Plan]] = {}
            for p in plans:
                if p.error is None and p.request.max_tokens > 0:
                    groups.setdefault(_sampling_key(p.request), []).append(p)
            for key, group in groups.items():
                self._generate(key, group, calls)
            results = [self._result(p, started) for p in plans]
            self.calls.extend(calls)
        return BatchOutput(results, calls)

    # ---- planning -------------------------------------------------------------------------------
    def _plan_all(self, requests: Sequence) -> list[_Plan]:
        plans = [_Plan(r) for r in requests]
        todo = []
        for p in plans:
            p.error = self._unsupported(p.request)
            if p.error is None:
                todo.append(p)
        if todo:  # one batched call into the fast tokenizer
            encoded = self.tokenizer([p.request.prompt for p in todo], add_special_tokens=False)["input_ids"]
            for p, ids in zip(todo, encoded):
                self._fit(p, list(ids))
        return plans

    def _unsupported(self, r) -> str | None:
        if r.embedding:
            return "flexhelm models do not compute embeddings"
        if r.messages or r.multimodal_prompt is not None:
            return "flexhelm models take a text prompt (no chat messages or multimodal prompts)"
        if r.num_completions < 1 or r.max_tokens < 0:
            return f"num_completions ({r.num_completions}) must be >= 1 and max_tokens ({r.max_tokens}) >= 0"
        if r.max_tokens > 0 and (r.temperature < 0 or not 0 < r.top_p <= 1):
            return f"temperature ({r.temperature}) must be >= 0 and top_p ({r.top_p}) in (0, 1]"
        if r.max_tokens >= self.max_positions:
            return (f"max_tokens ({r.max_tokens}) leaves no room for a prompt in the model's "
                    f"{self.max_positions} positions")
        return None

    def _fit(self, p: _Plan, ids: list[int]) -> None:
        """Choose the tokens sent; left-truncate prompts longer than the window (HELM's window service should
        have fitted them already: this only trims the token or two its limits allow over)."""
        r = p.request
        p.echo = r.echo_prompt
        if p.echo:
            # scoring needs len - 1 inputs (the last token is only a target), generation the prompt + max_tokens
            limit = self.max_positions + 1 if r.max_tokens == 0 else self.max_positions - r.max_tokens
            prefix: list[int] = []
        else:
            # the model's usual start (OPT: </s>), as `tokenizer(prompt)` adds it; GPT-2 style: none
            limit = self.max_positions - r.max_tokens
            prefix = [] if ids[:len(self.prefix_ids)] == self.prefix_ids else list(self.prefix_ids)
            if not prefix and not ids:
                prefix = [self.eos_token_id]  # an empty prompt: start from end-of-text, as GPT-2 does
        if len(prefix) + len(ids) > limit:
            if "truncate" not in self._warned:
                self._warned.add("truncate")
                _warn(f"prompts longer than the model window are left-truncated to {limit} tokens (first: "
                      f"{len(prefix) + len(ids)}); one or two tokens are expected: HELM's window allows "
                      "positions + 1 for language modelling, and OPT-style models add a start token")
            ids = ids[len(prefix) + len(ids) - limit:]
        p.prompt_ids = prefix + ids

    # ---- engine calls ---------------------------------------------------------------------------
    def _score(self, plans: list[_Plan], calls: list[EngineCall]) -> None:
        if not plans:
            return
        contexts = [p.prompt_ids[:1] for p in plans]
        continuations = [p.prompt_ids[1:] for p in plans]
        out = self._call("score", plans, len(plans), calls, lambda: self.engine.score(contexts, continuations))
        if out is not None:
            for p, s in zip(plans, out.scores):
                p.scores = [0.0] + list(s.token_logprobs)

    def _generate(self, key: tuple, plans: list[_Plan], calls: list[EngineCall]) -> None:
        temperature, top_p, max_tokens, stops, seed = key
        # greedy completions are identical: run one row per request and repeat it
        reps = [1 if temperature == 0 else p.request.num_completions for p in plans]
        prompts = [p.prompt_ids or [self.eos_token_id] for p, n in zip(plans, reps) for _ in range(n)]
        stop_ids = self.texts.stop_token_sequences(stops)
        out = self._call("generate", plans, len(prompts), calls, lambda: self.engine.generate(
            prompts, max_tokens, temperature=temperature, top_k=0, top_p=top_p, stop_token_sequences=stop_ids,
            seed=seed))
        if out is None:
            return
        rows = iter(out.generations)
        for p, n in zip(plans, reps):
            gens = [next(rows) for _ in range(n)]
            p.generations = gens * p.request.num_completions if n == 1 else gens

    def _call(self, kind: str, plans: list[_Plan], rows: int, calls: list[EngineCall], run):
        t0 = time.perf_counter()
        try:
            out = run()
        except Exception as e:  # the batch fails together; each request says why instead of crashing HELM
            from runtime.errors import FlexhelmError

            if not isinstance(e, FlexhelmError):
                _log_exception(e)
            for p in plans:
                p.error = f"flexhelm runtime error in {kind} ({type(e).__name__}): {e}"
            return None
        call = EngineCall(kind, len(plans), rows, time.perf_counter() - t0, out.stats)
        calls.append(call)
        for p in plans:
            p.calls.append(call)
        return out

    # ---- results --------------------------------------------------------------------------------
    def _result(self, p: _Plan, started: float):
        from helm.common.request import ErrorFlags, RequestResult

        if p.error is not None:
            # not retriable: the same batch would fail the same way, and HELM's retry waits minutes
            return RequestResult(success=False, embedding=[], completions=[], cached=False, error=p.error,
                                 error_flags=ErrorFlags(is_retriable=False, is_fatal=True))
        r = p.request
        if p.echo and r.max_tokens == 0:
            completions = [self._echo_output(p)] * r.num_completions
        elif r.max_tokens == 0:
            completions = [_output(Rendered([], [], ""), [], "length")] * r.num_completions
        else:
            completions = [self._generated_output(p, g) for g in p.generations]
        wall = sum(c.wall_s for c in p.calls)
        size = max((c.num_requests for c in p.calls), default=None)
        return RequestResult(success=True, embedding=[], completions=completions, cached=False,
                             request_time=wall, request_datetime=int(started), batch_size=size,
                             batch_request_time=wall if p.calls else None)

    def _echo_output(self, p: _Plan):
        rendered = self.texts.render(p.prompt_ids)
        return _output(rendered, p.scores or [0.0] * len(p.prompt_ids), "length")

    def _generated_output(self, p: _Plan, gen):
        r = p.request
        echoed = p.prompt_ids if p.echo else []
        rendered = self.texts.render(echoed + list(gen.output_ids))
        logprobs = (p.scores or [0.0] * len(echoed)) + list(gen.logprobs)
        reason = FINISH_REASONS.get(gen.finish_reason, "unknown")
        start = rendered.ends[len(echoed) - 1] if echoed else 0  # stops apply to the generated text only
        cut = cut_at_stops(rendered, r.stop_sequences, start)
        if cut is not None:
            keep = max(cut[0], len(echoed))
            rendered, logprobs, reason = truncate(rendered, keep, cut[1]), logprobs[:keep], "stop"
        return _output(rendered, logprobs, reason)


def _output(rendered: Rendered, logprobs: list[float], reason: str):
    from helm.common.request import GeneratedOutput, Token

    tokens = [Token(text=t, logprob=lp) for t, lp in zip(rendered.texts, logprobs)]
    return GeneratedOutput(text=rendered.text, logprob=sum(logprobs), tokens=tokens,
                           finish_reason={"reason": reason})


def with_result(state, result):
    """HELM's `Executor.process` rule for failures, applied to a `RequestState` and the `RequestResult` we already
    have for it: a non-fatal error becomes an empty completion, a fatal one an `ExecutorError`. The batch executor
    of `helm-run` and the suite runner's executor both hand results over this way."""
    from dataclasses import replace

    from helm.benchmark.executor import ExecutorError
    from helm.common.hierarchical_logger import hwarn
    from helm.common.request import GeneratedOutput

    if not result.success:
        if result.error_flags and not result.error_flags.is_fatal:
            hwarn(f"Non-fatal error treated as empty completion: {result.error}")
            result.completions = [GeneratedOutput(text="", logprob=0, tokens=[])]
        else:
            raise ExecutorError(f"{result.error} Request: {state.request}")
    return replace(state, result=result)


def _sampling_key(r) -> tuple:
    """Requests that can share one `generate` call. HELM's `top_k_per_token` is how many alternatives to
    report per token (OpenAI's `logprobs`), not top-k sampling, so it plays no part; `random` salts the seed
    so that requests differing only in it get different samples."""
    greedy = r.temperature == 0
    seed = 0 if greedy or r.random is None else zlib.crc32(str(r.random).encode())
    return (float(r.temperature), 1.0 if greedy else float(r.top_p), r.max_tokens, tuple(r.stop_sequences), seed)


def default_prefix(tokenizer) -> list[int]:
    """Special tokens the tokenizer puts before a text by default (OPT: [</s>]; GPT-2: none)."""
    plain = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a")["input_ids"]
    head = len(full) - len(plain)
    return list(full[:head]) if head > 0 and list(full[head:]) == list(plain) else []


def policy_from(value, model_dir: str | os.PathLike | None = None):
    """A runtime `Policy` from what `policies.parse_policy` reads; `auto` (or None under the default) is planned
    once per model folder for the longest request the model accepts, since HELM's requests are not known up front:
    prompts filling the context but `auto_policy.HELM_GEN_LEN` tokens, room for the KV cache of any request."""
    from harness.planning.policies import parse_policy
    from runtime.errors import PolicyError
    from runtime.policy import Policy

    if isinstance(value, Policy):
        return value
    fields = parse_policy(value)
    if fields is not None:
        return Policy.from_json(fields)
    if model_dir is None:
        raise PolicyError("the auto policy is planned for a model: pass its folder")
    key = str(Path(model_dir).expanduser().resolve())
    if key not in _AUTO_PLANS:
        from runtime.cost_model import Workload

        work = Workload(*auto_policy.longest_request(auto_policy.model_spec(key)))
        _AUTO_PLANS[key] = auto_policy.plan(key, work).policy
    return _AUTO_PLANS[key]


_AUTO_PLANS: dict[str, object] = {}
"""The `auto` policy of each model folder, planned once per process."""
_BACKENDS: dict[tuple, RuntimeBackend] = {}
_BACKENDS_LOCK = threading.Lock()


def get_backend(model_dir: str | os.PathLike, policy=None,
                offload_dir: str | os.PathLike | None = None) -> RuntimeBackend:
    """The process's backend for this model folder and policy, loaded on first use."""
    resolved = policy_from(policy, model_dir)
    key = (str(Path(model_dir).expanduser().resolve()), json.dumps(resolved.to_json(), sort_keys=True),
           str(offload_dir) if offload_dir else None)
    with _BACKENDS_LOCK:  # HELM's threads may ask at once; load the model once
        if key not in _BACKENDS:
            _BACKENDS[key] = RuntimeBackend(model_dir, resolved, offload_dir)
        return _BACKENDS[key]


def _warn(message: str) -> None:
    from helm.common.hierarchical_logger import hwarn

    hwarn(f"flexhelm: {message}")


def _log_exception(e: Exception) -> None:
    from helm.common.hierarchical_logger import hexception

    hexception(e)
