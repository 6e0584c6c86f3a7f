"""The machine a figure was measured on, and measurements cached per machine.

What pays off depends on the hardware (seed 000), so every figure names its CPU, and a
decision that rests on a micro-benchmark (which channel multiple a pruned Conv should keep,
where a low-rank MatMul pair starts to beat the dense one) is measured once per machine and
onnxruntime version, then read from a cache:

    from onnxopt import machine
    machine.describe()                      # {"cpu": "AMD EPYC", "flags": [...], ...}
    machine.summary()                       # one line for reports and bench/*.md
    machine.measured("conv-multiple", fn)   # fn() -> JSON-able dict, cached per machine

The cache lives in ``$ONNXOPT_CACHE`` (default ``~/.cache/onnxopt``) under ``machine/``, one
JSON file per fingerprint (CPU model, the instruction sets below, core count, onnxruntime
version). ``ONNXOPT_NO_MEASURE_CACHE=1`` ignores it (measures again, writes nothing).
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import platform
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnxruntime as ort

# the instruction sets onnxruntime's float and int8 kernels pick from
FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_int8", "amx_bf16",
         "asimd", "sve", "i8mm")

def cores() -> int:
    """Cores this process may run on (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _cpuinfo() -> tuple[str, set[str]]:
    model, flags = platform.processor() or "unknown CPU", set()
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return model, flags
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key = key.strip()
        if key in ("model name", "Model name") and model in ("", "unknown CPU", platform.processor()):
            model = value.strip() or model
        elif key in ("flags", "Features") and not flags:
            flags = set(value.split())
    return model, flags


@functools.lru_cache(maxsize=1)
def describe() -> dict[str, Any]:
    """CPU model and the flags that matter, cores, memory, OS, onnxruntime and its providers."""
    model, flags = _cpuinfo()
    mem = None
    try:
        kb = int(next(ln for ln in Path("/proc/meminfo").read_text().splitlines()
                      if ln.startswith("MemTotal")).split()[1])
        mem = round(kb / 2**20, 1)
    except (OSError, StopIteration, ValueError, IndexError):
        pass
    return {
        "cpu": model,
        "flags": [f for f in FLAGS if f in flags],
        "cores": os.cpu_count(),
        "memory_gib": mem,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "onnxruntime": ort.__version__,
        "providers": ort.get_available_providers(),
    }


def summary(info: dict[str, Any] | None = None) -> str:
    """``AMD EPYC (avx2 fma avx512f avx512_vnni), 2 cores, 24 GiB RAM, Linux 6.1, onnxruntime 1.32.0``."""
    d = info or describe()
    flags = " ".join(d["flags"]) or "none of avx2/avx512/vnni"
    mem = f", {d['memory_gib']:.0f} GiB RAM" if d.get("memory_gib") else ""
    return f"{d['cpu']} ({flags}), {d['cores']} cores{mem}, {d['os']}, onnxruntime {d['onnxruntime']}"


def fingerprint() -> str:
    d = describe()
    key = json.dumps([d["cpu"], d["flags"], d["cores"], d["onnxruntime"]])
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def cache_dir() -> Path:
    return Path(os.environ.get("ONNXOPT_CACHE", "~/.cache/onnxopt")).expanduser() / "machine"


def measured(key: str, measure: Callable[[], dict[str, Any]], version: int = 1) -> dict[str, Any]:
    """``measure()``'s result for this machine, from the cache when it holds ``key`` at ``version``.

    Bump ``version`` when the measurement changes meaning; an unreadable cache is measured anew.
    """
    path = cache_dir() / f"{fingerprint()}.json"
    use_cache = os.environ.get("ONNXOPT_NO_MEASURE_CACHE", "") in ("", "0")
    entries: dict[str, Any] = {}
    if use_cache and path.exists():
        try:
            entries = json.loads(path.read_text())
        except (OSError, ValueError):
            entries = {}
        hit = entries.get(key)
        if isinstance(hit, dict) and hit.get("version") == version and isinstance(hit.get("result"), dict):
            return hit["result"]
    result = measure()
    if use_cache:
        entries[key] = {"version": version, "result": result, "machine": summary()}
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            tmp.write_text(json.dumps(entries, indent=1, sort_keys=True))
            tmp.replace(path)
        except OSError:
            pass  # a read-only home: measure again next time
    return result
