"""lm-evaluation-harness's `flexhelm` model against lm-eval's own `hf` model on the same folders: the shipped
local tasks (LAMBADA, WikiText-2) request by request, generation, the weights on disk, lm-eval's cache, and the
`flexhelm lm-eval` command end to end."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

lm_eval = pytest.importorskip("lm_eval")

from lm_eval.api.instance import Instance  # noqa: E402
from lm_eval.tasks import TaskManager  # noqa: E402

from harness.lmeval.cli import TASKS_DIR  # noqa: E402
from harness.lmeval.model import FlexhelmLM  # noqa: E402
from harness.planning.policies import Workload  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
REF = REPO / "models" / "flexhelm-opt-ref"
RTOL = 1e-3
LIMIT = 8
"""Documents per task: LAMBADA passages, WikiText articles (2-9k tokens each, several 2048-token windows)."""
DISK = {"weights": {"device": 0.0, "host": 0.3}, "gpu_batch_size": 8}
"""70% of the weights on disk, in the reference run's micro-batches of 8: a micro-batch's size can change a result's
last bit (the GEMMs block by rows), its placement may not."""


@pytest.fixture(scope="module")
def tasks():
    return TaskManager(include_path=str(TASKS_DIR))


def _evaluate(model, tasks, names, limit, **kw) -> dict:
    return lm_eval.simple_evaluate(model=model, tasks=names, limit=limit, task_manager=tasks, log_samples=True,
                                   bootstrap_iters=0, **kw)


def _responses(result: dict, task: str) -> list:
    """Each document's filtered responses, in document order."""
    return [s["filtered_resps"] for s in sorted(result["samples"][task], key=lambda s: s["doc_id"])]


@pytest.fixture(scope="module")
def hf_ref(tasks):
    """lm-eval's own `hf` model on the shipped reference model (fp32, as flexhelm computes on the CPU)."""
    return _evaluate("hf", tasks, ["lambada_openai_local", "wikitext_local"], LIMIT,
                     model_args=f"pretrained={REF},dtype=float32", batch_size=4, device="cpu")


@pytest.fixture(scope="module")
def ours_ref(tasks):
    return _evaluate("flexhelm", tasks, ["lambada_openai_local", "wikitext_local"], LIMIT,
                     model_args=f"pretrained={REF}", batch_size=8)


def test_lambada_equals_lm_eval_hf(hf_ref, ours_ref):
    ours, theirs = _responses(ours_ref, "lambada_openai_local"), _responses(hf_ref, "lambada_openai_local")
    assert len(ours) == len(theirs) == LIMIT
    for (lp, greedy), (lp_hf, greedy_hf) in ((o[0], t[0]) for o, t in zip(ours, theirs)):
        assert float(lp) == pytest.approx(float(lp_hf), rel=1e-4, abs=1e-4)
        assert greedy == greedy_hf
    r, r_hf = ours_ref["results"]["lambada_openai_local"], hf_ref["results"]["lambada_openai_local"]
    assert r["acc,none"] == r_hf["acc,none"]
    assert r["perplexity,none"] == pytest.approx(r_hf["perplexity,none"], rel=RTOL)


def test_wikitext_equals_lm_eval_hf(hf_ref, ours_ref):
    ours, theirs = _responses(ours_ref, "wikitext_local"), _responses(hf_ref, "wikitext_local")
    assert len(ours) == len(theirs) == LIMIT
    for o, t in zip(ours, theirs):
        assert float(o[0]) == pytest.approx(float(t[0]), rel=1e-5)
    r, r_hf = ours_ref["results"]["wikitext_local"], hf_ref["results"]["wikitext_local"]
    for metric in ("word_perplexity,none", "byte_perplexity,none", "bits_per_byte,none"):
        assert r[metric] == pytest.approx(r_hf[metric], rel=RTOL), metric


def test_weights_on_disk_change_nothing(tasks, ours_ref, tmp_path):
    policy = tmp_path / "disk.json"
    policy.write_text(json.dumps(DISK))
    lm = FlexhelmLM(pretrained=str(REF), policy=str(policy), batch_size=8, offload_dir=str(tmp_path / "offload"))
    out = _evaluate(lm, tasks, ["lambada_openai_local", "wikitext_local"], LIMIT)
    assert lm.engine.policy.weights.disk == pytest.approx(0.7)
    for task in ("lambada_openai_local", "wikitext_local"):
        assert _responses(out, task) == _responses(ours_ref, task), task
    lm.close()


def test_shipped_tasks_read_the_shipped_files(tasks):
    loaded = tasks.load(["lambada_openai_local", "wikitext_local"])["tasks"]
    docs = {name: list(task.test_docs()) for name, task in loaded.items()}
    assert len(docs["lambada_openai_local"]) == 5153
    assert len(docs["wikitext_local"]) == 62  # lm-eval's wikitext_document_level test split: 62 articles
    assert docs["wikitext_local"][0]["page"].lstrip().startswith("= Robert Boulter =")


