"""`FlexhelmLM`: lm-evaluation-harness's `LM` interface on the flexhelm runtime, registered as `flexhelm`.

    flexhelm lm-eval --model flexhelm --model_args pretrained=DIR,policy=auto,compress_weight=true \\
        --tasks lambada_openai_local --batch_size 32

Each of lm-eval's three request types is one engine call over all of its requests (the engine sorts them
by length into blocks of `batch_size`, reuses each loaded layer across a block, and returns results in
order): `loglikelihood` -> `Engine.score`, `loglikelihood_rolling` -> `Engine.score_rolling` with lm-eval's
windows (disjoint windows of `max_length`, the last one with full context, the first token scored after
the prefix token), `generate_until` -> `Engine.generate` per group of equal generation arguments.

Tokens are chosen exactly as lm-eval's `hf` model chooses them on the same folder (its `tok_encode`, the
prefix token, left truncation to `max_length`, stop strings cut from decoded text), so the two models score
the same token sequences: the tests compare them request by request.

Model arguments (`--model_args k=v,...`):
- `pretrained`: a checkpoint folder, or a `.gguf` file (imported once into flexhelm's cache);
- `policy`: `auto` (planned by the cost model for the requests of each call) or the path of a policy
  JSON file (`runtime.Policy` fields; inline JSON cannot pass through lm-eval's comma-separated arguments);
- `compress_weight`, `compress_cache` (booleans), `bits` (4), `group_size` (64): group-wise quantization;
- `compute`: `exact` (default) or `int8` (CPU: 8-bit weights and activations in the int8 GEMM, `runtime.int8`);
- `host_mem`, `disk_mem`: limits the auto policy must respect (sizes such as `12GiB`);
- `max_length`, `max_gen_toks` (256), `add_bos_token`, `prefix_token_id`: as in lm-eval's `hf` model;
- lm-eval's `--batch_size N` is the block (requests per layer pass; default 32); `auto` lets the planner
  choose it (up to `--max_batch_size`, default 256).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from harness.planning.policies import ResolvedPolicy, parse_policy, policy_fields, variant_policy
from harness.suites.suite import Compression, Variant
from runtime import batching
from runtime.cost_model import Workload
from runtime.errors import InputError, PolicyError

DEFAULT_BLOCK = 32
"""Requests per block when lm-eval passes no `--batch_size` (its own default of 1 would run one request per
layer pass, the opposite of what the runtime is for)."""
CALL_BLOCKS = 8
"""Blocks per engine call: a progress update every 8 layer passes over the model."""
AUTO_BLOCKS = (8, 16, 32, 64, 128, 256)
"""Blocks `--batch_size auto` considers; the smallest within 5% of the best predicted throughput wins."""


@register_model("flexhelm")
class FlexhelmLM(TemplateLM):
    def __init__(self, pretrained: str, policy: str = "auto", compress_weight: bool = False,
                 compress_cache: bool = False, bits: int = 4, group_size: int = 64, host_mem: str | None = None,
                 disk_mem: str | None = None, batch_size: int | str | None = None, max_batch_size: int | None = None,
                 device: str | None = None, max_length: int | None = None, max_gen_toks: int = 256,
                 add_bos_token: bool | None = None, prefix_token_id: int | None = None,
                 offload_dir: str | None = None, compute: str = "exact") -> None:
        super().__init__()
        from harness.planning import auto_policy
        from runtime.checkpoint import load_tokenizer

        self.model_dir = _checkpoint(str(pretrained))
        self.tokenizer = load_tokenizer(self.model_dir)
        self.spec = auto_policy.model_spec(self.model_dir)
        fields = parse_policy(str(policy), "policy")
        requested = "auto" if fields is None else fields
        if device is not None and isinstance(requested, dict):
            requested = {**requested, "device": device}
        compress = {(False, False): Compression.OFF, (True, False): Compression.WEIGHTS,
                    (False, True): Compression.CACHE, (True, True): Compression.BOTH}[
            (bool(compress_weight), bool(compress_cache))]
        memory = {k: auto_policy.parse_size(str(v)) for k, v in (("host", host_mem), ("disk", disk_mem)) if v}
        self.variant = Variant("lm-eval", compress, int(bits), int(group_size), compute=str(compute),
                               policy=requested, memory=memory)
        auto_block = str(batch_size).startswith("auto")
        self.block = None if auto_block else int(batch_size or DEFAULT_BLOCK)
        self.max_block = int(max_batch_size or AUTO_BLOCKS[-1])
        policy_fields(self.variant, self.block or DEFAULT_BLOCK)  # bad fields fail here, before any request
        self.add_bos_token = add_bos_token
        self.custom_prefix_token_id = prefix_token_id
        self._max_length = int(max_length) if max_length else None
        self._max_gen_toks = int(max_gen_toks)
        self.offload_dir = offload_dir
        self.engine = None
        self.resolved: ResolvedPolicy | None = None
        """The policy of the loaded engine."""
        self._workload: Workload | None = None
        self._texts = None

    # ---- what lm-eval asks of a model -----------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self) -> int:
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        if self.tokenizer.bos_token_id is not None:
            return self.tokenizer.bos_token_id
        return self.tokenizer.eos_token_id

    @property
    def max_length(self) -> int:
        """lm-eval's `hf` rule (config's n_positions / max_position_embeddings / n_ctx, then the tokenizer's
        limit, then 2048), capped at the positions the runtime serves."""
        if self._max_length:
            return self._max_length
        from lm_eval.models.utils import resolve_max_length
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(str(self.model_dir), local_files_only=True)
        self._max_length = min(resolve_max_length(config, self.tokenizer), self.spec.max_positions)
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        """As lm-eval's `hf` model: the tokenizer's own special tokens unless told otherwise, none when the
        string already starts with the prefix token's text."""
        kw = {} if add_special_tokens is None and self.add_bos_token is None else {
            "add_special_tokens": add_special_tokens if add_special_tokens is not None else self.add_bos_token}
        prefix = self.tokenizer.decode(self.prefix_token_id)
        if add_special_tokens is None and prefix and string.startswith(prefix):
            kw = {"add_special_tokens": False}
        return self.tokenizer.encode(string, **kw)

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        """(log-likelihood, is greedy) of each continuation; an input longer than the window loses its oldest
        context tokens, as in lm-eval's `hf` model."""
        contexts, conts = [], []
        for _, ctx, cont in requests:
            if len(cont) > self.max_length:
                raise InputError(f"a continuation of {len(cont)} tokens exceeds max_length {self.max_length}")
            whole = (list(ctx) + list(cont))[-(self.max_length + 1):]
            contexts.append(whole[:-len(cont)])
            conts.append(list(cont))
        lengths = [len(c) + len(x) - 1 for c, x in zip(contexts, conts)]
        out = self._call("loglikelihood", lengths, 0, disable_tqdm, lambda engine, idx: engine.score(
            [contexts[i] for i in idx], [conts[i] for i in idx]).scores)
        results = [(s.logprob, s.is_greedy) for s in out]
        for (key, _, _), r in zip(requests, results):
            if key is not None:
                self.cache_hook.add_partial("loglikelihood", key, r)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        streams = [self.tok_encode(string) for (string,) in (r.args for r in requests)]
        window = self.max_length
        out = self._call("loglikelihood_rolling", [min(window, len(t)) for t in streams], 0, disable_tqdm,
                         lambda engine, idx: engine.score_rolling([streams[i] for i in idx], window=window,
                                                                  stride=window,
                                                                  prefix_token_id=self.prefix_token_id).token_logprobs)
        totals = [float(sum(lps)) for lps in out]
        for r, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", r.args, total)
        return totals

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """One pass per set of equal generation arguments; stop strings end a row early (as token sequences)
        and are cut from the decoded text, as lm-eval's `hf` model cuts them."""
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(repr(sorted(r.args[1].items())), []).append(i)
        results: list[str] = [""] * len(requests)
        for rows in groups.values():
            texts = self._generate([requests[i].args[0] for i in rows], requests[rows[0]].args[1], disable_tqdm)
            for i, text in zip(rows, texts):
                results[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return results

    def _generate(self, contexts: list[str], gen_kwargs: dict, disable_tqdm: bool) -> list[str]:
        from harness.helm.token_text import TokenTexts

        self._texts = self._texts or TokenTexts(self.tokenizer)
        kwargs = normalize_gen_kwargs(gen_kwargs, self._max_gen_toks)
        eos = self.tokenizer.decode(self.eot_token_id)
        until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
        max_gen = kwargs.pop("max_gen_toks")
        sample = kwargs.pop("do_sample", False)
        temperature = float(kwargs.pop("temperature", 1.0) or 0.0) if sample else 0.0
        kwargs.pop("temperature", None)
        sampling = {"temperature": temperature, "top_p": float(kwargs.pop("top_p", None) or 1.0),
                    "top_k": int(kwargs.pop("top_k", None) or 0), "seed": int(kwargs.pop("seed", None) or 0)}
        if kwargs:
            raise InputError(f"flexhelm does not take the generation arguments {sorted(kwargs)} (it takes until, "
                             "max_gen_toks, do_sample, temperature, top_p, top_k, seed)")
        if max_gen >= self.max_length:
            raise InputError(f"max_gen_toks ({max_gen}) leaves no room for a prompt in max_length ({self.max_length})")
        # lm-eval's hf model encodes prompts with the tokenizer's own special tokens, then left-truncates them
        prompts = [self.tok_encode(c)[-(self.max_length - max_gen):] for c in contexts]
        stops = self._texts.stop_token_sequences(tuple(s for s in until if s != eos))
        gens = self._call("generate_until", list(map(len, prompts)), max_gen, disable_tqdm, lambda engine, idx: (
            engine.generate([prompts[i] for i in idx], max_gen, stop_token_sequences=stops, **sampling).generations))
        return [postprocess_generated_text(self.tokenizer.decode(g.output_ids, skip_special_tokens=True), until, None)
                for g in gens]

    # ---- the engine -----------------------------------------------------------------------------------
    def _call(self, what: str, lengths: list[int], gen_len: int, disable_tqdm: bool, run: Callable) -> list:
        """`run(engine, indices)` over all items, longest first, a few blocks per engine call so that the progress
        bar moves (each call still sorts its items by length into blocks); results in the items' order. `gen_len`
        0: the items are only scored."""
        if not lengths:
            return []
        engine = self._engine_for(Workload(max(lengths), max(1, gen_len), scoring=gen_len == 0), len(lengths))
        out: list = [None] * len(lengths)
        with tqdm(total=len(lengths), desc=f"flexhelm {what}", disable=disable_tqdm) as bar:
            for idx in batching.plan_blocks(lengths, engine.policy.block_size * CALL_BLOCKS):
                for i, r in zip(idx, run(engine, idx)):
                    out[i] = r
                bar.update(len(idx))
        return out

    def _engine_for(self, need: Workload, n: int):
        """The engine, loaded (again) when the requests at hand need a longer workload than its policy was
        planned for; an explicit policy is loaded once."""
        planned = self._workload
        if self.engine is not None and (self.variant.policy != "auto" or planned.covers(need)):
            return self.engine
        resolved = self._resolve(need, n)
        if self.engine is None or resolved.policy != self.engine.policy:
            from runtime.engine import Engine

            self.close()
            self.engine = Engine(self.model_dir, resolved.policy, offload_dir=self.offload_dir)
        self.resolved, self._workload = resolved, need
        return self.engine

    def _resolve(self, need: Workload, n: int) -> ResolvedPolicy:
        path = str(self.model_dir)
        if self.variant.policy != "auto" or self.block is not None:
            return variant_policy(path, self.variant, self.block, need)
        blocks = [b for b in AUTO_BLOCKS if b <= self.max_block and (b == AUTO_BLOCKS[0] or b // 2 < n)]
        plans = []
        for b in blocks or [AUTO_BLOCKS[0]]:
            try:
                plans.append(variant_policy(path, self.variant, b, need))
            except PolicyError as e:  # too big for memory: smaller blocks may fit
                error = e
        if not plans:
            raise error
        if any(p.prediction is None for p in plans):  # no planner ($FLEXHELM_DEFAULT_POLICY): the default block
            return variant_policy(path, self.variant, DEFAULT_BLOCK, need)
        best = max(p.prediction["throughput"] for p in plans)
        return next(p for p in plans if p.prediction["throughput"] >= 0.95 * best)

    def close(self) -> None:
        """Stop the engine's I/O threads and remove its scratch files."""
        if self.engine is not None:
            self.engine.close()
            self.engine = None

    def get_model_info(self) -> dict:
        policy = self.resolved.policy.to_json() if self.resolved else None
        return {"model_dir": str(self.model_dir), "flexhelm_policy": policy}


def _checkpoint(pretrained: str) -> Path:
    """A checkpoint folder from `pretrained`: the folder itself, or a GGUF file's import (made once)."""
    from harness.suites import gguf_models

    path = Path(os.path.expanduser(pretrained))
    if path.suffix == ".gguf":
        return gguf_models.imported(gguf_models.locate(pretrained, [Path.cwd()]))
    if not (path / "config.json").is_file():
        from runtime.errors import CheckpointError

        raise CheckpointError(f"pretrained={pretrained}: not a checkpoint folder (no config.json) nor a .gguf file")
    return path.resolve()
