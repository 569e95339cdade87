"""The cost model's terms and the HardwareSpec's JSON form (pure functions: no torch, no files but JSON)."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace

import pytest

from runtime.cost_model import Workload, predict
from runtime.hardware import HardwareError, HardwareSpec, machine_key
from runtime.policy import Placement, Policy, QuantConfig
from runtime.weight_costs import int4_dense_rows
from tests.runtime.cost_fixtures import G, GiB, cpu_hardware, hardware, opt, table_params

WORK = Workload(prompt_len=64, gen_len=16, num_seqs=32)


def test_all_on_device_moves_nothing_and_keeps_every_byte_on_the_device():
    p = predict(hardware(device_mem=1000 * GiB), opt("1.3b"), WORK, Policy(gpu_batch_size=32))
    for phase in ("prefill", "decode"):
        assert {k: v for k, v in p.terms[phase].items() if k != "compute"} == pytest.approx(
            dict.fromkeys(("h2d", "d2h", "disk_read", "disk_write"), 0.0))
    assert p.memory["host"] == p.memory["disk"] == 0
    assert p.memory["device"] > 2 * 1.3e9  # fp16 weights at least
    assert p.bottleneck.endswith("compute")


def test_disk_weights_cost_their_bytes_at_the_disk_bandwidth():
    hw, model = hardware(), opt("1.3b")
    half = predict(hw, model, WORK, Policy(gpu_batch_size=32, weights=Placement(0.5, 0.0)))
    full = predict(hw, model, WORK, Policy(gpu_batch_size=32, weights=Placement(0.0, 0.0)))
    tables = table_params(model)
    per_layer = 2 * (model.num_parameters() - tables) / model.num_layers  # fp16 bytes of an average layer
    assert full.terms["decode"]["disk_read"] == pytest.approx(per_layer / hw.disk_to_host, rel=1e-6)
    assert half.terms["decode"]["disk_read"] == pytest.approx(full.terms["decode"]["disk_read"] / 2)
    assert full.memory["disk"] > half.memory["disk"] > 0 and full.bottleneck == "decode: disk_read"
    # the tied embedding table (and the positions) stay in host RAM where the placement says disk
    assert full.memory["disk"] == pytest.approx(per_layer * model.num_layers)
    assert full.memory["host"] > 2 * tables


def test_overlap_takes_the_max_and_no_overlap_the_sum():
    hw, model = hardware(), opt("1.3b")
    base = dict(gpu_batch_size=8, weights=Placement(0.2, 0.3))
    on, off = (predict(hw, model, WORK, Policy(overlap=o, **base)) for o in (True, False))
    assert off.decode_s == pytest.approx(sum(off.terms["decode"].values()) * 24 * (WORK.gen_len - 1) * 4)
    assert on.decode_s == pytest.approx(max(on.terms["decode"].values()) * 24 * (WORK.gen_len - 1) * 4)
    assert on.throughput > off.throughput


def test_compression_changes_bytes_and_compute():
    hw, model = cpu_hardware(), opt("1.3b")
    q = QuantConfig(bits=4, group_size=64)
    fp = predict(hw, model, WORK, Policy(gpu_batch_size=8, weights=Placement(0.0, 0.0)))
    q4 = predict(hw, model, WORK, Policy(gpu_batch_size=8, weights=Placement(0.0, 0.0), compress_weight=q))
    assert 0.2 < q4.memory["disk"] / fp.memory["disk"] < 0.4  # 4 bits + fp16 scale and min per 64, embeddings kept
    assert q4.terms["decode"]["disk_read"] < 0.4 * fp.terms["decode"]["disk_read"]
    assert q4.terms["decode"]["compute"] != fp.terms["decode"]["compute"]  # int4 kernel rate, no fp16 conversion
    cache = predict(hw, model, WORK, Policy(gpu_batch_size=8, compress_cache=q))
    plain = predict(hw, model, WORK, Policy(gpu_batch_size=8))
    assert cache.memory["device"] < plain.memory["device"]


def test_int8_compute_costs_int8_bytes_at_the_int8_rate():
    """`compute: int8`: matrices take a byte a weight (plus a scale a row) on every tier, and the decoder's products
    run at the profile's int8 rate; OPT's tied head stays at the compute dtype's."""
    model = opt("1.3b")
    hw = cpu_hardware(matmul={"float32": [[1, 20 * G], [256, 200 * G]], "int8": [[1, 40 * G], [256, 2000 * G]]})
    disk = dict(gpu_batch_size=8, weights=Placement(0.0, 0.0))
    fp = predict(hw, model, WORK, Policy(**disk))
    i8 = predict(hw, model, WORK, Policy(**disk, compute="int8"))
    assert 0.45 < i8.memory["disk"] / fp.memory["disk"] < 0.55  # fp16 checkpoint bytes on disk, int8 codes
    assert 0.45 < i8.terms["decode"]["disk_read"] / fp.terms["decode"]["disk_read"] < 0.55
    ram = dict(gpu_batch_size=8)
    fp, i8 = predict(hw, model, WORK, Policy(**ram)), predict(hw, model, WORK, Policy(**ram, compute="int8"))
    assert i8.terms["prefill"]["compute"] < 0.3 * fp.terms["prefill"]["compute"]  # 10x the rate, less the head
    slow = cpu_hardware(matmul={**hw.matmul, "int8": [[1, 20 * G], [256, 200 * G]]})
    assert predict(slow, model, WORK, Policy(**ram, compute="int8")).terms["decode"]["compute"] == pytest.approx(
        fp.terms["decode"]["compute"], rel=1e-9)  # the same rates: the same compute, the head included
    with pytest.raises(HardwareError, match="no matmul rate for int8"):
        predict(cpu_hardware(), model, WORK, Policy(**ram, compute="int8"))


