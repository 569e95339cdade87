"""One source of model-shape arithmetic (`runtime.shapes`): for every family the cost model's weight bytes equal
what the runtime places, tier by tier, and its FLOPs equal the matmuls the layers run (counted by torch's
`FlopCounterMode` around a real forward pass)."""

from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from runtime import Engine, Policy
from runtime.policy import Placement
from runtime.shapes import shapes
from runtime.weight_costs import weight_bytes
from tests import tiny_models
from tests.runtime.cost_fixtures import cpu_hardware

MODELS = [("opt", v) for v in tiny_models.VARIANTS] + [("llama", v) for v in tiny_models.LLAMA_VARIANTS]
POLICIES = {
    "in RAM": Policy(),
    "fp16 kept": Policy(weight_format="checkpoint"),
    "4-bit": Policy(compress_weight={"bits": 4, "group_size": 16}, weight_format="checkpoint"),
    "on disk": Policy(weights=Placement(0, 0), weight_format="checkpoint"),
    "4-bit on disk": Policy(weights=Placement(0, 0), compress_weight={"bits": 4, "group_size": 16}),
    "int8 on disk": Policy(weights=Placement(0, 0), compute="int8"),
}


@pytest.fixture(scope="module")
def fp16_models(tmp_path_factory):
    built = {}

    def get(family: str, variant: str):
        if (family, variant) not in built:
            out = tmp_path_factory.mktemp(f"{variant}-fp16")
            build = tiny_models.build_opt if family == "opt" else tiny_models.build_llama
            build(out, variant, dtype=torch.float16)
            built[family, variant] = out
        return built[family, variant]

    return get


@pytest.mark.parametrize("family,variant", MODELS)
@pytest.mark.parametrize("policy", list(POLICIES))
def test_cost_model_bytes_equal_the_weights_the_runtime_places(fp16_models, tmp_path, family, variant, policy):
    path = fp16_models(family, variant)
    p = POLICIES[policy]
    engine = Engine(path, p, offload_dir=tmp_path)
    placed = engine.weights.bytes_by_tier()
    wb = weight_bytes(cpu_hardware(), engine.spec, p)
    if p.weights.disk == 0:
        assert placed == {"device": wb.stored["device"], "host": 0, "disk": 0}
    else:  # the tables (and an untied head) stay in RAM, the disk holds the rest in its stored form
        assert placed == {"device": wb.kept["device"], "host": 0, "disk": wb.stored["disk"] - wb.kept["disk"]}
    assert engine.spec.num_parameters() == sum(t.numel() for t in _hf_parameters(path))
    engine.close()


def _hf_parameters(path):
    from transformers import AutoConfig, AutoModelForCausalLM

    with torch.device("meta"):
        return list(AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path)).parameters())


@pytest.mark.parametrize("family,variant", MODELS)
def test_flops_equal_the_matmuls_the_layers_run(tiny_opt, tiny_llama, family, variant):
    path, _ = (tiny_opt if family == "opt" else tiny_llama)(variant)
    engine = Engine(path, Policy(gpu_batch_size=3))
    prompts = [[5 + i for i in range(7)] for _ in range(3)]  # unpadded: one prefill, then decode steps
    steps = []
    for n in (1, 3):  # prefill alone, then prefill and two decode steps: the difference is the decode steps
        with FlopCounterMode(display=False) as counter:
            engine.generate(prompts, n, stop_at_eos=False)
        counts = {str(op): f for op, f in counter.get_flop_counts()["Global"].items()}
        steps.append(counts.get("aten.mm", 0) + counts.get("aten.addmm", 0))  # SDPA on the CPU is not counted
    z, s = shapes(engine.spec), engine.spec
    B, T = len(prompts), len(prompts[0])

    def matmuls(rows: int) -> int:  # decoder and embedding matrices at every row, the head at one row a sequence
        return rows * (s.num_layers * z.token_flops() + z.embedding_flops()) + B * z.head_flops()

    assert steps[0] == matmuls(B * T)
    assert steps[1] - steps[0] == 2 * matmuls(B)
