"""The cluster configs in clusters/: Ray's own schema, and the resources the cluster run config asks for.

Nothing here starts a cluster: the launcher YAMLs are checked against the JSON schema that ships with
Ray (the one `ray up` validates against), and every node type, custom resource and GPU count is
checked against workflows/configs/cluster_gpu.yaml, so that a run cannot wait forever for a resource
no node offers.
"""

from __future__ import annotations

import copy
import json
import shlex
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import ray
import ray.autoscaler
import yaml

from kdray.config import Config, load_config

ROOT = Path(__file__).resolve().parents[1]
CLUSTERS = ROOT / "clusters"
RUN_CONFIG = ROOT / "workflows" / "configs" / "cluster_gpu.yaml"
LAUNCHERS = ("aws", "gcp")


def _yaml(path: Path) -> Any:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def ray_schema() -> dict[str, Any]:
    """The cluster-launcher schema of the installed Ray (`ray up` validates against this file)."""
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.fixture(scope="module")
def run_cfg() -> Config:
    return load_config(RUN_CONFIG)


@pytest.fixture(scope="module", params=LAUNCHERS)
def launcher(request) -> tuple[str, dict[str, Any]]:
    return request.param, _yaml(CLUSTERS / f"{request.param}.yaml")


@pytest.fixture(scope="module")
def rayjob() -> dict[str, Any]:
    docs = [doc for doc in yaml.safe_load_all((CLUSTERS / "kuberay.yaml").read_text()) if doc]
    jobs = [doc for doc in docs if doc.get("kind") == "RayJob"]
    assert len(jobs) == 1, (
        f"expected one RayJob in clusters/kuberay.yaml, found kinds {[d.get('kind') for d in docs]}"
    )
    return jobs[0]


# --- helpers: what a node offers and how many bundles fit ---------------------------------------------


def _bundle(num_cpus: float, num_gpus: float, custom: Mapping[str, float]) -> dict[str, float]:
    """One actor's or worker's resource demand, as Ray schedules it (zero amounts ask for nothing)."""
    demand = {"CPU": float(num_cpus), "GPU": float(num_gpus), **{k: float(v) for k, v in custom.items()}}
    return {key: amount for key, amount in demand.items() if amount > 0}


def _teacher_bundle(cfg: Config) -> dict[str, float]:
    t = cfg.teacher
    return _bundle(t.num_cpus, t.num_gpus, t.resources)


def _student_bundle(cfg: Config) -> dict[str, float]:
    # Ray Train's per-worker default (1 CPU, plus 1 GPU with use_gpu) plus the custom resources, as in
    # kdray.train.trainer's ScalingConfig.
    return _bundle(1, 1 if cfg.train.use_gpu else 0, cfg.train.resources)


