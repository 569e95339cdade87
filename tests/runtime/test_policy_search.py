"""The placement LP and outer search on synthetic hardware with known optima, and FlexGen's T4 machine."""

from __future__ import annotations

import dataclasses

import pytest

from runtime.cost_model import Workload, predict
from runtime.hardware import HardwareSpec
from runtime.policy import Policy, QuantConfig
from runtime.policy_search import InfeasibleError, batch_candidates, search
from runtime.weight_costs import int4_dense_rows
from tests.runtime.cost_fixtures import GiB, cpu_hardware, hardware, opt

WORK = Workload(prompt_len=128, gen_len=32, num_seqs=64)


def test_ample_memory_keeps_everything_on_the_device():
    plan = search(hardware(device_mem=1000 * GiB), opt("1.3b"), WORK)
    p = plan.policy
    assert (p.weights.device, p.cache.device, p.activations.device) == (1.0, 1.0, 1.0)
    assert plan.prediction.terms["decode"]["disk_read"] == 0 and plan.binding == "none"
    assert p.block_size <= WORK.num_seqs


def test_zero_disk_bandwidth_puts_nothing_on_disk():
    # 6.7b fp16 (13 GB) cannot stay on an 8 GiB device: it spills, but never to a disk that cannot be read
    hw = hardware(device_mem=8 * GiB, disk_to_host=0.0, host_to_disk=0.0)
    p = search(hw, opt("6.7b"), WORK).policy
    assert p.weights.disk == p.cache.disk == p.activations.disk == 0
    assert p.weights.host > 0


@pytest.mark.parametrize("tier", ["host", "disk"])
def test_a_tier_without_capacity_gets_nothing(tier):
    hw = hardware(device_mem=8 * GiB, **{f"{tier}_mem": 0}) if tier == "disk" else cpu_hardware(
        device_mem=8 * GiB)
    p = search(hw, opt("6.7b"), WORK).policy
    for placement in (p.weights, p.cache, p.activations):
        assert getattr(placement, tier) == 0


def test_more_memory_never_predicts_lower_throughput():
    model = opt("6.7b")
    for field, sizes in (("device_mem", [4, 8, 12, 16, 32]), ("host_mem", [0.5, 4, 8, 16, 64])):
        last = 0.0
        for gib in sizes:
            tput = search(hardware(**{field: int(gib * GiB)}), model, WORK).prediction.throughput
            assert tput >= last * (1 - 1e-6), (field, gib)
            last = tput


def test_weight_fractions_land_on_the_levels_the_runtime_realises():
    """Whole tensors: only some fractions are what they say. The plan moves to a level and re-solves the rest."""
    hw, model, work = cpu_hardware(device_mem=int(2.5 * GiB)), opt("1.3b"), Workload(32, 32, 16)
    free = search(hw, model, work, Policy(device="cpu"))
    assert not any(abs(free.policy.weights.device - lv) < 1e-3 for lv in (0.0, 0.25, 0.5, 1.0))
    levels = [0.0, 0.25, 0.5, 1.0]
    plan = search(hw, model, work, Policy(device="cpu"), weight_levels=lambda q, compute: levels)
    assert plan.policy.weights.device in levels and all(plan.prediction.fits(hw).values())
    assert plan.prediction.throughput <= free.prediction.throughput * (1 + 1e-6)  # fewer choices, no better


def test_plan_fits_every_tier_and_predicts_what_predict_says():
    hw = cpu_hardware(device_mem=6 * GiB)
    plan = search(hw, opt("1.3b"), Workload(32, 32, 64), Policy(device="cpu"))
    assert all(plan.prediction.fits(hw).values())
    again = predict(hw, opt("1.3b"), Workload(32, 32, 64), plan.policy)
    assert again.throughput == pytest.approx(plan.prediction.throughput)
    assert plan.policy.device == "cpu"  # fields the search does not choose come from the base policy


def test_fixed_batch_shape_is_kept():
    plan = search(hardware(), opt("125m"), WORK, batch_sizes=[4], num_batches=[2])
    assert (plan.policy.gpu_batch_size, plan.policy.num_gpu_batches) == (4, 2)


