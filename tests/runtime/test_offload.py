"""Offloading never changes results: every placement x overlap x micro-batching equals the in-memory run."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

from runtime import Engine, Policy
from runtime.disk import OffloadError, span_capacity
from runtime.policy import Placement, Tier
from tests.runtime.cost_fixtures import table_params

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [12, 13], [14, 15, 16, 17], [3] * 9, [20, 21, 22, 23, 24], [30, 31, 32]]
PLACEMENTS = {
    "all-device": {},
    "all-host": {"weights": Placement(0, 1), "cache": Placement(0, 1), "activations": Placement(0, 1)},
    "all-disk": {"weights": Placement(0, 0), "cache": Placement(0, 0), "activations": Placement(0, 0)},
    "weights-30-30-40": {"weights": Placement(0.3, 0.3)},
    "cache-disk": {"cache": Placement(0, 0)},
    "cache-split": {"cache": Placement(0.2, 0.3)},
    "activations-disk": {"activations": Placement(0, 0)},
}


@pytest.fixture(scope="module")
def reference(tiny_opt):
    path, _ = tiny_opt("pre")
    engine = Engine(path, Policy(gpu_batch_size=2))
    return (engine.trace_logits(PROMPTS, [[40, 41, 42]] * len(PROMPTS)),
            engine.generate(PROMPTS, 10, stop_at_eos=False).generations)


@pytest.mark.parametrize("num_batches", [1, 3])
@pytest.mark.parametrize("overlap", [True, False])
@pytest.mark.parametrize("placement", list(PLACEMENTS))
def test_placements_give_identical_results(tiny_opt, reference, tmp_path, placement, overlap, num_batches):
    path, _ = tiny_opt("pre")
    policy = Policy(gpu_batch_size=2, num_gpu_batches=num_batches, overlap=overlap, **PLACEMENTS[placement])
    engine = Engine(path, policy, offload_dir=tmp_path)
    trace = engine.trace_logits(PROMPTS, [[40, 41, 42]] * len(PROMPTS))
    for a, b in zip(reference[0], trace):
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    gens = engine.generate(PROMPTS, 10, stop_at_eos=False).generations
    assert [g.output_ids for g in gens] == [g.output_ids for g in reference[1]]
    if policy.offloads():  # the disk path really ran
        assert engine.runner.io.bytes_read > 0 and engine.runner.io.bytes_written + engine.weights.bytes_by_tier()[
            "disk"] > 0
    engine.close()
    assert not any(tmp_path.glob("run-*/*")), "scratch files left behind"


def test_weight_bytes_follow_the_placement(tiny_opt, tmp_path):
    """Over the decoder layers each tier holds its fraction of the bytes within the largest tensor (whole
    tensors move; a cut takes the tensor it falls in in some layers and not in others)."""
    path, _ = tiny_opt("pre")
    placement = Placement(0.3, 0.3)
    engine = Engine(path, Policy(weights=placement), offload_dir=tmp_path)
    decoder = [s for layer in engine.weights.layers[1:-1] for s in layer.values()]
    total, largest = sum(s.nbytes for s in decoder), max(s.nbytes for s in decoder)
    for tier, fraction in placement.fractions().items():
        assert abs(sum(s.nbytes for s in decoder if s.tier == tier) - fraction * total) <= largest, tier
    by_tier = engine.weights.bytes_by_tier()
    stats = engine.generate(PROMPTS[:2], 4).stats
    assert stats.peak_memory["disk"] >= by_tier["disk"] > 0


def test_cuts_between_tensors_split_the_layers_in_proportion():
    """opt-1.3b's layer (LN, qkv, out, LN, fc1, fc2 and biases, in MB) in 24 layers: at any placement each
    tier's bytes are within one tensor of its fraction, the layers keeping a tensor spread along the model."""
    from runtime.weights import assign_tiers, layer_ranks

    sizes = [1, 25, 1, 8, 1, 1, 34, 1, 34, 1]
    specs = [type("Spec", (), {"in_memory": False})()] * len(sizes)
    ranks = layer_ranks([[206]] + [sizes] * 24 + [[1]])
    assert ranks[0] == ranks[-1] == 0.5 and sorted(ranks[1:25]) == [(i + 0.5) / 24 for i in range(24)]
    for device in [i / 20 for i in range(21)]:
        for host in [i / 20 for i in range(21 - round(device * 20))]:
            placement = Placement(device, host)
            layers = [assign_tiers(specs, sizes, placement, Tier.DEVICE, r) for r in ranks[1:25]]
            for tier, fraction in placement.fractions().items():
                got = sum(size for tiers in layers for size, t in zip(sizes, tiers) if t == tier)
                assert abs(got - fraction * 24 * sum(sizes)) <= max(sizes), (placement, tier)
    qkv = [tiers[1] for tiers in (assign_tiers(specs, sizes, Placement(0.13, 0), Tier.DEVICE, r)
                                  for r in ranks[1:25])]
    assert qkv.count(Tier.DEVICE) == 12 and Tier.DEVICE in qkv[:2] and Tier.DEVICE in qkv[-2:]


