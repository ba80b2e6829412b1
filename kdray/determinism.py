"""CPU numerics that do not depend on the machine: the same config and seeds train the same model on any
Intel CPU with AVX2, and with `KDRAY_CPU_KERNELS=portable` on any x86 CPU.

Why: PyTorch dispatches its elementwise and reduction kernels (softmax, norms, activations and their
gradients) to the widest vector unit it finds (AVX-512 here, AVX2 on many laptops and cloud VMs), and
MKL picks its GEMM code path by CPU. The paths round differently: on one machine a tiny model's loss
agrees to every printed digit while its gradients differ in the last bits. Training amplifies those
bits, most of all while a model is in a steep phase of its learning curve, so two machines running the
same seeded command could print tables 20 points apart. Pinning both to their AVX2 code paths makes
an AVX-512 machine compute exactly what an AVX2-only machine computes (measured: identical gradients,
no measurable speed cost for the tiny models of the quickstart; see docs/reproducibility.md).

MKL honours its AVX2 branch (`MKL_CBWR=AVX2`) on Intel CPUs only: on other CPUs its documentation says
the AUTO branch runs instead, so an AMD processor computes other GEMM bits with the default pins. The one
branch MKL runs alike on Intel and compatible CPUs is COMPATIBLE (SSE2): `KDRAY_CPU_KERNELS=portable`
pins it, at about twice the training time of the tiny models here (docs/reproducibility.md).

The pins are environment variables read once, when torch and MKL initialise, so they must be set
before torch is imported: the CLI and the workflow entry points call `pin_cpu_kernels()` first thing,
and `cpu_kernel_env()` goes into Ray's runtime environment so every worker and actor starts with them.
`KDRAY_CPU_KERNELS=native` keeps each CPU's widest kernels (faster on large CPU models, not
reproducible across machines). GPU kernels are not affected.
"""

from __future__ import annotations

import functools
import logging
import os
import platform
import sys

logger = logging.getLogger(__name__)

#: the environment that pins ATen's CPU dispatch and MKL's code path to AVX2
PINNED_KERNELS: dict[str, str] = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
#: the same with MKL on its COMPATIBLE (SSE2) branch, the one it runs alike on Intel and AMD processors
PORTABLE_KERNELS: dict[str, str] = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}
#: "avx2" (the default), "portable" (the same bits on Intel and AMD, slower) or "native" (no pins)
OPT_OUT_VARIABLE = "KDRAY_CPU_KERNELS"


def cpu_kernel_env() -> dict[str, str]:
    """The variables kdray pins (an explicit setting of one of them wins); empty when opted out or off x86."""
    mode = os.environ.get(OPT_OUT_VARIABLE, "avx2").strip().lower()
    if mode == "native" or platform.machine().lower() not in ("x86_64", "amd64", "i686", "x86"):
        return {}
    pins = {"avx2": PINNED_KERNELS, "portable": PORTABLE_KERNELS}.get(mode)
    if pins is None:
        raise ValueError(
            f"{OPT_OUT_VARIABLE}={mode!r}: use 'avx2' (the default: the same bits on Intel CPUs with AVX2), "
            "'portable' (the same bits on Intel and AMD CPUs, about twice as slow) or 'native' (no pins)"
        )
    return {key: os.environ.get(key, value) for key, value in pins.items()}


def pin_cpu_kernels() -> dict[str, str]:
    """Set the pins in this process's environment (where not already set) and return them.

    Call before torch is imported. If torch is already loaded, the pins still reach the Ray workers this
    process starts, but this process keeps the kernels it initialised with: say so once.
    """
    env = cpu_kernel_env()
    code_commit()  # read now, while the checkout is the one this process loaded
    missing = {k: v for k, v in env.items() if k not in os.environ}
    os.environ.update(missing)
    if missing and "torch" in sys.modules:
        logger.info(
            "torch was imported before kdray pinned its CPU kernels (%s); this process keeps its own, "
            "Ray workers get the pins",
            ", ".join(f"{k}={v}" for k, v in missing.items()),
        )
    return env


def active_cpu_capability() -> str:
    """The vector level torch's CPU kernels run at in this process (e.g. AVX2, AVX512), for run records."""
    import torch

    return str(torch.backends.cpu.get_cpu_capability())


def cpu_model() -> str:
    """The CPU's model name (from /proc/cpuinfo on Linux), else what `platform` knows."""
    from pathlib import Path

    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cpu_vendor(model: str) -> str:
    """The vendor word of a CPU model name ("Intel(R) Xeon(R) Processor" -> "Intel", "AMD EPYC 9B14" ->
    "AMD"): what results tables name a machine by, since the vendor is what changes MKL's arithmetic."""
    return model.split("(")[0].split()[0] if model.strip() else "?"


@functools.cache
def code_commit() -> str:
    """The short commit of the checkout this process's code came from, read once: a benchmark that runs
    for hours while the checkout moves on stamps every row with the commit it started from (the code
    Python loaded), not with whatever HEAD is when the row is written. `pin_cpu_kernels` reads it."""
    from kdray.runs import git_commit

    return (git_commit() or "unknown")[:7]


def provenance(seed: int) -> dict[str, object]:
    """What a result row was measured with: seed, git commit, CPU model, torch threads and kernel level.

    Every benchmark row carries it, so a table can say where each number came from."""
    import torch

    return {
        "seed": seed,
        "commit": code_commit(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "cpu_kernels": active_cpu_capability(),
        # the branch kdray asked MKL for (MKL_CBWR); on a non-Intel CPU MKL runs AUTO unless it is COMPATIBLE
        "mkl_branch": os.environ.get("MKL_CBWR", "AUTO"),
    }