def _per_node(offers: Mapping[str, float], bundle: Mapping[str, float]) -> int:
    """How many copies of `bundle` one node offering `offers` holds."""
    return min(int(offers.get(key, 0) // amount) for key, amount in bundle.items())


def _offering(node_types: Mapping[str, Mapping[str, Any]], custom: Mapping[str, float]) -> list[str]:
    """Node types that offer every custom resource named in `custom`."""
    return [name for name, spec in node_types.items() if all(key in spec["resources"] for key in custom)]


def _kuberay_resources(group: Mapping[str, Any]) -> dict[str, float]:
    """What `ray start` advertises for a KubeRay group: num-cpus/num-gpus plus the JSON `resources`.

    KubeRay pastes `resources` into a shell command line (`ray start --resources=...`), so the value
    must be a quoted JSON string; the shell split below is the one that command line goes through.
    """
    params = group["rayStartParams"]
    offers: dict[str, float] = {}
    if "num-gpus" in params:
        offers["GPU"] = float(params["num-gpus"])
    if "num-cpus" in params:
        offers["CPU"] = float(params["num-cpus"])
    if "resources" in params:
        (arg,) = shlex.split(f"--resources={params['resources']}")
        offers.update(json.loads(arg.removeprefix("--resources=")))
    return offers


def _worker_groups(job: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    return {group["groupName"]: group for group in job["spec"]["rayClusterSpec"]["workerGroupSpecs"]}


def _gpu_limit(group: Mapping[str, Any]) -> int:
    (container,) = group["template"]["spec"]["containers"]
    return int(container.get("resources", {}).get("limits", {}).get("nvidia.com/gpu", 0))


# --- the launcher YAMLs ----------------------------------------------------------------------------------


def test_launcher_yaml_matches_ray_schema(launcher, ray_schema):
    name, cfg = launcher
    jsonschema.validate(cfg, ray_schema)
    assert cfg["provider"]["type"] == name
    # the cross-field rules Ray checks after the schema (ray.autoscaler._private.util.validate_config)
    node_types = cfg["available_node_types"]
    assert cfg["head_node_type"] in node_types
    assert sum(t.get("min_workers", 0) for t in node_types.values()) <= cfg["max_workers"]
    workers = {n: t for n, t in node_types.items() if n != cfg["head_node_type"]}
    for node_name, spec in workers.items():
        assert 0 <= spec["min_workers"] <= spec["max_workers"], f"{name}: {node_name} autoscaling bounds"
    # the global cap must not cut a node type below its own max_workers
    assert sum(t["max_workers"] for t in workers.values()) <= cfg["max_workers"]


def test_launcher_yaml_passes_rays_own_preparation(launcher):
    """What `ray up` does before launching: merge the provider's defaults, then validate the result.

    These helpers live in Ray's private autoscaler module (no public API exposes them), so the test
    above does not depend on them; this one only adds the defaults merge and the docker checks.
    """
    util = pytest.importorskip("ray.autoscaler._private.util")
    _, cfg = launcher
    prepared = util.prepare_config(copy.deepcopy(cfg))
    util.validate_config(prepared)
    assert prepared["available_node_types"][prepared["head_node_type"]]["max_workers"] == 0


def test_launcher_node_types(launcher):
    name, cfg = launcher
    node_types = cfg["available_node_types"]
    assert set(node_types) == {"head", "teacher_gpu", "student_gpu"}
    assert cfg["head_node_type"] == "head"
    assert node_types["head"]["resources"].get("GPU", 0) == 0, f"{name}: the head is CPU only"
    # one unit of the custom resource per GPU: `teacher: 1` / `student: 1` then means one actor per GPU
    for node_name, custom in (("teacher_gpu", "teacher"), ("student_gpu", "student")):
        offers = node_types[node_name]["resources"]
        assert offers["GPU"] > 0
        assert offers[custom] == offers["GPU"], f"{name}: {node_name} offers {offers}"


def test_launcher_installs_kdray_and_starts_ray(launcher):
    name, cfg = launcher
    assert any("pip install" in cmd and "kdray[vllm]" in cmd for cmd in cfg["setup_commands"])
    assert "." in cfg["file_mounts"].values(), f"{name}: setup installs the mounted working tree"
    head = " ".join(cfg["head_start_ray_commands"])
    assert "ray start --head" in head and "--autoscaling-config=~/ray_bootstrap_config.yaml" in head
    assert "ray start --address=$RAY_HEAD_IP:6379" in " ".join(cfg["worker_start_ray_commands"])


def test_launcher_image_matches_installed_ray(launcher):
    """`ray up` and `ray job submit` refuse a cluster running another Ray version than the client."""
    name, cfg = launcher
    assert f"rayproject/ray:{ray.__version__}-" in cfg["docker"]["image"], (
        f"{name}: image {cfg['docker']['image']} vs ray {ray.__version__} here"
    )


def test_launcher_offers_what_the_run_config_asks_for(launcher, run_cfg):
    name, cfg = launcher
    node_types = cfg["available_node_types"]
    assert run_cfg.teacher.resources and run_cfg.train.resources, "the cluster config pins both roles"

    teacher_types = _offering(node_types, run_cfg.teacher.resources)
    student_types = _offering(node_types, run_cfg.train.resources)
    assert teacher_types, f"{name}: no node type offers {dict(run_cfg.teacher.resources)}"
    assert student_types, f"{name}: no node type offers {dict(run_cfg.train.resources)}"
    assert not set(teacher_types) & set(student_types), "teachers and trainers sit on different node types"

    teacher_gpus = sum(
        node_types[t]["resources"].get("GPU", 0) * node_types[t]["max_workers"] for t in teacher_types
    )
    assert teacher_gpus >= run_cfg.teacher.num_gpus * run_cfg.teacher.replicas
    bundle = _teacher_bundle(run_cfg)
    fits = sum(
        _per_node(node_types[t]["resources"], bundle) * node_types[t]["max_workers"] for t in teacher_types
    )
    assert fits >= run_cfg.teacher.replicas, f"{name}: {fits} teacher actors of {bundle} fit"

    if run_cfg.train.use_gpu:
        student_gpus = sum(
            node_types[t]["resources"].get("GPU", 0) * node_types[t]["max_workers"] for t in student_types
        )
        assert student_gpus >= run_cfg.train.num_workers
    bundle = _student_bundle(run_cfg)
    fits = sum(
        _per_node(node_types[t]["resources"], bundle) * node_types[t]["max_workers"] for t in student_types
    )
    assert fits >= run_cfg.train.num_workers, f"{name}: {fits} training workers of {bundle} fit"


@pytest.mark.parametrize(
    "mutate",
    [
        pytest.param(lambda c: c.update(max_workers="many"), id="max_workers-not-an-integer"),
        pytest.param(lambda c: c.update(gpu_count=8), id="unknown-top-level-key"),
        pytest.param(
            lambda c: c["available_node_types"]["teacher_gpu"].pop("resources"), id="node-type-no-resources"
        ),
        pytest.param(
            lambda c: c["available_node_types"]["student_gpu"]["resources"].update(student=0.5),
            id="fractional-custom-resource",
        ),
    ],
)
def test_schema_check_rejects_a_broken_launcher_yaml(mutate, ray_schema):
    cfg = _yaml(CLUSTERS / "aws.yaml")
    jsonschema.validate(cfg, ray_schema)
    mutate(cfg)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cfg, ray_schema)


def test_resource_helpers_notice_what_is_missing():
    node_types = {"gpu": {"resources": {"CPU": 8, "GPU": 2, "teacher": 2}}}
    assert _offering(node_types, {"teacher": 1}) == ["gpu"]
    assert _offering(node_types, {"student": 1}) == []
    assert _per_node(node_types["gpu"]["resources"], {"CPU": 4, "GPU": 1, "teacher": 1}) == 2
    assert _per_node(node_types["gpu"]["resources"], {"CPU": 1, "GPU": 1, "student": 1}) == 0


# --- the KubeRay RayJob ---------------------------------------------------------------------------------


def test_rayjob_runs_the_workflow_on_an_existing_config(rayjob):
    assert rayjob["apiVersion"] == "ray.io/v1"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["ttlSecondsAfterFinished"] >= 0
    argv = shlex.split(spec["entrypoint"])
    assert argv[:2] == ["python", "workflows/xkd.py"], argv
    config = argv[argv.index("--config") + 1]
    assert (ROOT / config).is_file(), f"the entrypoint's config {config} is not in the repository"
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert runtime_env["working_dir"]
    assert any(req.startswith("kdray[vllm]") for req in runtime_env["pip"])


def test_rayjob_images_match_ray_version(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    assert cluster["rayVersion"] == ray.__version__
    groups = [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]
    for group in groups:
        for container in group["template"]["spec"]["containers"]:
            assert f":{cluster['rayVersion']}-" in container["image"], container["image"]


def test_rayjob_gpu_limits_match_ray_start_params(rayjob):
    cluster = rayjob["spec"]["rayClusterSpec"]
    head = cluster["headGroupSpec"]
    assert _gpu_limit(head) == 0 and float(head["rayStartParams"].get("num-gpus", 0)) == 0
    groups = _worker_groups(rayjob)
    assert set(groups) == {"teacher-gpu", "student-gpu"}
    for name, group in groups.items():
        assert _gpu_limit(group) > 0, name
        assert _gpu_limit(group) == int(group["rayStartParams"]["num-gpus"]), name
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], name


def test_rayjob_offers_what_its_config_asks_for(rayjob):
    argv = shlex.split(rayjob["spec"]["entrypoint"])
    cfg = load_config(ROOT / argv[argv.index("--config") + 1])
    groups = _worker_groups(rayjob)
    teacher, student = _kuberay_resources(groups["teacher-gpu"]), _kuberay_resources(groups["student-gpu"])
    assert set(cfg.teacher.resources) <= set(teacher), f"teacher-gpu offers {teacher}"
    assert set(cfg.train.resources) <= set(student), f"student-gpu offers {student}"
    assert not set(cfg.teacher.resources) & set(student), "a trainer pod must not take teacher actors"
    assert not set(cfg.train.resources) & set(teacher), "a teacher pod must not take training workers"
    assert teacher["teacher"] == teacher["GPU"] and student["student"] == student["GPU"]

    # CPUs come from the pod's limits when rayStartParams leaves num-cpus out
    (container,) = groups["teacher-gpu"]["template"]["spec"]["containers"]
    teacher.setdefault("CPU", float(container["resources"]["limits"]["cpu"]))
    (container,) = groups["student-gpu"]["template"]["spec"]["containers"]
    student.setdefault("CPU", float(container["resources"]["limits"]["cpu"]))

    pods = groups["teacher-gpu"]["maxReplicas"]
    assert teacher["GPU"] * pods >= cfg.teacher.num_gpus * cfg.teacher.replicas
    assert _per_node(teacher, _teacher_bundle(cfg)) * pods >= cfg.teacher.replicas
    pods = groups["student-gpu"]["maxReplicas"]
    if cfg.train.use_gpu:
        assert student["GPU"] * pods >= cfg.train.num_workers
    assert _per_node(student, _student_bundle(cfg)) * pods >= cfg.train.num_workers


def test_kuberay_resources_string_is_shell_quoted_json():
    quoted = {"rayStartParams": {"num-gpus": "4", "resources": '"{\\"teacher\\": 4}"'}}
    assert _kuberay_resources(quoted) == {"GPU": 4.0, "teacher": 4}
    # unquoted JSON loses its quotes and splits at the space on the `ray start` command line
    bare = {"rayStartParams": {"resources": '{"teacher": 4}'}}
    with pytest.raises(ValueError):
        _kuberay_resources(bare)