def test_infeasible_names_the_binding_tier_and_the_memory_that_would_work():
    hw = hardware(device_mem=2 * GiB, host_mem=4 * GiB, disk_mem=2 * GiB)  # 8 GiB in all for 13 GB of weights
    with pytest.raises(InfeasibleError) as e:
        search(hw, opt("6.7b"), WORK)
    msg = str(e.value)
    assert "binding tier is" in msg and "smallest" in msg and "GiB" in msg
    needed = float(msg.split("would work is ")[1].split(" GiB")[0])
    tier = msg.split("binding tier is ")[1].split(" memory")[0]
    roomy = hw.with_memory(**{tier: int((needed + 0.05) * GiB)})
    assert search(roomy, opt("6.7b"), WORK).prediction.throughput > 0  # the figure it names is enough


def test_batch_candidates_include_flexgen_like_shapes():
    assert batch_candidates(64) == [1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64]
    assert batch_candidates(5)[-1] == 5


@pytest.mark.parametrize("compress", [None, QuantConfig(bits=4, group_size=64)])
def test_opt175b_on_flexgens_t4_is_feasible(compress):
    hw = HardwareSpec.load("t4_flexgen")
    plan = search(hw, opt("175b"), Workload(prompt_len=512, gen_len=32), compressions=[(compress, compress)])
    assert all(plan.prediction.fits(hw).values())
    assert 0.01 < plan.prediction.throughput < 100  # FlexGen measured 0.69 (fp16) and 1.12 (4-bit) token/s
    assert plan.policy.weights.device < 1  # 350 GB (fp16) or ~90 GB (4-bit) never fit 16 GB


def test_compression_is_chosen_only_when_offered():
    hw = hardware(device_mem=8 * GiB)
    both = [(None, None), (QuantConfig(), QuantConfig())]
    assert search(hw, opt("6.7b"), WORK).policy.compress_weight is None
    plan = search(hw, opt("6.7b"), WORK, compressions=both)
    assert plan.policy.compress_weight is not None  # 4-bit weights fit the device; fp16 ones spill
    assert dataclasses.asdict(plan.policy)["weights"]["device"] == 1.0


def test_an_int8_plan_offers_no_weight_compression():
    hw = cpu_hardware(device_mem=4 * GiB, matmul={"float32": [[1, 20e9], [256, 200e9]],
                                                  "int8": [[1, 40e9], [256, 2000e9]]})
    plan = search(hw, opt("1.3b"), WORK, Policy(compute="int8"), compressions=[(QuantConfig(), None), (None, None)])
    assert plan.policy.compute == "int8" and plan.policy.compress_weight is None
    assert plan.prediction.memory["device"] <= 4 * GiB
    # allowed both, the search takes int8 where its rate wins; exact where the profile says int8 is slower
    assert search(hw, opt("1.3b"), WORK, computes=["exact", "int8"]).policy.compute == "int8"
    slow = cpu_hardware(device_mem=4 * GiB, matmul={**hw.matmul, "int8": [[1, 2e9], [256, 20e9]]})
    assert search(slow, opt("1.3b"), WORK, computes=["exact", "int8"]).policy.compute == "exact"


def test_a_scoring_plan_keeps_no_cache_on_disk():
    """WikiText's 2k-token windows in blocks of 32 on opt-1.3b: generating them needs a 13 GB KV cache, which an
    8 GiB machine puts on disk; scoring them keeps none, so the plan holds the weights and nothing goes to disk."""
    hw = cpu_hardware(device_mem=8 * GiB)
    shape = dict(batch_sizes=[8], num_batches=[4])
    gen = search(hw, opt("1.3b"), Workload(2000, 1, 32), **shape)
    score = search(hw, opt("1.3b"), Workload(2000, 1, 32, scoring=True), **shape)
    assert gen.policy.cache.disk > 0.5 and gen.prediction.memory["disk"] > 0
    assert score.prediction.memory["disk"] == 0 and score.policy.weights.device == 1.0
    assert score.policy.cache.device == 1.0  # nothing to place: the tie goes to the device


def test_the_plan_carries_this_machines_int4_kernel_crossover():

    hw = cpu_hardware(matmul={"float32": [[1, 20e9], [512, 400e9]], "int4": [[1, 100e9], [512, 100e9]]})
    plan = search(hw, opt("125m"), WORK, compressions=[(QuantConfig(bits=4, group_size=64), None)])
    assert plan.policy.int4_dense_rows == int4_dense_rows(hw, opt("125m")) < 512
