"""``--compile``: the whole decoding step under ``torch.compile`` (CUDA graphs on a GPU).

What is compiled is one :class:`~unimoe.generation.decode.CachedStep` call: feed the chosen
frame through the model with the static KV cache, guide, sample, force the delay pattern and
update the end bookkeeping. Every tensor it touches is a parameter or a buffer whose shape and
address never change (the static cache, the decode state), the MoE layers take their sync-free
``dense`` path while tracing, and the sampler needs no ``torch.Generator``, so the step is one
graph (``fullgraph=True``: a graph break is a bug, reported as an error). On CUDA the mode is
``reduce-overhead``: the graph is captured once and replayed, one launch per step.

Compilation is lazy: the first step compiles (seconds to minutes on a CPU), later steps and
later batches of the same shapes reuse it (shapes are bucketed, see
:data:`unimoe.generation.decode.SHAPE_BUCKET`). Eager decoding is token-identical at
temperature 0, so a failure here never changes results, only speed: it raises
:class:`CompileError` saying so, and the fix is to run without ``--compile``.
"""

from __future__ import annotations

import os
import shutil
import sysconfig
from pathlib import Path
from typing import Callable

import torch
from torch import nn


class CompileError(RuntimeError):
    """``torch.compile`` cannot build the decoding step here (the message says why and what to do)."""


FALLBACK_HINT = "decode without --compile (eager decoding gives the same tokens at temperature 0)"


def check_toolchain(device: torch.device) -> None:
    """Inductor on a CPU builds C++: fail early, naming what is missing, rather than mid-generation."""
    if device.type != "cpu":
        return
    compiler = os.environ.get("CXX") or next((c for c in ("g++", "c++", "clang++") if shutil.which(c)), None)
    if compiler is None or shutil.which(compiler) is None:
        raise CompileError(f"--compile on a CPU needs a C++ compiler (none of $CXX, g++, c++, clang++ found; "
                           f"install one, e.g. apt-get install g++), or {FALLBACK_HINT}")
    header = Path(sysconfig.get_paths()["include"]) / "Python.h"
    if not header.is_file():
        raise CompileError(f"--compile on a CPU needs the Python headers ({header} is missing; install the "
                           f"python3-dev package of this Python), or {FALLBACK_HINT}")


def compile_step(step: nn.Module, device: torch.device) -> Callable[[], None]:
    """A callable that runs ``step()`` compiled; the first call compiles and any failure is a :class:`CompileError`."""
    check_toolchain(device)
    cuda = device.type == "cuda"
    options = None if cuda else {"cpp_wrapper": True}  # a C++ wrapper: no Python between the kernels
    compiled = torch.compile(step, mode="reduce-overhead" if cuda else None, fullgraph=True, dynamic=False, options=options)
    first = True

    def run() -> None:
        nonlocal first
        if cuda:
            torch.compiler.cudagraph_mark_step_begin()  # a new replay: the previous step's outputs may be reused
        if not first:
            compiled()
            return
        try:
            compiled()
        except Exception as exc:  # BackendCompilerFailed, Unsupported (a graph break), a C++ build error...
            raise CompileError(f"torch.compile could not build the decoding step on {device}: "
                               f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}; {FALLBACK_HINT}") from exc
        first = False

    return run
