"""`env.json`: what a run ran on (versions, the project's git commit, the machine), so results can be compared."""

from __future__ import annotations

import importlib.metadata
import os
import platform
import subprocess
import sys
from pathlib import Path

PACKAGES = ("torch", "transformers", "crfm-helm", "flexhelm", "numpy", "pandas")


def collect(project_root: Path) -> dict:
    return {"python": sys.version.split()[0], "platform": platform.platform(),
            "packages": {name: _version(name) for name in PACKAGES}, "git": _git(project_root),
            "hardware": hardware()}


def hardware() -> dict:
    """The machine: CPU model and cores, RAM, accelerators (when torch is already loaded; never imports it)."""
    info: dict = {"cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
                  "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None}
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        names = [ln.split(":", 1)[1].strip() for ln in cpuinfo.read_text().splitlines() if ln.startswith("model name")]
        if names:
            info["cpu"] = names[0]
    if hasattr(os, "sysconf") and "SC_PHYS_PAGES" in os.sysconf_names:
        info["ram_bytes"] = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    torch = sys.modules.get("torch")
    if torch is not None:
        info["torch_threads"] = torch.get_num_threads()
        info["cuda"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return info


def _version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(root: Path) -> dict | None:
    def git(*args: str) -> str:
        return subprocess.run(["git", "-C", str(root), *args], capture_output=True, text=True, timeout=10,
                              check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except (OSError, subprocess.SubprocessError):
        return None  # not a git checkout (an installed wheel): versions above still say what ran
