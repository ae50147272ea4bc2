"""What the machine is, and how busy it is: the parts of the CPU benchmark that read the
operating system (/proc on Linux; the `resource` module: Unix only, as the whole harness)."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path

try:
    import resource
except ImportError as e:                 # Windows
    raise ImportError("the CPU benchmark runs on Unix only (Linux, macOS): it measures with the "
                      "'resource' module, which this Python does not have") from e

from . import GB, installed_version


def cpu_seconds():
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat (None
    elsewhere). busy = user + nice + system + irq + softirq; steal = time the hypervisor gave
    our virtual CPUs to someone else."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq) / tick, steal / tick


def children_cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def mem_available_bytes():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def cpu_name():
    """The CPU's model name (Linux: /proc/cpuinfo; elsewhere what `platform` knows)."""
    try:
        m = re.search(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), re.M)
        if m:
            return m[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info():
    """CPU model, cores, memory, OS and library versions (read without importing them)."""
    cpu, physical = cpu_name(), None
    try:
        text = Path("/proc/cpuinfo").read_text()
        cores = set()
        for block in text.split("\n\n"):          # one block per logical CPU
            ids = dict(re.findall(r"^(physical id|core id)\s*:\s*(\d+)", block, re.M))
            if len(ids) == 2:
                cores.add((ids["physical id"], ids["core id"]))
        physical = len(cores) or None
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    versions = {d: installed_version(d) for d in ("tinyrwkv", "numpy", "numba", "torch", "rwkv",
                                                  "threadpoolctl", "llama-cpp-python", "gguf")}
    versions["tinyrwkv"] = _checkout_version(versions["tinyrwkv"])
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "physical_cores": physical,
            "usable_cores": usable, "memory_gb": mem / GB if mem else None,
            "os": platform.platform(), "python": platform.python_version(),
            "versions": versions,
            "thread_env": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                          "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}}


def _checkout_version(installed):
    """The version of the tinyrwkv the children import: this checkout's (its __version__ and git
    commit), which may differ from the installed distribution's."""
    import subprocess
    root = Path(__file__).resolve().parents[2]
    m = re.search(r'^__version__ = "([^"]+)"', (root / "tinyrwkv" / "__init__.py").read_text()
                  if (root / "tinyrwkv" / "__init__.py").is_file() else "", re.M)
    if not m:
        return installed
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        commit = ""
    return f"{m[1]} (checkout{' ' + commit if commit else ''})"
