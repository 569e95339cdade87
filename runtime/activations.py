"""Hidden states between layers, per micro-batch, in memory or on disk (policy `activations`).

A micro-batch whose activations live on disk writes each layer's output to its scratch file in the
background and reads it back (prefetched one micro-batch ahead) before the next layer runs. Token ids
going in and logits coming out always stay in memory.
"""

from __future__ import annotations

import torch

from runtime.disk import DiskIO, Pending, Region
from runtime.kv_cache import StagingRing
from runtime.offload import OffloadDir
from runtime.policy import Placement, Tier


class Activations:
    def __init__(self, inputs: list[torch.Tensor], placement: Placement, device: torch.device,
                 io: DiskIO | None = None, offload: OffloadDir | None = None, ring: StagingRing | None = None) -> None:
        n = len(inputs)
        self.device, self.io, self.ring = device, io, ring
        self.tiers = [placement.choose((k + 0.5) / n) for k in range(n)]
        self.mem: list[torch.Tensor | None] = list(inputs)
        self.files = [offload.scratch_file("act", 0) if t == Tier.DISK else None
                      for k, t in enumerate(self.tiers)]
        self.meta: list[tuple | None] = [None] * n  # (shape, dtype) of what is on disk
        self.writes: list[Pending | None] = [None] * n
        self.loads: dict[int, tuple[torch.Tensor, Pending]] = {}

    def put(self, k: int, x: torch.Tensor, offload: bool) -> None:
        """Keep micro-batch k's new hidden states (B, T, h), on disk when placed there and `offload`."""
        if self.files[k] is None or not offload:
            # on CUDA, host-placed activations wait in host RAM; on a CPU host, device and host are one
            self.mem[k] = x.to("cpu") if offload and self.tiers[k] == Tier.HOST else x
            return
        host = x.to("cpu").contiguous()  # (B, T, h)
        self.mem[k], self.meta[k] = None, (tuple(host.shape), host.dtype)
        # the pending write's buffer view keeps `host` alive until the write has finished
        self.writes[k] = self.io.write(Region(self.files[k], 0, host.nbytes), host)

    def prefetch(self, k: int) -> None:
        if not 0 <= k < len(self.mem) or self.mem[k] is not None or k in self.loads or self.meta[k] is None:
            return
        if self.writes[k] is not None:
            self.writes[k].wait()
            self.writes[k] = None
        shape, dtype = self.meta[k]
        buf = self.ring.acquire(shape, dtype)
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        self.loads[k] = (buf, self.io.read([Region(self.files[k], 0, nbytes)], buf))

    def get(self, k: int) -> torch.Tensor:
        if self.mem[k] is not None:
            return self.mem[k].to(self.device)
        self.prefetch(k)
        buf, pending = self.loads.pop(k)
        pending.wait()
        return buf.to(self.device, non_blocking=False)

    def close(self) -> None:
        for w in self.writes:
            if w is not None:
                w.wait()
        for f in self.files:
            if f is not None:
                f.unlink(missing_ok=True)
