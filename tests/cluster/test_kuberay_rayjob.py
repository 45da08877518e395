"""cluster/kuberay-rayjob.yaml (KubeRay v1.7.0 RayJob): the hand-written schema, the operator's rules, pod sizing, /dev/shm, GPU tolerations, EFA + NCCL, IRSA."""

from __future__ import annotations

import json
import os
import re
import shlex

import jsonschema
import pytest

from tests.cluster.manifests import (  # noqa: F401 - fixtures are used by name
    GIB, INSTANCE_SHAPES, TRAINER_ENV, _check_groups, _env, _pods, _ray_container, _sets, allocatable, k8s_docs, quantity, rayjob, rayjob_schema, wan_shape)
import yaml

from slotmem.config import load_config

# ----------------------------------------------------------------------------------------------
# KubeRay RayJob
# ----------------------------------------------------------------------------------------------


def _pod_resources(group: dict) -> dict[str, float]:
    """Ray resources of one pod: CPU/GPU from the container limits, custom ones from rayStartParams."""
    limits = _ray_container(group)["resources"]["limits"]
    params = group.get("rayStartParams", {})
    res = {"CPU": float(params.get("num-cpus", quantity(limits.get("cpu", 0)))),
           "GPU": float(limits.get("nvidia.com/gpu", 0))}
    if "resources" in params:  # KubeRay passes it verbatim to `ray start --resources=...`: a quoted JSON string
        res.update(json.loads(json.loads(params["resources"])))
    return res


def test_rayjob_schema_is_a_valid_schema_that_names_its_kuberay_version(rayjob_schema):
    jsonschema.Draft202012Validator.check_schema(rayjob_schema)
    header = rayjob_schema["$comment"]
    assert "KubeRay v1.7.0" in header and "ray.io_rayjobs.yaml" in header and "test_schema_agrees" in header


def test_rayjob_validates_against_the_schema(rayjob, rayjob_schema):
    jsonschema.Draft202012Validator(rayjob_schema).validate(rayjob)


