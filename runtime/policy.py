"""`Policy`: how the engine runs a model (batch shape, device, storage format); validated, frozen."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from enum import Enum

from runtime.errors import PolicyError


class WeightFormat(str, Enum):
    COMPUTE = "compute"
    """Convert each weight to the compute dtype once, at load (fastest; fp16 checkpoints double in size on CPU)."""
    CHECKPOINT = "checkpoint"
    """Keep the checkpoint's dtype in memory; convert one layer at a time into reused compute buffers."""


@dataclass(frozen=True)
class Policy:
    """Execution policy. A block of `gpu_batch_size * num_gpu_batches` sequences shares each loaded layer."""

    gpu_batch_size: int = 16
    """Sequences per micro-batch (one forward call of a layer)."""
    num_gpu_batches: int = 1
    """Micro-batches per block; each loaded layer is reused by all of them before the next layer."""
    device: str = "auto"
    """Compute device: `auto` (CUDA when present, else CPU), `cpu`, `cuda` or `cuda:N`."""
    weight_format: WeightFormat = WeightFormat.COMPUTE
    """In-memory format of weights, see `WeightFormat`."""

    def __post_init__(self) -> None:
        for name in ("gpu_batch_size", "num_gpu_batches"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise PolicyError(f"Policy.{name} must be an integer >= 1, got {value!r}")
        if not (self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:")):
            raise PolicyError(f"Policy.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")
        try:
            object.__setattr__(self, "weight_format", WeightFormat(self.weight_format))
        except ValueError:
            raise PolicyError(f"Policy.weight_format must be one of {[f.value for f in WeightFormat]}, "
                              f"got {self.weight_format!r}") from None

    @property
    def block_size(self) -> int:
        return self.gpu_batch_size * self.num_gpu_batches

    def to_json(self) -> dict:
        d = asdict(self)
        d["weight_format"] = self.weight_format.value
        return d
