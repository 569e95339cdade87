"""Synthetic hardware and model specs for the cost-model and policy-search tests (no torch, no files)."""

from __future__ import annotations

from runtime.families.opt import spec_from_config
from runtime.hardware import HardwareSpec

G, GiB = 1e9, 2**30


def hardware(**overrides) -> HardwareSpec:
    """A GPU-like machine with round figures; `overrides` replace any field."""
    fields = dict(name="synthetic", accelerator=True, device_mem=16 * GiB, host_mem=64 * GiB, disk_mem=1000 * GiB,
                  host_to_device=10 * G, device_to_host=10 * G, disk_to_host=1 * G, host_to_disk=1 * G,
                  matmul={"float16": [[1, 1000 * G], [256, 10000 * G]], "float32": [[1, 20 * G], [256, 200 * G]],
                          "int4": [[1, 50 * G], [8, 100 * G]]},
                  attention_prefill=5000 * G, attention_decode=100 * G, cpu_attention=20 * G, dequantize=100 * G,
                  convert=10 * G, base_mem=0)
    fields.update(overrides)
    return HardwareSpec(**fields)


def cpu_hardware(**overrides) -> HardwareSpec:
    """A CPU-only host: RAM is the device tier, no host tier, no host <-> device link."""
    fields = dict(accelerator=False, device_mem=24 * GiB, host_mem=0, host_to_device=0.0, device_to_host=0.0,
                  base_mem=400 * 2**20)
    fields.update(overrides)
    return hardware(**fields)


def opt(name: str = "1.3b", dtype: str = "float16"):
    """The ModelSpec of a real OPT size, from its config.json fields (no weights needed)."""
    h, layers, heads = {"125m": (768, 12, 12), "1.3b": (2048, 24, 32), "6.7b": (4096, 32, 32),
                        "30b": (7168, 48, 56), "175b": (12288, 96, 96)}[name]
    return spec_from_config(dict(model_type="opt", hidden_size=h, num_hidden_layers=layers, num_attention_heads=heads,
                                 ffn_dim=4 * h, vocab_size=50272, max_position_embeddings=2048, torch_dtype=dtype))


def table_params(spec) -> int:
    """Parameters of the embedding tables (tokens and OPT's learned positions), which stay in memory whatever the
    placement (a tied head shares the token table)."""
    positions = (spec.max_positions + spec.position_offset) * spec.hidden_size if spec.positional == "learned" else 0
    return spec.vocab_size * spec.embed_dim + positions