def test_more_sequences_than_a_block_take_more_blocks():
    hw, model = hardware(), opt("125m")
    one = predict(hw, model, Workload(64, 16, 16), Policy(gpu_batch_size=16))
    four = predict(hw, model, Workload(64, 16, 64), Policy(gpu_batch_size=16))
    assert four.prefill_s + four.decode_s == pytest.approx(4 * (one.prefill_s + one.decode_s))
    assert four.throughput == pytest.approx(one.throughput)


def test_matmul_rate_interpolates_in_log_m_and_clamps():
    hw = hardware(matmul={"float32": [[1, 10.0], [100, 30.0]]})
    assert hw.matmul_rate("float32", 1) == 10 and hw.matmul_rate("float32", 10) == pytest.approx(20)
    assert hw.matmul_rate("float32", 1e6) == 30
    with pytest.raises(HardwareError, match="no matmul rate for int4"):
        hw.matmul_rate("int4", 8)


def test_hardware_json_round_trip_and_clear_errors(tmp_path):
    hw = cpu_hardware(disk_to_host=1.5 * G)
    path = hw.save(tmp_path / "hw.json")
    assert HardwareSpec.load(path) == hw
    data = json.loads(path.read_text())
    for mutate, match in ((lambda d: d.update(warp=1), "unknown keys \\['warp'\\]"),
                          (lambda d: d.pop("disk_to_host"), "missing keys \\['disk_to_host'\\]"),
                          (lambda d: d.update(device_mem=-1), "device_mem must be"),
                          (lambda d: d.update(matmul={"float32": [[0, 1]]}), "matmul"),
                          (lambda d: d["calibration"].update(io=0), "must be > 0")):
        bad = json.loads(json.dumps(data))
        mutate(bad)
        path.write_text(json.dumps(bad))
        with pytest.raises(HardwareError, match=match):
            HardwareSpec.load(path)
    path.write_text("{not json")
    with pytest.raises(HardwareError, match="not valid JSON"):
        HardwareSpec.load(path)
    with pytest.raises(HardwareError, match="t4_flexgen"):
        HardwareSpec.load(tmp_path / "missing.json")
    assert HardwareSpec.load("t4_flexgen").accelerator
    assert machine_key() == machine_key() and "/" not in machine_key()