def test_tables_and_head_stay_in_memory_when_the_weights_go_to_disk(tiny_opt, tmp_path):
    """The tied head reads the whole embedding table every step: staged from disk it would take as much RAM as
    keeping it, and a read per step (twice, into both staging slots, before this rule)."""
    path, _ = tiny_opt("pre")
    engine = Engine(path, Policy(weights=Placement(0, 0)), offload_dir=tmp_path)
    spec = engine.spec
    tables = 4 * table_params(spec)
    assert engine.weights.bytes_by_tier()["device"] == tables  # fp32 in RAM, the CPU's device tier
    store = engine.weights
    kept = [store.layers[0]["tokens"], store.layers[0]["positions"], store.layers[-1]["lm_head"]]
    assert all(s.tier != Tier.DISK for s in kept)
    engine.generate(PROMPTS[:2], 3)
    layer = max(span_capacity([r for s in store.layers[i].values() if s.tier == Tier.DISK for r in s.regions])
                for i in range(1, spec.num_layers + 1))  # the decoder layers'
    assert store._staging and all(buf.numel() == layer for buf in store._staging.values())  # no table staged
    engine.close()


def test_disk_peak_counts_the_cache_blocks_written(tiny_opt, tmp_path):
    """Measured, not planned: the KV cache files are sparse, and only the blocks written count."""
    path, _ = tiny_opt("pre")
    engine = Engine(path, Policy(gpu_batch_size=2, cache=Placement(0, 0)), offload_dir=tmp_path)
    short = engine.generate(PROMPTS[:2], 1).stats
    assert 0 < short.peak_memory["disk"] <= short.planned_memory["disk"] + 4096 * 2 * engine.spec.num_layers
    longer = engine.generate(PROMPTS[:2], 30).stats
    assert longer.peak_memory["disk"] > short.peak_memory["disk"]  # more tokens written, more blocks
    engine.close()


def test_cache_pool_keeps_only_the_current_shape(tiny_opt):
    """Cache tensors are reused across calls of one shape; a call of another shape frees the old ones, so a
    suite of varying request lengths never holds more cache than its current call (the plan's figure)."""
    path, _ = tiny_opt("pre")
    engine = Engine(path, Policy(gpu_batch_size=2))
    pooled = lambda: {key for key, free in engine.runner._pool.items() if free}  # noqa: E731
    engine.generate(PROMPTS[:2], 4, stop_at_eos=False)
    first = pooled()
    engine.generate(PROMPTS[:2], 4, stop_at_eos=False)
    assert pooled() == first and first  # the same shape: reused
    engine.generate(PROMPTS[:2], 9, stop_at_eos=False)
    assert pooled() and not pooled() & first
    engine.close()


def test_model_larger_than_the_ram_budget(tiny_opt, tmp_path):
    """The embedding tables and 5% of the rest in RAM (whole tensors: on this tiny model, none), under a third
    of the weights: the run still equals the all-in-RAM run."""
    path, _ = tiny_opt("350m", "safetensors", torch.float16)
    ref = Engine(path).generate(PROMPTS, 8, stop_at_eos=False).generations
    engine = Engine(path, Policy(weights=Placement(0.05, 0), cache=Placement(0, 0), num_gpu_batches=2,
                                 gpu_batch_size=2), offload_dir=tmp_path)
    assert engine.weights.bytes_by_tier()["disk"] > 2 * engine.weights.nbytes
    out = engine.generate(PROMPTS, 8, stop_at_eos=False).generations
    assert [g.output_ids for g in out] == [g.output_ids for g in ref]


