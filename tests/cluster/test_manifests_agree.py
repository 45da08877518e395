"""The deployment files agree with each other and the Dockerfile: idle timeouts, S3 storage, no credentials, one image and one Ray version."""

from __future__ import annotations

import re
import shlex
import tomllib

from packaging.requirements import Requirement

from slotmem.config import load_config

from tests.cluster.manifests import (  # noqa: F401 - fixtures are used by name
    ACCESS_KEY_ID, FORBIDDEN_ENV, _env, _launcher_submit_command, _pods, _sets, dockerfile, k8s_docs, launcher, rayjob)

# ----------------------------------------------------------------------------------------------
# Both manifests and the Dockerfile
# ----------------------------------------------------------------------------------------------


def test_idle_timeouts_match(launcher, rayjob):
    seconds = rayjob["spec"]["rayClusterSpec"]["autoscalerOptions"]["idleTimeoutSeconds"]
    assert rayjob["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    assert launcher["idle_timeout_minutes"] * 60 == seconds
    for group in rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]:
        assert group.get("idleTimeoutSeconds", seconds) == seconds


def test_storage_root_is_s3_in_both_manifests(launcher, rayjob, repo_root):
    submit = _launcher_submit_command(repo_root)
    assert submit[-1] == "pipeline" and submit[-2] == "--"
    job = shlex.split(rayjob["spec"]["entrypoint"])
    roots = {}
    for which, tokens in (("launcher", submit), ("rayjob", job)):
        sets = _sets(tokens)
        config = tokens[tokens.index("--config") + 1]
        cfg = load_config(f"{repo_root}/{config}", [f"{k}={v}" for k, v in sets.items()])
        assert cfg.storage.root.startswith("s3://"), f"{which}: storage.root {cfg.storage.root!r}"
        assert cfg.storage.s3_region == launcher["provider"]["region"], f"{which}: bucket region"
        roots[which] = cfg.storage.root
    assert roots["launcher"] == roots["rayjob"]


def test_both_manifests_name_every_weight_and_mount_where_they_live(launcher, rayjob, repo_root):
    """No empty weight path (the 1.3B preset refuses those), each one under /models, which every Ray container
    of both manifests mounts read-only."""
    from slotmem.config import check_weights

    for tokens in (_launcher_submit_command(repo_root), shlex.split(rayjob["spec"]["entrypoint"])):
        sets = _sets(tokens)
        cfg = load_config(f"{repo_root}/{tokens[tokens.index('--config') + 1]}", [f"{k}={v}" for k, v in sets.items()])
        check_weights(cfg, "pipeline")
        paths = [cfg.model.model_path, cfg.model.text_encoder_path, cfg.model.tokenizer_path, cfg.model.vae_path,
                 cfg.teacher.model_path, cfg.trainer.critic_path]
        assert all(p.startswith("/models/") for p in paths), paths
    assert "--volume /mnt/models:/models:ro" in launcher["docker"]["run_options"]
    assert any("/mnt/models" in c for c in launcher["initialization_commands"])
    for name, group in _pods(rayjob).items():
        spec = group["template"]["spec"]
        mounts = {m["name"]: m for m in spec["containers"][0]["volumeMounts"]}
        assert mounts["models"]["mountPath"] == "/models" and mounts["models"]["readOnly"], name
        volumes = {v["name"]: v for v in spec["volumes"]}
        assert volumes["models"]["persistentVolumeClaim"] == {"claimName": "slotmem-models", "readOnly": True}, name


def test_no_aws_secrets_in_either_manifest(repo_root, launcher, k8s_docs):
    for path in ("ray_cluster.yaml", "cluster/kuberay-rayjob.yaml", "Dockerfile"):
        with open(f"{repo_root}/{path}") as f:
            text = f.read()
        for name in FORBIDDEN_ENV:
            assert name not in text, f"{path} mentions {name}"
        assert not ACCESS_KEY_ID.search(text), f"{path} holds something shaped like an AWS access key id"
    rayjob = [d for d in k8s_docs if d["kind"] == "RayJob"][0]
    for group in _pods(rayjob).values():
        for c in group["template"]["spec"]["containers"]:
            assert not set(_env(c)) & set(FORBIDDEN_ENV)


