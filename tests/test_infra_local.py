"""The local multi-node proof (infra/local/cluster.py): two Ray nodes, MLflow and Prefect servers.

One stack per module, started on free ports in its own /tmp directory and stopped at the end
(process groups killed, directory removed), whatever happens in between. It does NOT use the
session's ``ray_session`` fixture: this process first leaves any Ray instance it is connected
to (``ray.shutdown()``), then connects to the stack's cluster as an operator's driver would
(``ray.address`` in params).

* A tiny CUnet run with 2 workers x 1 CPU on two nodes of 1 CPU each: capacity forces one
  worker per node; each node's own log directory then holds exactly one Ray Train worker,
  and DDP kept the two ranks' weights identical across the nodes.
* The run, its per-iteration metrics and the registered model reached the MLflow server over
  HTTP (REST API and MlflowClient on the http:// URI; artifacts through --serve-artifacts).
* The evaluation flow (flows/evaluate.py), run as `python -m flows.evaluate` with
  PREFECT_API_URL at the stack's server, is COMPLETED there, and logged its metrics to the
  training run on the MLflow server; the cugan-local work pool of prefect.yaml exists.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import pytest
import requests
import yaml

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
ITERATIONS = 6


def _log_tails(root: Path, lines: int = 5) -> str:
    out = []
    for log in sorted((root / "logs").glob("*.log")):
        text = log.read_text(errors="replace").strip().splitlines()[-lines:]
        out.append(f"--- {log.name}\n" + "\n".join(text))
    return "\n".join(out)


@pytest.fixture(scope="module")
def stack():
    ray = pytest.importorskip("ray")
    from infra.local import cluster

    ray.shutdown()  # leave any instance this process uses (e.g. the session's local one)
    root = Path(tempfile.mkdtemp(prefix="cugan-t-", dir="/tmp"))  # short: Ray's socket paths
    mp = pytest.MonkeyPatch()
    # as env.sh exports (infra/local/cluster.py RAY_ENV); inherited by the flow's subprocess
    for key, value in cluster.RAY_ENV.items():
        mp.setenv(key, value)
    try:
        try:
            started = cluster.start(root, num_cpus=1, strict=False, timeout=150)
        except cluster.StackError as err:
            pytest.fail(f"the local stack did not start: {err}\n{_log_tails(root)}")
        for note in started.notes:
            warnings.warn(note, stacklevel=1)
        yield started
    finally:
        ray.shutdown()
        cluster.stop(root)
        shutil.rmtree(root, ignore_errors=True)
        mp.undo()


@pytest.fixture(scope="module")
def trained(stack):
    """CUnet, tiny, 2 workers on the stack's cluster, tracked on its MLflow server."""
    from pipeline.config import parse_params
    from pipeline.train.testing import SyntheticData, TestHooks
    from pipeline.train.trainer import run_stage

    if stack.mlflow_uri is None:
        pytest.fail(f"MLflow server did not start: {stack.errors.get('mlflow')}")
    root = Path(stack.root)
    params = parse_params(
        {
            "base": {"pretrained": "random", "seed": 0},
            "loader": {"batch_size": 4, "crop": 64},
            "train_cunet": {
                "generator": "tiny",
                "iterations": ITERATIONS,
                "checkpoint_every": 3,
                "log_every": 1,
            },
            "ray": {
                "address": stack.ray_address,
                "num_workers": 2,
                "cpus_per_worker": 1,
                "use_gpu": False,
                "storage_path": str(root / "ray-storage"),
                "max_failures": 0,
            },
            "tracking": {
                "enabled": True,
                "uri": stack.mlflow_uri,
                "experiment": "infra-local",
                "log_model": True,
                "register_model": True,
            },
        }
    )
    with pytest.MonkeyPatch.context() as mp:
        # what an operator exports (env.sh): the workers get MLFLOW_TRACKING_* from the trainer
        for key, value in stack.env().items():
            mp.setenv(key, value)
        mp.delenv("CUGAN_MLFLOW_PARENT_RUN_ID", raising=False)
        result = run_stage(
            params,
            "cunet",
            out_dir=root / "train_cunet",
            test_hooks=TestHooks(synthetic=SyntheticData(num_samples=24, seed=0)),
        )
    return result


