"""Compute device and dtype, and peak-memory measurement per tier.

CPU: always fp32 compute (measured here: fp16 GEMM 0.2 GFLOP/s, bf16 ~49, fp32 ~200).
CUDA: fp16 compute, or bf16 when the checkpoint is bf16 and the GPU computes bf16 natively (fp16 may overflow a
bf16 model's range).
"""

from __future__ import annotations

import resource
from dataclasses import dataclass

import torch

from runtime.errors import PolicyError


def resolve_device(name: str) -> torch.device:
    """A concrete device (`cuda` becomes `cuda:N`, so it compares equal to tensors' devices)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise PolicyError(f"device {name!r} was asked for but this machine has no CUDA device; use --device cpu")
        if device.index is None:
            device = torch.device("cuda", torch.cuda.current_device())
        if device.index >= torch.cuda.device_count():
            raise PolicyError(f"device {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return device


def compute_dtype(device: torch.device, storage: torch.dtype) -> torch.dtype:
    """fp32 on the CPU; on CUDA bf16 for a bf16 checkpoint where the GPU has native bf16 (Ampere and later: a T4
    only emulates it, slowly), else fp16 (`runtime.cost_model.compute_dtype` plans the same)."""
    if device.type == "cpu":
        return torch.float32
    return torch.bfloat16 if storage == torch.bfloat16 and native_bf16() else torch.float16


def native_bf16() -> bool:
    return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)


def read_status(field: str) -> int | None:
    """Bytes of a `/proc/self/status` field such as `VmHWM` (peak RSS) or `VmRSS`; None where there is none."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


@dataclass
class PeakMemory:
    """Peak bytes per tier over a span: `host` is the process's peak RSS, `device` CUDA allocations."""

    device: torch.device

    def reset(self) -> None:
        try:  # Linux: writing 5 resets VmHWM, so the peak is this call's, not the process's
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def read(self) -> dict[str, int]:
        host = read_status("VmHWM") or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        peaks = {"host": host}
        if self.device.type == "cuda":
            peaks["device"] = torch.cuda.max_memory_allocated(self.device)
        return peaks