def test_image_and_versions_match_the_dockerfile(dockerfile, launcher, rayjob, repo_root):
    ins = dockerfile["instructions"]
    froms = [args for op, args in ins if op == "FROM"]
    assert len(froms) == 1
    base = re.fullmatch(r"rayproject/ray:(\d+\.\d+\.\d+)-py(\d)(\d+)-(cu\d+)", froms[0])
    assert base, f"base image {froms[0]!r}: expected rayproject/ray:X.Y.Z-py311-cuXYZ"
    base_ray, py_major, py_minor, base_cuda = base.groups()
    assert (py_major, py_minor) == ("3", "11") and base_cuda == "cu128"

    runs = " ".join(args for op, args in ins if op == "RUN")
    pins = set(re.findall(r'"ray\[([\w,]+)\]==(\d+\.\d+\.\d+)"', runs))
    assert len(pins) == 1, f"one Ray pin in the Dockerfile, got {pins}"
    ((extras, ray_pin),) = pins
    assert set(extras.split(",")) == {"default", "train", "data"}
    args = dict(re.match(r"(\w+)=(\S+)", a).groups() for op, a in ins if op == "ARG" and "=" in a)
    with open(f"{repo_root}/Makefile") as f:
        makefile_torch = re.search(r"torch==(\d+\.\d+\.\d+)", f.read()).group(1)
    assert args["TORCH_VERSION"] == makefile_torch and args["TORCH_CUDA"] == base_cuda
    assert '"torch==${TORCH_VERSION}+${TORCH_CUDA}"' in runs and "download.pytorch.org/whl/${TORCH_CUDA}" in runs
    assert "nvidia-ml-py" in runs and re.search(r"pip install .* /app\b", runs)
    envs = " ".join(a for op, a in ins if op == "ENV")
    assert re.search(r"\bHF_HUB_OFFLINE=1\b", envs)
    users = [a for op, a in ins if op == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must end on a non-root user"

    # one Ray version everywhere: base image, pip pin, KubeRay rayVersion, launcher check, the installed Ray
    import ray

    setup_check = re.search(r"ray\.__version__ == '(\d+\.\d+\.\d+)'", " ".join(launcher["setup_commands"])).group(1)
    versions = {"Dockerfile FROM": base_ray, "Dockerfile pip": ray_pin, "ray_cluster.yaml": setup_check,
                "rayVersion": rayjob["spec"]["rayClusterSpec"]["rayVersion"], "installed": ray.__version__}
    assert len(set(versions.values())) == 1, versions

    # one image everywhere: the documented build command's tag, pushed, named by both manifests
    built = {m for c in dockerfile["comments"] for m in re.findall(r"docker build -t (\S+) \.", c)}
    pushed = {m for c in dockerfile["comments"] for m in re.findall(r"docker push (\S+)", c)}
    assert len(built) == 1 and built == pushed, (built, pushed)
    (image,) = built
    images = {launcher["docker"]["image"]}
    images |= {c["image"] for g in _pods(rayjob).values() for c in g["template"]["spec"]["containers"]}
    if "image" in rayjob["spec"]["rayClusterSpec"].get("autoscalerOptions", {}):
        images.add(rayjob["spec"]["rayClusterSpec"]["autoscalerOptions"]["image"])
    assert images == {image}
    with open(f"{repo_root}/pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    assert image.rsplit(":", 1)[1] == project["version"], "image tag = project version"


def test_pyproject_admits_the_pinned_ray(dockerfile, repo_root):
    with open(f"{repo_root}/pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    (ray_req,) = [Requirement(d) for d in project["dependencies"] if Requirement(d).name == "ray"]
    pin = re.search(r'"ray\[[\w,]+\]==(\d+\.\d+\.\d+)"', dockerfile["text"]).group(1)
    assert {"default", "train", "data"} <= ray_req.extras
    assert ray_req.specifier.contains(pin), f"pyproject's {ray_req} excludes the image's ray {pin}"


def test_dockerignore_keeps_the_build_context_small_but_complete(repo_root):
    with open(f"{repo_root}/.dockerignore") as f:
        patterns = {ln.strip() for ln in f if ln.strip() and not ln.startswith("#")}
    assert {".git", ".venv", "runs", "mlruns"} <= patterns
    # what `pip install /app` needs (the packages pyproject includes, its readme) and what the RayJob's
    # working_dir needs (configs/) stay in the context
    with open(f"{repo_root}/pyproject.toml", "rb") as f:
        pyproject = tomllib.load(f)
    packages = {p.rstrip("*") for p in pyproject["tool"]["setuptools"]["packages"]["find"]["include"]}
    needed = packages | {"pyproject.toml", pyproject["project"]["readme"], "configs"}
    assert not needed & {p.strip("/") for p in patterns}