@pytest.fixture(scope="module")
def nodes(stack):
    """``ray.nodes()`` of the stack's cluster, seen from a driver connected to it."""
    import ray

    ray.shutdown()
    ray.init(address=stack.ray_address, log_to_driver=False)
    try:
        return [n for n in ray.nodes() if n["Alive"]]
    finally:
        ray.shutdown()


def _node_temp_dir(node: dict, stack) -> str:
    """The stack's temp dir a node's raylet socket lives in (which ``ray start`` it is)."""
    for role, info in stack.ray_nodes.items():
        if node["RayletSocketName"].startswith(info["temp_dir"] + os.sep):
            return role
    raise AssertionError(
        f"node {node['NodeID']} is not one of the stack's: {node['RayletSocketName']}"
    )


def test_two_ray_nodes_with_their_own_resources(stack, nodes):
    assert len(nodes) == 2, [n["NodeID"] for n in nodes]
    by_role = {_node_temp_dir(n, stack): n for n in nodes}
    assert set(by_role) == {"head", "worker"}
    assert by_role["head"]["NodeID"] != by_role["worker"]["NodeID"]
    assert by_role["head"]["Resources"].get("node_head") == 1
    assert "node_worker" not in by_role["head"]["Resources"]
    assert by_role["worker"]["Resources"].get("node_worker") == 1
    assert "node_head" not in by_role["worker"]["Resources"]
    for node in nodes:
        assert node["Resources"]["CPU"] == 1
    print(
        "nodes:",
        {
            role: (
                n["NodeID"][:12],
                n["NodeManagerAddress"],
                {k: v for k, v in n["Resources"].items() if k.startswith("node_") or k == "CPU"},
            )
            for role, n in by_role.items()
        },
    )


def _train_workers(temp_dir: str) -> dict[str, str]:
    """Ray Train worker logs (file -> text) under one node's temp dir: Ray writes
    ``:actor_name:<class>`` at the top of each actor's worker-*.out."""
    found = {}
    for out in Path(temp_dir).glob("session_*/logs/worker-*.out"):
        text = out.read_text(errors="replace")
        if ":actor_name:RayTrainWorker" in text:
            err = out.with_suffix(".err")
            found[out.name] = text + (err.read_text(errors="replace") if err.is_file() else "")
    return found


def test_training_ran_one_worker_on_each_node(stack, trained, nodes):
    assert trained.metrics["iteration"] == ITERATIONS
    assert trained.metrics["ddp/world_size"] == 2
    # gradients were all-reduced between the nodes: both ranks ended with identical weights
    assert trained.metrics["ddp/max_param_divergence"] == 0.0
    assert (trained.model_dir / "generator.safetensors").is_file()

    placement = {}
    for role, info in stack.ray_nodes.items():
        workers = _train_workers(info["temp_dir"])
        assert len(workers) == 1, (
            f"{role} node ran {len(workers)} Ray Train workers: {sorted(workers)}"
        )
        ((name, text),) = workers.items()
        ranks = sorted(set(re.findall(r"from rank (\d+)", text)))
        placement[role] = {
            "worker_log": name,
            "pid": name.rsplit("-", 1)[-1].split(".")[0],
            "ranks": ranks,
        }
    print("placement:", placement)
    seen = [r for p in placement.values() for r in p["ranks"]]
    if seen:  # Ray's "Reporting training result ... from rank N" lines, when it prints them
        assert sorted(seen) == ["0", "1"], placement