def test_the_schema_rejects_what_kuberay_rejects(rayjob, rayjob_schema):
    """The schema can fail: unknown fields, a non-string rayStartParam, a bad quantity, a long name."""
    validator = jsonschema.Draft202012Validator(rayjob_schema)

    def broken(edit):
        doc = json.loads(json.dumps(rayjob))
        edit(doc)
        return list(validator.iter_errors(doc))

    assert broken(lambda d: d["spec"].update(shutdownAfterJobFinished=True))  # typo'd field
    assert broken(lambda d: d["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}))
    assert broken(lambda d: _ray_container(d["spec"]["rayClusterSpec"]["headGroupSpec"])["resources"]["limits"]
                  .update(memory="24 GiB"))
    assert broken(lambda d: d["metadata"].update(name="x" * 48))
    assert broken(lambda d: _ray_container(d["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]).update(gpus=4))


def test_schema_agrees_with_the_kuberay_crd(rayjob, rayjob_schema):
    """With the real CRD at hand: same property names, types and required fields; the manifest passes it too."""
    crd_path = os.environ.get("SLOTMEM_KUBERAY_CRD")
    if not crd_path:
        pytest.skip("set SLOTMEM_KUBERAY_CRD to KubeRay v1.7.0's ray.io_rayjobs.yaml to run this check")
    with open(crd_path) as f:
        crd = yaml.safe_load(f)
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    crd_schema = version["schema"]["openAPIV3Schema"]
    defs = rayjob_schema["$defs"]

    def resolve(node):
        while "$ref" in node:
            node = defs[node["$ref"].rsplit("/", 1)[-1]]
        return node

    problems: list[str] = []

    def compare(mine, theirs, path):
        mine = resolve(mine)
        if "type" in mine and "type" in theirs and mine["type"] != theirs["type"]:
            problems.append(f"{path}: type {mine['type']} vs CRD {theirs['type']}")
        if "properties" in mine and "properties" in theirs:
            ours, crds = set(mine["properties"]), set(theirs["properties"])
            if ours - crds:
                problems.append(f"{path}: not in the CRD: {sorted(ours - crds)}")
            if mine.get("additionalProperties") is False and crds - ours:
                problems.append(f"{path}: CRD fields missing here: {sorted(crds - ours)}")
            if mine.get("additionalProperties") is not False:
                problems.append(f"{path}: the CRD is strict here (no preserve-unknown-fields), the schema is not")
            if theirs.get("x-kubernetes-preserve-unknown-fields"):
                problems.append(f"{path}: the CRD keeps unknown fields here, the schema rejects them")
            missing = set(theirs.get("required", [])) - set(mine.get("required", []))
            if missing:
                problems.append(f"{path}: CRD requires {sorted(missing)}")
            for k in ours & crds:
                compare(mine["properties"][k], theirs["properties"][k], f"{path}.{k}")
        if "items" in mine and "items" in theirs:
            compare(mine["items"], theirs["items"], f"{path}[]")
        if isinstance(mine.get("additionalProperties"), dict) and isinstance(theirs.get("additionalProperties"), dict):
            compare(mine["additionalProperties"], theirs["additionalProperties"], f"{path}.*")

    compare(rayjob_schema, crd_schema, "RayJob")
    assert problems == []
    jsonschema.Draft7Validator(crd_schema).validate(rayjob)  # OpenAPI v3 structural schema, x-* ignored


def test_rayjob_follows_the_operators_rules(rayjob):
    """Checks KubeRay v1.7.0 does at reconcile time (controllers/ray/utils/validation.go) and list-map keys."""
    spec = rayjob["spec"]
    if spec.get("ttlSecondsAfterFinished", 0) > 0:
        assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("rayClusterSpec") or spec.get("clusterSelector")
    yaml.safe_load(spec["runtimeEnvYAML"])
    for name, group in _pods(rayjob).items():
        params = group.get("rayStartParams", {})
        assert "labels" not in params, f"{name}: use the group's labels field"
        assert not ({"num-cpus", "num-gpus", "memory", "resources"} & set(params) and group.get("resources")), \
            f"{name}: Ray resources in both rayStartParams and resources"
        if name != "head":
            assert 0 <= group["minReplicas"] <= group.get("replicas", group["minReplicas"]) <= group["maxReplicas"]
        pod = group["template"]["spec"]
        names = [c["name"] for c in pod["containers"]]
        volumes = [v["name"] for v in pod.get("volumes", [])]
        assert len(set(names)) == len(names) and len(set(volumes)) == len(volumes)
        for c in pod["containers"]:
            env_names = [e["name"] for e in c.get("env", [])]
            mounts = [m["mountPath"] for m in c.get("volumeMounts", [])]
            ports = [(p["containerPort"], p.get("protocol", "TCP")) for p in c.get("ports", [])]
            assert len(set(env_names)) == len(env_names) and len(set(mounts)) == len(mounts)
            assert len(set(ports)) == len(ports)
            assert {m["name"] for m in c.get("volumeMounts", [])} <= set(volumes), f"{name}: mount of a missing volume"


def test_rayjob_runs_the_pipeline_on_s3_and_cleans_up(rayjob, repo_root):
    assert rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    spec = rayjob["spec"]
    tokens = shlex.split(spec["entrypoint"])
    assert tokens[:4] == ["slotmem", "pipeline", "--config", "configs/wan2.1-1.3b.yaml"]
    assert os.path.isfile(f"{repo_root}/{tokens[3]}")
    overrides = [f"{k}={v}" for k, v in _sets(tokens).items()]
    cfg = load_config(f"{repo_root}/{tokens[3]}", overrides)  # the project's own validation of the overrides
    assert cfg.storage.root.startswith("s3://") and len(cfg.storage.root) > len("s3://")
    assert spec["shutdownAfterJobFinishes"] is True
    runtime_env = yaml.safe_load(spec["runtimeEnvYAML"])
    assert set(runtime_env) <= {"working_dir", "excludes", "env_vars", "py_modules", "config"}
    assert not runtime_env.get("env_vars"), "credentials and settings never travel in the runtime_env"
    assert runtime_env["working_dir"] == "/app"
    import ray

    assert spec["rayClusterSpec"]["rayVersion"] == ray.__version__


def test_rayjob_groups_match_the_wan_shape(rayjob, wan_shape):
    cluster = rayjob["spec"]["rayClusterSpec"]
    groups = {g["groupName"]: g for g in cluster["workerGroupSpecs"]}
    assert set(groups) == {"rollout", "trainer"}
    _check_groups(wan_shape, rollout=_pod_resources(groups["rollout"]), trainer=_pod_resources(groups["trainer"]),
                  head=_pod_resources(cluster["headGroupSpec"]),
                  min_nodes={k: g["minReplicas"] for k, g in groups.items()},
                  max_nodes={k: g["maxReplicas"] for k, g in groups.items()})
    for g in groups.values():
        assert g["minReplicas"] <= g["replicas"] <= g["maxReplicas"]


def test_rayjob_requests_fit_below_node_allocatable(rayjob):
    autoscaler = rayjob["spec"]["rayClusterSpec"]["autoscalerOptions"]["resources"]["requests"]
    for name, group in _pods(rayjob).items():
        pod = group["template"]["spec"]
        itype = pod["nodeSelector"]["node.kubernetes.io/instance-type"]
        assert itype in INSTANCE_SHAPES, f"{name}: {itype} has no shape in INSTANCE_SHAPES"
        shape = INSTANCE_SHAPES[itype]
        cpu = sum(quantity(c["resources"]["requests"]["cpu"]) for c in pod["containers"])
        mem = sum(quantity(c["resources"]["requests"]["memory"]) for c in pod["containers"]) / GIB
        if name == "head":  # KubeRay adds the autoscaler sidecar to the head pod
            cpu += quantity(autoscaler["cpu"])
            mem += quantity(autoscaler["memory"]) / GIB
        cpu_free, mem_free = allocatable(itype)
        assert cpu <= cpu_free, f"{name}: {cpu} CPU requested, {cpu_free:.2f} allocatable on {itype}"
        assert mem <= mem_free, f"{name}: {mem:.1f} GiB requested, {mem_free:.1f} allocatable on {itype}"
        for c in pod["containers"]:
            r = c["resources"]
            assert {k: quantity(v) for k, v in r["requests"].items()} == {k: quantity(v) for k, v in r["limits"].items()}, \
                f"{name}: limits must equal requests (Guaranteed QoS; KubeRay reads Ray's resources from limits)"
        gpus = quantity(_ray_container(group)["resources"]["limits"].get("nvidia.com/gpu", 0))
        assert gpus == shape["gpus"], f"{name}: one pod per node takes all {shape['gpus']} GPUs of {itype}"
        efa = quantity(_ray_container(group)["resources"]["limits"].get("vpc.amazonaws.com/efa", 0))
        assert efa <= (shape["efa_interfaces"] or 0)


def test_every_ray_pod_has_a_sized_dev_shm(rayjob):
    for name, group in _pods(rayjob).items():
        pod = group["template"]["spec"]
        container = _ray_container(group)
        (mount,) = [m for m in container.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == mount["name"]]
        empty_dir = volume["emptyDir"]
        assert empty_dir["medium"] == "Memory" and "sizeLimit" in empty_dir, f"{name}: unsized /dev/shm"
        shm = quantity(empty_dir["sizeLimit"])
        object_store = quantity(group["rayStartParams"]["object-store-memory"])
        memory_limit = quantity(container["resources"]["limits"]["memory"])
        # Ray refuses to start when the object store does not fit in /dev/shm (> 10 GB) and the
        # tmpfs pages count toward the container's memory limit
        assert object_store <= shm < memory_limit, f"{name}: object store {object_store}, shm {shm}"


def test_gpu_pods_tolerate_the_gpu_taint(rayjob):
    gpu_groups = 0
    for name, group in _pods(rayjob).items():
        pod = group["template"]["spec"]
        if quantity(_ray_container(group)["resources"]["limits"].get("nvidia.com/gpu", 0)) == 0:
            continue
        gpu_groups += 1
        assert any(t.get("key") == "nvidia.com/gpu" and t.get("effect") == "NoSchedule"
                   and t.get("operator") in ("Exists", "Equal") for t in pod.get("tolerations", [])), name
    assert gpu_groups == 2


def test_trainer_pods_have_efa_and_nccl_env(rayjob):
    trainer = _pods(rayjob)["trainer"]
    container = _ray_container(trainer)
    itype = trainer["template"]["spec"]["nodeSelector"]["node.kubernetes.io/instance-type"]
    assert quantity(container["resources"]["limits"]["vpc.amazonaws.com/efa"]) == INSTANCE_SHAPES[itype]["efa_interfaces"]
    env = _env(container)
    for k, v in TRAINER_ENV.items():
        assert k in env and (v is None or env[k] == v), f"trainer env {k}"


def test_pods_use_the_irsa_service_account(k8s_docs, rayjob):
    accounts = {d["metadata"]["name"]: d for d in k8s_docs if d.get("kind") == "ServiceAccount"}
    assert set(d["kind"] for d in k8s_docs) == {"ServiceAccount", "RayJob"}
    for name, group in _pods(rayjob).items():
        sa = group["template"]["spec"].get("serviceAccountName")
        assert sa in accounts, f"{name}: pods must run as the IRSA service account defined in this file"
        role = accounts[sa]["metadata"]["annotations"]["eks.amazonaws.com/role-arn"]
        assert re.fullmatch(r"arn:aws:iam::\d{12}:role/[\w+=,.@/-]+", role), role
        for c in group["template"]["spec"]["containers"]:
            for source in c.get("envFrom", []):
                ref = source.get("secretRef") or source.get("configMapRef") or {}
                assert not re.search(r"aws|s3", ref.get("name", ""), re.I), f"{name}: S3 credentials come from IRSA"
            for e in c.get("env", []):
                assert "secretKeyRef" not in e.get("valueFrom", {}) or not e["name"].startswith("AWS_"), name
