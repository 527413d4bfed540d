"""Compiled CPU kernels, built once per machine from the C++ source next to this file.

``ops()`` returns ``torch.ops.kvsqueeze`` with the kernels of ``paged_decode.cpp`` loaded: built
with the machine's C++ compiler against the installed torch on first use (about half a minute)
and kept under ``$KVSQUEEZE_HOME/kernels``, keyed by the source, the torch version and the CPU.
It returns None when they cannot be built (no compiler) or are turned off with
``KVSQUEEZE_KERNELS=0``; attention then runs on PyTorch ops, as it does on other devices.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import shutil
import subprocess
from functools import cache
from pathlib import Path

import torch

from kvsqueeze.models import kvsqueeze_home

log = logging.getLogger("kvsqueeze.kernels")

SOURCE = Path(__file__).with_name("paged_decode.cpp")


@cache
def ops():
    """``torch.ops.kvsqueeze`` with the CPU kernels loaded, or None (see module docstring)."""
    if os.environ.get("KVSQUEEZE_KERNELS", "1") == "0":
        return None
    try:
        torch.ops.load_library(str(_built()))
    except (OSError, subprocess.SubprocessError) as error:
        log.warning("kvsqueeze's CPU attention kernels are not available (%s); using PyTorch ops", error)
        return None
    return torch.ops.kvsqueeze


def _cpu_identity() -> bytes:
    """What the compiled code depends on besides the source: the CPU's instruction sets."""
    try:
        flags = next(
            line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")
        )
    except (OSError, StopIteration):
        flags = platform.processor()
    return f"{platform.machine()} {flags}".encode()


def _built() -> Path:
    digest = hashlib.sha256(SOURCE.read_bytes() + torch.__version__.encode() + _cpu_identity()).hexdigest()
    target = kvsqueeze_home() / "kernels" / f"paged_decode-{digest[:16]}.so"
    if target.exists():
        return target
    compiler = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if compiler is None:
        raise OSError("no C++ compiler found (install g++ or set CXX)")
    from torch.utils import cpp_extension

    libraries = cpp_extension.library_paths()
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(f"{target.name}.{os.getpid()}.tmp")
    command = [
        compiler,
        "-O3",
        "-march=native",
        "-fopenmp",
        "-fno-trapping-math",  # lets the compiler vectorize the branch-free exp and selects
        "-std=c++17",
        "-shared",
        "-fPIC",
        f"-D_GLIBCXX_USE_CXX11_ABI={int(torch._C._GLIBCXX_USE_CXX11_ABI)}",
        *(f"-I{path}" for path in cpp_extension.include_paths()),
        str(SOURCE),
        "-o",
        str(partial),
        *(f"-L{path}" for path in libraries),
        *(f"-Wl,-rpath,{path}" for path in libraries),
        "-ltorch",
        "-ltorch_cpu",
        "-lc10",
    ]
    log.info("building kvsqueeze's CPU attention kernels (once per machine)")
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        partial.unlink(missing_ok=True)
        raise OSError(f"{compiler} failed: {result.stderr.strip()[-800:]}")
    os.replace(partial, target)
    return target