def _gen(context: str, until: list[str], n: int = 12, **kw) -> Instance:
    return Instance("generate_until", {}, (context, {"until": until, "max_gen_toks": n, "do_sample": False, **kw}), 0)


def test_generate_until_equals_lm_eval_hf(tiny_llama):
    from lm_eval.models.huggingface import HFLM

    folder, _ = tiny_llama("llama-gqa")
    requests = [_gen("the quick brown", ["\n"]), _gen("a b c d e f", ["e", "\n\n"]),
                _gen("hello", ["."], n=20), _gen("one two three four five six seven", [" z"], n=5)]
    lm, hf = FlexhelmLM(pretrained=str(folder), batch_size=4), HFLM(pretrained=str(folder), dtype="float32",
                                                                       device="cpu", batch_size=4)
    ours = lm.generate_until(requests)
    assert ours == hf.generate_until(requests)
    assert any(ours)  # the tiny model produces text, not only stops
    # greedy continuations (token ids) scored back: is_greedy holds on both sides, and fails once a token changes
    contexts = [lm.tok_encode(r.args[0]) for r in requests]
    greedy = [g.output_ids for g in lm._engine_for(Workload(64, 4), 4).generate(contexts, 4, stop_at_eos=False)
              .generations]
    triples = [(None, c, g) for c, g in zip(contexts, greedy)]
    triples += [(None, c, g[:-1] + [(g[-1] + 1) % lm.spec.vocab_size]) for c, g in zip(contexts, greedy)]
    mine, theirs = lm._loglikelihood_tokens(triples), hf._loglikelihood_tokens(triples)
    assert [g for _, g in mine] == [g for _, g in theirs] == [True] * 4 + [False] * 4
    assert [lp for lp, _ in mine] == pytest.approx([lp for lp, _ in theirs], rel=1e-4)


def test_sampling_is_seeded_and_bad_arguments_are_named(tiny_llama):
    from runtime.errors import InputError

    folder, _ = tiny_llama("llama-gqa")
    lm = FlexhelmLM(pretrained=str(folder), batch_size=4)
    sampled = [_gen("the quick brown", [], n=8, do_sample=True, temperature=1.0)] * 3
    first = lm.generate_until(sampled)
    assert first == lm.generate_until(sampled)
    with pytest.raises(InputError, match="repetition_penalty"):
        lm.generate_until([_gen("x", [], repetition_penalty=1.2)])


def test_lm_eval_cache_serves_a_rerun_without_the_engine(tasks, tmp_path):
    cache = str(tmp_path / "cache" / "lm")
    first = FlexhelmLM(pretrained=str(REF), batch_size=8)
    a = _evaluate(first, tasks, ["lambada_openai_local"], 6, use_cache=cache)
    assert first.engine is not None
    second = FlexhelmLM(pretrained=str(REF), batch_size=8)
    b = _evaluate(second, tasks, ["lambada_openai_local"], 6, use_cache=cache)
    assert second.engine is None  # every request came from lm-eval's cache
    assert _responses(a, "lambada_openai_local") == _responses(b, "lambada_openai_local")


def test_bad_model_arguments_are_one_line_errors(tmp_path):
    from runtime.errors import CheckpointError, PolicyError

    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        FlexhelmLM(pretrained=str(tmp_path))
    with pytest.raises(PolicyError, match="neither a JSON object nor a readable JSON file"):
        FlexhelmLM(pretrained=str(REF), policy=str(tmp_path / "missing.json"))
    with pytest.raises(PolicyError, match="not a multiple"):
        (tmp_path / "p.json").write_text(json.dumps({"num_gpu_batches": 3}))
        FlexhelmLM(pretrained=str(REF), policy=str(tmp_path / "p.json"), batch_size=8)


def test_flexhelm_lm_eval_command(tmp_path, capsys):
    env = {**os.environ, "HF_DATASETS_CACHE": str(tmp_path / "hf-datasets")}
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "harness.cli", "lm-eval", "--model", "flexhelm", "--model_args",
           f"pretrained={REF}", "--tasks", "lambada_openai_local", "--limit", "4", "--batch_size", "4",
           "--output_path", str(out)]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    results = json.loads(next(out.rglob("results_*.json")).read_text())["results"]["lambada_openai_local"]
    assert math.isfinite(results["perplexity,none"]) and 0 <= results["acc,none"] <= 1
    from harness.cli import main  # the same command in this process (its start-up is the subprocess's cost)

    assert main([*cmd[3:7], "pretrained=/nonexistent", *cmd[8:]]) == 2
    err = capsys.readouterr().err
    assert "flexhelm: error: pretrained=/nonexistent" in err, err[-2000:]