def test_bin_checkpoint_weights_are_prepared_once_and_rebuilt_when_damaged(tiny_opt, tmp_path):
    path, _ = tiny_opt("pre", "bin")
    policy = Policy(weights=Placement(0, 0))
    ref = Engine(path).generate(PROMPTS, 6, stop_at_eos=False).generations
    Engine(path, policy, offload_dir=tmp_path).close()
    (folder,) = (tmp_path / "weights").iterdir()
    files = sorted(folder.glob("*.bin"))
    stamp = [f.stat().st_mtime_ns for f in files]
    Engine(path, policy, offload_dir=tmp_path).close()
    assert [f.stat().st_mtime_ns for f in files] == stamp  # reused, not rewritten
    big = max(files, key=lambda f: f.stat().st_size)
    with open(big, "r+b") as f:  # corrupt a sampled block in place
        f.write(b"\x00" * 4096)
    engine = Engine(path, policy, offload_dir=tmp_path)
    out = engine.generate(PROMPTS, 6, stop_at_eos=False).generations
    assert [g.output_ids for g in out] == [g.output_ids for g in ref]
    big.unlink() if big.exists() else None
    (folder2,) = (tmp_path / "weights").iterdir()
    assert not list((tmp_path / "weights").glob("*.tmp-*"))
    assert folder2 == folder


def test_unusable_offload_folder(tiny_opt, tmp_path):
    path, _ = tiny_opt("pre")
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(OffloadError, match="cannot be used.*--offload-dir"):
        Engine(path, Policy(cache=Placement(0, 0)), offload_dir=blocker / "sub")
    if os.geteuid() != 0:  # root ignores permissions
        ro = tmp_path / "ro"
        ro.mkdir(mode=0o500)
        with pytest.raises(OffloadError):
            Engine(path, Policy(cache=Placement(0, 0)), offload_dir=ro)


def test_disk_full_during_preparation_leaves_nothing_trusted(tiny_opt, tmp_path, monkeypatch):
    """ENOSPC from the file system while the prepared weights are written: no folder of them is left to be trusted,
    and with room again they are prepared."""
    import errno

    path, _ = tiny_opt("pre", "bin")
    real = os.replace
    weights = tmp_path / "weights"

    def full_disk(src, dst, *args, **kwargs):
        if Path(dst).parent == weights:  # the prepared folder, complete, taking its name
            assert any(Path(src).iterdir())  # its files were written
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "replace", full_disk)
    with pytest.raises(OffloadError, match="disk is full"):
        Engine(path, Policy(weights=Placement(0, 0)), offload_dir=tmp_path)
    assert not list(weights.iterdir())
    monkeypatch.setattr(os, "replace", real)
    Engine(path, Policy(weights=Placement(0, 0)), offload_dir=tmp_path).close()
    assert len(list((tmp_path / "weights").iterdir())) == 1


def test_disk_full_while_writing_the_kv_cache_is_named_and_the_engine_goes_on(tiny_opt, tmp_path, monkeypatch):
    """ENOSPC mid-generation, writing the KV cache to disk: one error naming the file, the bytes it needed and the
    space free; with room again the same engine generates what a fresh one does."""
    import errno

    path, _ = tiny_opt("pre", "bin")
    engine = Engine(path, Policy(cache=Placement(0, 0)), offload_dir=tmp_path)
    real = os.pwrite

    def full(fd, data, offset):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(os, "pwrite", full)
    with pytest.raises(OffloadError, match=r"cannot write .*: no room to write in .* \(No space left on device: "
                                           r"needed [\d,]+ bytes, [\d,]+ bytes free\)"):
        engine.generate([[5, 6, 7, 8]], 4)
    monkeypatch.setattr(os, "pwrite", real)
    again = engine.generate([[5, 6, 7, 8]], 4).generations
    engine.close()
    fresh = Engine(path, Policy(cache=Placement(0, 0)), offload_dir=tmp_path)
    assert again == fresh.generate([[5, 6, 7, 8]], 4).generations
    fresh.close()