def test_run_reached_the_mlflow_server_over_http(stack, trained):
    from mlflow import MlflowClient

    uri = stack.mlflow_uri
    assert uri.startswith("http://127.0.0.1:")
    assert trained.tracking.mode == "mlflow" and trained.tracking.uri == uri
    run_id = trained.tracking.run_id

    # the REST API itself
    resp = requests.get(f"{uri}/api/2.0/mlflow/runs/get", params={"run_id": run_id}, timeout=30)
    assert resp.status_code == 200, resp.text[:300]
    info = resp.json()["run"]["info"]
    assert info["status"] == "FINISHED"
    tags = {t["key"]: t["value"] for t in resp.json()["run"]["data"].get("tags", [])}
    assert tags.get("mlflow.parentRunId") == trained.tracking.parent_run_id
    assert tags.get("ray.run_name", "").startswith("train_cunet-")

    client = MlflowClient(tracking_uri=uri)
    history = client.get_metric_history(run_id, "loss/mse")
    assert [m.step for m in history] == list(range(1, ITERATIONS + 1))  # logged by rank 0 on a node
    assert client.get_run(run_id).data.params["ray.num_workers"] == "2"

    # the model went through the server's artifact proxy into its artifact directory
    versions = client.search_model_versions("name='cunet'")
    assert [v.run_id for v in versions] == [run_id]
    stored = list((Path(stack.root) / "mlflow" / "artifacts").rglob("*"))
    assert any(p.name == "MLmodel" for p in stored), "no MLmodel under the server's artifacts"
    print(
        f"mlflow: run {run_id} on {uri} (backend store: {stack.mlflow_backend}); "
        f"{len(history)} loss/mse points; model cunet v{versions[0].version}"
    )


def test_evaluation_flow_completes_on_the_prefect_server(stack, trained):
    from tests import evalkit

    if stack.prefect_api_url is None:
        pytest.fail(f"Prefect server did not start: {stack.errors.get('prefect')}")
    root = Path(stack.root) / "evaluate"
    evalkit.make_eval_set(root / "sets")
    params = root / "params.yaml"
    params.write_text(
        yaml.safe_dump(
            {
                "base": {"pretrained": "random", "seed": 0},
                "evalsets": {"settings": [list(s) for s in evalkit.SETTINGS]},
                "evaluate": {
                    "sets": [evalkit.SET_NAME],
                    "device": "cpu",
                    "figures": {"enabled": False},
                },
                "tracking": {"uri": stack.mlflow_uri},
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "MLFLOW_"))}
    env.update(stack.env())
    env["PREFECT_HOME"] = str(root / "prefect-client")
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "flows.evaluate",
            "--model",
            f"cunet:mse:{trained.model_dir}",
            "--evalsets",
            str(root / "sets"),
            "--out",
            str(root / "out"),
            "--params",
            str(params),
            "--tracking-uri",
            stack.mlflow_uri,
            "--no-figures",
        ],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=240,
        check=False,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]

    api = stack.prefect_api_url
    resp = requests.post(
        f"{api}/flow_runs/filter",
        timeout=30,
        json={"flows": {"name": {"any_": ["cugan-evaluate"]}}, "limit": 10},
    )
    assert resp.status_code == 200, resp.text[:300]
    runs = resp.json()
    assert [r["state_type"] for r in runs] == ["COMPLETED"], runs
    tasks = requests.post(
        f"{api}/task_runs/filter", timeout=30, json={"flow_runs": {"id": {"any_": [runs[0]["id"]]}}}
    ).json()
    assert tasks and {t["state_type"] for t in tasks} == {"COMPLETED"}

    pools = requests.post(f"{api}/work_pools/filter", json={}, timeout=30).json()
    assert {(p["name"], p["type"]) for p in pools} >= {("cugan-local", "process")}
    deployed = yaml.safe_load((REPO / "prefect.yaml").read_text())
    assert {d["work_pool"]["name"] for d in deployed["deployments"]} == {"cugan-local"}

    # the flow logged its metrics to the training run, on the same MLflow server
    from mlflow import MlflowClient

    metrics = (
        MlflowClient(tracking_uri=stack.mlflow_uri).get_run(trained.tracking.run_id).data.metrics
    )
    key = f"eval/{evalkit.SET_NAME}/all/psnr_rgb"
    assert key in metrics
    print(
        f"prefect: flow run {runs[0]['name']} {runs[0]['state_type']} on {api} "
        f"(database: {stack.prefect_database}); {len(tasks)} task runs; {key} = {metrics[key]:.2f}"
    )
