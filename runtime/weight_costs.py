"""How the cost model sees a policy's weights: their bytes per tier as the runtime stores them, and which kernel
computes with them (the compute dtype's GEMM, the fused int4 kernel, or int8 x int8 with `compute: int8`, whose
rate the profile measures through `runtime.int8`, the activations' quantization included). Torch-free."""

from __future__ import annotations

from dataclasses import dataclass

from runtime.hardware import HardwareSpec
from runtime.policy import INT4_DENSE_ROWS, Policy, QuantConfig, WeightFormat, int4_kernel_fits, int8_nbytes, layout_of
from runtime.shapes import shapes
from runtime.spec import ModelSpec

TIERS = ("device", "host", "disk")
DTYPE_BYTES = {"float16": 2, "bfloat16": 2, "float32": 4, "float64": 8}


def compute_dtype(hw: HardwareSpec, model: ModelSpec) -> str:
    """What the runtime computes in (`runtime.device.compute_dtype`): fp32 on a CPU; on an accelerator bf16 for a
    bf16 checkpoint where the device has native bf16 (the profile then has its rate), else fp16."""
    if not hw.accelerator:
        return "float32"
    return "bfloat16" if model.torch_dtype == "bfloat16" and "bfloat16" in hw.matmul else "float16"


def uses_int4_kernel(hw: HardwareSpec, model: ModelSpec, q: QuantConfig | None) -> bool:
    """Whether the runtime computes compressed weights in the fused CPU int4 kernel (runtime.compressed)."""
    return (q is not None and not hw.accelerator and "int4" in hw.matmul
            and all(int4_kernel_fits(shape, q) for shape in shapes(model).decoder_matmuls))


def head_kind(hw: HardwareSpec, model: ModelSpec, policy: Policy) -> str:
    """The `HardwareSpec.matmul` rate the head's product runs at: a tied head is the token table, kept as stored and
    computed in the compute dtype; an untied one is a matrix like the decoder's, int8 with `compute: int8`. (The
    int4 kernel's head is counted at the compute dtype's rate: the vocabulary projection is a small part.)"""
    return "int8" if policy.compute == "int8" and not model.tied_embeddings else compute_dtype(hw, model)


def int4_unpack_rate(hw: HardwareSpec) -> float:
    """Values/s of `Int4Weight`'s dequantization into fp32 blocks (profiles without it: the grouped one's)."""
    return hw.int4_dequantize or hw.dequantize


def int4_dense_rows(hw: HardwareSpec, model: ModelSpec, candidates=(16, 32, 64, 96, 128, 192, 256, 384, 512)) -> int:
    """`Policy.int4_dense_rows` for `model` on `hw`: the fewest rows from which a step of the model's decoder matmuls
    runs faster as dequantize + fp32 GEMM than in the fused int4 kernel (`Int4Weight`); past the last candidate,
    never dense (a product that large is a prefill the kernel wins anyway only on a machine without a fast GEMM)."""
    if hw.accelerator or "int4" not in hw.matmul:
        return INT4_DENSE_ROWS
    params = sum(n * k for n, k in shapes(model).decoder_matmuls)
    for m in candidates:
        kernel = 2 * m * params / hw.matmul_rate("int4", m)
        dense = 2 * m * params / hw.matmul_rate("float32", m) + params / int4_unpack_rate(hw)
        if dense < kernel:
            return m
    return 2**31 - 1


@dataclass(frozen=True)
class WeightBytes:
    """Bytes of a model's weights as the runtime stores them (`runtime.weights.WeightStore`)."""

    stored: dict[str, float]
    """tier -> every weight in that tier's form: packed when compressed; else in the compute dtype on the device
    (the checkpoint's with `weight_format=checkpoint` on a CPU), the checkpoint's in host RAM of an accelerator
    and on disk."""
    kept: dict[str, float]
    """tier -> the weights a disk placement keeps in memory (`WeightSpec.in_memory`: the tables, an untied head)
    in that tier's form; the disk holds the rest."""


def weight_bytes(hw: HardwareSpec, model: ModelSpec, policy: Policy) -> WeightBytes:
    z = shapes(model)
    ckpt = DTYPE_BYTES.get(model.torch_dtype, 4)
    cdt = DTYPE_BYTES[compute_dtype(hw, model)]
    in_ram = cdt if policy.weight_format == WeightFormat.COMPUTE else ckpt  # the CPU's device tier is RAM
    form = {"device": cdt if hw.accelerator else in_ram, "host": ckpt if hw.accelerator else in_ram, "disk": ckpt}
    qw = policy.compress_weight

    def matrices(shapes_: tuple[tuple[int, int], ...], tier: str) -> float:
        if policy.compute == "int8":
            return sum(int8_nbytes(s) for s in shapes_)
        if qw is None:
            return sum(n * k for n, k in shapes_) * form[tier]
        return sum(layout_of(s, qw, qw.axis == "output").nbytes for s in shapes_)

    rest = z.lookup_params + z.other_params
    return WeightBytes({t: matrices(z.matrices, t) + rest * form[t] for t in TIERS},
                       {t: matrices(z.kept_matrices, t) + z.lookup_params * form[t] for t in TIERS})