def test_weight_store_clocks_its_fetches(tiny_opt, tmp_path):
    """The runtime's own timing of weight fetches (what benchmarks and calibration read, no monkeypatching)."""
    path, _ = tiny_opt("pre", "bin")
    engine = Engine(path, Policy(weights=Placement(0, 0)), offload_dir=tmp_path)
    assert engine.weights.fetch_s == engine.weights.wait_s == 0.0
    engine.generate([[5, 6, 7, 8]], 4)
    assert 0.0 <= engine.weights.wait_s <= engine.weights.fetch_s and engine.weights.fetch_s > 0.0
    engine.close()


def test_placement_choose_and_validation():
    p = Placement(0.3, 0.5)
    assert [p.choose(x) for x in (0.1, 0.5, 0.9)] == [Tier.DEVICE, Tier.HOST, Tier.DISK]
    assert p.disk == pytest.approx(0.2)
    from runtime import PolicyError

    with pytest.raises(PolicyError, match="exceed 1"):
        Placement(0.6, 0.6)
    with pytest.raises(PolicyError, match=r"in \[0, 1\]"):
        Placement(-0.1, 0)
    pol = Policy.from_percent(20, 30, 0, 100, 100, 0)
    assert pol.weights == Placement(0.2, 0.3) and pol.cache.host == 1 and pol.offloads()
    assert Policy.from_json(pol.to_json()) == pol
    with pytest.raises(PolicyError, match="unknown policy fields"):
        Policy.from_json({"batch": 3})


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_prefetch_depth_and_interleaved_calls_never_use_stale_buffers(tiny_opt, reference, tmp_path, depth):
    path, _ = tiny_opt("pre")
    engine = Engine(path, Policy(gpu_batch_size=2, weights=Placement(0, 0)), offload_dir=tmp_path)
    engine.weights.depth = depth
    ref_engine = Engine(path)
    contexts, conts = [[5, 6, 7], [8, 9]], [[10, 11], [12]]
    want = [s.logprob for s in ref_engine.score(contexts, conts).scores]
    for _ in range(2):  # generate leaves layer 0 prefetched; score stops before the head, and so on
        gens = engine.generate(PROMPTS, 10, stop_at_eos=False).generations
        assert [g.output_ids for g in gens] == [g.output_ids for g in reference[1]]
        assert [s.logprob for s in engine.score(contexts, conts).scores] == pytest.approx(want, abs=1e-5)
        rolled = engine.score_rolling([list(range(3, 40))], window=8)
        want_rolled = ref_engine.score_rolling([list(range(3, 40))], window=8).token_logprobs[0]
        assert rolled.token_logprobs[0] == pytest.approx(want_rolled, abs=1e-5)


def test_read_ahead_skips_layers_without_disk_weights_and_wraps_into_the_next_step(tiny_opt, tmp_path):
    """The embedding and the head hold no disk weights: they must not use up the read-ahead, or the disk idles
    at every step boundary while they compute (the next step's first decoder layer would start at the head)."""
    path, _ = tiny_opt("pre")
    engine = Engine(path, Policy(weights=Placement(0, 0)), offload_dir=tmp_path)
    store, n = engine.weights, len(engine.weights.layers)
    kept = [i for i, layer in enumerate(store.layers) if all(s.tier != Tier.DISK for s in layer.values())]
    assert 0 in kept  # the embedding; the head has its final norm on disk here
    disk = [i for i in range(n) if i not in kept]
    for i in range(n):
        asked = store.read_ahead(i, n, wrap=True)
        after = disk[disk.index(i) + 1:] if i in disk else [j for j in disk if j > i]
        assert asked == (after + [j for j in disk if j < i])[:store.depth]
        store.fetch_ahead(i, n, wrap=True)
        assert set(asked) <= set(store.in_flight) and i not in store.in_flight  # read ahead; layer i fetched
    # a pass that stops before the head (scoring) never wraps
    assert store.read_ahead(n - 2, n - 1, wrap=False) == []
    engine.close()