def test_cost_model_and_search_do_not_import_torch():
    code = ("import sys, runtime.cost_model, runtime.policy_search, runtime.hardware; "
            "print('torch' in sys.modules, 'cvxpy' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


def test_cpu_casts_inside_the_matmul_and_holds_a_block_not_a_layer():
    """On a CPU, fp16 weights computed in fp32 cost the matmul alone (runtime.kernels.CastWeight) and a scratch
    block, wherever they live; an accelerator converts an fp32 checkpoint's disk weights once per step."""
    model = opt("1.3b")
    hw = cpu_hardware()
    kept, converted = (predict(hw, model, WORK, Policy(gpu_batch_size=8, weight_format=f))
                       for f in ("checkpoint", "compute"))
    on_disk = predict(hw, model, WORK, Policy(gpu_batch_size=8, weights=Placement(0.0, 0.0)))
    for phase in ("prefill", "decode"):
        assert kept.terms[phase]["compute"] == pytest.approx(converted.terms[phase]["compute"])
        assert on_disk.terms[phase]["compute"] == pytest.approx(converted.terms[phase]["compute"])
    weights = 2 * model.num_parameters()  # fp16 bytes
    # half the weight bytes, and no fp32 copy of a layer (200 MB) or of the head (412 MB) beside them
    assert converted.memory["device"] - kept.memory["device"] == pytest.approx(weights - 8 * 2**20, rel=0.01)
    fp32 = opt("1.3b", dtype="float32")
    gpu = [predict(hardware(), fp32, WORK, Policy(gpu_batch_size=8, weights=Placement(0.0, p))) for p in (1.0, 0.0)]
    assert gpu[1].terms["decode"]["compute"] > gpu[0].terms["decode"]["compute"]


def test_a_scoring_workload_keeps_no_cache_and_runs_the_head_at_every_position():
    """Scoring (`Engine.score`, `score_rolling`) is one prefill that keeps no KV cache: wherever the policy puts
    the cache, it costs no memory and no disk writes; the head's FLOPs count at every position, not the last."""
    hw, model = cpu_hardware(device_mem=1000 * GiB), opt("1.3b")
    on_disk = Policy(gpu_batch_size=8, num_gpu_batches=4, cache=Placement(0.0, 0.0))
    gen = predict(hw, model, Workload(2000, 1, 32), on_disk)
    score = predict(hw, model, Workload(2000, 1, 32, scoring=True), on_disk)
    assert gen.memory["disk"] > 12 * GiB and score.memory["disk"] == 0
    assert gen.terms["prefill"]["disk_write"] > 0 and score.terms["prefill"]["disk_write"] == 0
    head = 2 * model.hidden_size * model.vocab_size * 32 * 1999 / model.num_layers  # FLOPs, spread over the layers
    extra = score.terms["prefill"]["compute"] - gen.terms["prefill"]["compute"]
    assert extra == pytest.approx(head / hw.matmul_rate("float32", 8 * 2000), rel=0.01)
    with pytest.raises(ValueError, match="gen_len must be 1"):
        Workload(2000, 4, 32, scoring=True)
    long_gen, long_score = Workload(2000, 8), Workload(4000, 1, scoring=True)
    assert long_gen.covers(Workload(100, 1, scoring=True)) and not long_score.covers(Workload(100, 1))
    assert not long_gen.covers(long_score) and long_score.covers(Workload(4000, 1, scoring=True))


def test_a_shared_prefix_is_computed_once_per_micro_batch_where_the_engine_shares_it():
    """Few-shot prompts (HELM's MMLU: 5 examples before each question): the prefix's matmuls run once per
    micro-batch, the rows' own tokens once per row; decode and memory do not change. Under the engine's threshold,
    or for scoring under half the width, nothing is shared (`runtime.shapes.prefix_computed_once`)."""
    hw, model = cpu_hardware(device_mem=1000 * GiB), opt("1.3b")
    policy = Policy(gpu_batch_size=8, num_gpu_batches=2)
    plain = predict(hw, model, Workload(600, 4, 16), policy)
    shared = predict(hw, model, Workload(600, 4, 16, shared_prefix=500), policy)
    rows = 2 * (8 * 100 / hw.matmul_rate("float32", 800) + 500 / hw.matmul_rate("float32", 500))  # FLOPs per token
    assert shared.prefill_s / plain.prefill_s == pytest.approx(rows / (16 * 600 / hw.matmul_rate("float32", 4800)),
                                                                rel=0.05)
    assert shared.decode_s == plain.decode_s and shared.memory == plain.memory
    assert predict(hw, model, Workload(600, 4, 16, shared_prefix=15), policy).prefill_s == plain.prefill_s
    score = Workload(600, 1, 16, scoring=True)
    assert predict(hw, model, replace(score, shared_prefix=299), policy).prefill_s == \
        predict(hw, model, score, policy).prefill_s
    assert predict(hw, model, replace(score, shared_prefix=300), policy).prefill_s < \
        predict(hw, model, score, policy).prefill_s
    with pytest.raises(ValueError, match="shared_prefix"):
        Workload(600, 4, shared_prefix=600)


def test_int4_steps_switch_to_the_dense_gemm_where_the_profile_says_it_wins():
    """`int4_dense_rows`: the kernel (flat 100 GFLOP/s here) below the crossover, dequantize + fp32 GEMM above it;
    the cost model times each step by the path the runtime takes at its rows."""
    model, q4 = opt("125m"), QuantConfig(bits=4, group_size=64)
    fast_gemm = cpu_hardware(matmul={"float32": [[1, 20 * G], [64, 100 * G], [512, 400 * G]],
                                     "int4": [[1, 100 * G], [512, 100 * G]]}, dequantize=2 * G)
    rows = int4_dense_rows(fast_gemm, model)
    assert 64 < rows < 512
    slow_gemm = cpu_hardware(matmul={"float32": [[1, 20 * G], [512, 90 * G]], "int4": [[1, 100 * G], [512, 100 * G]]})
    assert int4_dense_rows(slow_gemm, model) > 2**30  # the kernel always wins: never dense
    work = Workload(prompt_len=128, gen_len=8, num_seqs=8)
    kernel_only = predict(fast_gemm, model, work, Policy(gpu_batch_size=8, compress_weight=q4, int4_dense_rows=2**30))
    crossover = predict(fast_gemm, model, work, Policy(gpu_batch_size=8, compress_weight=q4, int4_dense_rows=rows))
    assert crossover.prefill_s < kernel_only.prefill_s  # 1024-row prefill steps: dense is faster
    assert crossover.decode_s == kernel_only.decode_s  # 8-row decode steps: the kernel either way
