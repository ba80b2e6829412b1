"""The CPU kernel pins: an AVX-512 machine and an AVX2-only machine compute the same gradients.

An AVX2-only machine is emulated on this one by capping ATen's dispatch and MKL's instruction set
(`ATEN_CPU_CAPABILITY`, `MKL_ENABLE_INSTRUCTIONS`); each run is a fresh process, because both are read
once when torch initialises.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from kdray.determinism import OPT_OUT_VARIABLE, PINNED_KERNELS, cpu_kernel_env

REPO = Path(__file__).resolve().parents[1]

# one forward/backward of a tiny Llama; prints the hash of every gradient bit and the dispatch level
PROBE = """
import hashlib, sys
sys.path.insert(0, {repo!r})
from kdray.determinism import pin_cpu_kernels
if {pin}:
    pin_cpu_kernels()
import torch
from kdray.models.tiny import tiny_causal_lm
torch.set_num_threads(1)
model = tiny_causal_lm(96, hidden_size=64, num_layers=2, num_heads=2, seed=0)
x = torch.randint(0, 96, (4, 48), generator=torch.Generator().manual_seed(0))
model(input_ids=x, labels=x).loss.backward()
grads = torch.cat([p.grad.flatten() for p in model.parameters()])
print(hashlib.sha256(grads.numpy().tobytes()).hexdigest(), torch.backends.cpu.get_cpu_capability())
"""


def _probe(*, pin: bool, avx2_machine: bool, **extra: str) -> tuple[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in (*PINNED_KERNELS, OPT_OUT_VARIABLE)}
    if avx2_machine:
        env.update(ATEN_CPU_CAPABILITY="avx2", MKL_ENABLE_INSTRUCTIONS="AVX2")
    env.update(extra)
    out = subprocess.run(
        [sys.executable, "-c", PROBE.format(repo=str(REPO), pin=pin)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        check=True,
    )
    digest, capability = out.stdout.split()[-2:]
    return digest, capability


def test_pinned_kernels_give_the_avx2_machines_gradients() -> None:
    pinned, capability = _probe(pin=True, avx2_machine=False)
    assert capability == "AVX2"
    assert pinned == _probe(pin=True, avx2_machine=True)[0]
    native, native_capability = _probe(pin=False, avx2_machine=False)
    if native_capability == "AVX512":  # this machine's own kernels round differently: what the pins fix
        assert native != pinned


def test_portable_pins_give_the_same_bits_where_mkl_cannot_take_its_avx2_branch() -> None:
    # MKL runs its AVX2 branch on Intel CPUs only; elsewhere it runs AUTO (its documentation). A CPU whose
    # MKL is off that branch is emulated by capping MKL's instructions at SSE4.2: with the default pins it
    # computes other gradient bits, with the portable pins (MKL's COMPATIBLE branch) the same ones.
    off_branch = {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}
    assert _probe(pin=True, avx2_machine=False)[0] != _probe(pin=True, avx2_machine=False, **off_branch)[0]
    portable = {OPT_OUT_VARIABLE: "portable"}
    on_branch = _probe(pin=True, avx2_machine=False, **portable)
    assert on_branch == _probe(pin=True, avx2_machine=False, **portable, **off_branch)
    assert on_branch[1] == "AVX2"


def test_opt_out_and_explicit_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(OPT_OUT_VARIABLE, "native")
    assert cpu_kernel_env() == {}
    monkeypatch.setenv(OPT_OUT_VARIABLE, "fast")
    with pytest.raises(ValueError, match="KDRAY_CPU_KERNELS"):
        cpu_kernel_env()
    for key in PINNED_KERNELS:  # this process may carry the pins already (kdray pinned it)
        monkeypatch.delenv(key, raising=False)
    monkeypatch.setenv(OPT_OUT_VARIABLE, "portable")
    assert cpu_kernel_env() == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "COMPATIBLE"}
    monkeypatch.delenv(OPT_OUT_VARIABLE)
    assert cpu_kernel_env() == PINNED_KERNELS
    monkeypatch.setenv("MKL_CBWR", "SSE4_2")  # a user's own choice wins over the default pin
    assert cpu_kernel_env() == {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "SSE4_2"}


def test_ray_workers_start_with_the_pins() -> None:
    script = f"""
import sys
sys.path.insert(0, {str(REPO)!r})
import ray
from kdray.run import init_ray
init_ray()

@ray.remote(num_cpus=0)
def capability():
    import os, torch
    return os.environ.get("ATEN_CPU_CAPABILITY"), str(torch.backends.cpu.get_cpu_capability())

print(*ray.get(capability.remote()))
ray.shutdown()
"""
    env = {k: v for k, v in os.environ.items() if k not in (*PINNED_KERNELS, OPT_OUT_VARIABLE)}
    env["KDRAY_LOCAL_CPUS"] = "2"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300, check=True
    )
    assert out.stdout.split()[-2:] == ["avx2", "AVX2"]
