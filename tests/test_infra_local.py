"""The local multi-node proof (infra/local/cluster.py): two Ray nodes, MLflow and Prefect servers
on PostgreSQL.

One stack per module, started on free ports in its own /tmp directory and stopped at the end
(process groups killed, directory removed), whatever happens in between. A component that does
not start fails the module (no fallback is accepted). It does NOT use the session's
``ray_session`` fixture: this process first leaves any Ray instance it is connected to
(``ray.shutdown()``), then connects to the stack's cluster as an operator's driver would
(``ray.address`` in params, ``RAY_AUTH_MODE=token`` + ``RAY_AUTH_TOKEN_PATH`` from env.sh).

* Token authentication: both nodes run with this stack's token; a driver without it, or with a
  wrong one, is refused; Ray printed no token-auth warning anywhere.
* PostgreSQL for real: the MLflow server's backend store and the Prefect server's database are
  the stack's PostgreSQL databases (read back with psql: the runs, registered versions, aliases
  and flow runs the tests created are rows there), with the drivers named in the URIs.

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
    try:
        try:
            started = cluster.start(root, num_cpus=1, timeout=150)
        except cluster.StackError as err:
            pytest.fail(f"the local stack did not start: {err}\n{_log_tails(root)}")
        # the driver's side of token auth, as env.sh exports it; inherited by the flow's
        # subprocess too. Ray reads RAY_AUTH_MODE into its config when it is imported, and this
        # process imported it before the stack existed: reload the config the way Ray's own
        # token set-up does (ray._private.authentication: Config.initialize), as a fresh
        # process that sourced env.sh would have it.
        for key, value in started.ray_env().items():
            mp.setenv(key, value)
        mp.delenv("RAY_AUTH_TOKEN", raising=False)
        from ray._raylet import Config

        Config.initialize("")
        yield started
    finally:
        ray.shutdown()
        cluster.stop(root)
        shutil.rmtree(root, ignore_errors=True)
        mp.undo()
        from ray._raylet import Config

        Config.initialize("")  # back to the environment this process had


@pytest.fixture(scope="module")
def trained(stack):
    """CUnet, tiny, 2 workers on the stack's cluster, tracked on its MLflow server."""
    from pipeline.config import parse_params
    from pipeline.train.testing import SyntheticData, TestHooks
    from pipeline.train.trainer import run_stage

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
        f"mlflow: run {run_id} on {uri} (backend store: {stack.mlflow_backend_store}); "
        f"{len(history)} loss/mse points; model cunet v{versions[0].version}"
    )


def _proc_args(pid: int) -> list[str]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().decode().split("\0")


def _proc_env(pid: int) -> dict[str, str]:
    items = Path(f"/proc/{pid}/environ").read_bytes().decode(errors="replace").split("\0")
    return dict(item.split("=", 1) for item in items if "=" in item)


def test_mlflow_server_runs_on_postgresql_register_alias_search(stack, trained):
    """The server's backend store is the stack's PostgreSQL (psycopg2, named in the URI), and
    the registry and search queries that psycopg 3 breaks on (integer = character varying,
    mlflow #9151/#17013/#24514) work on it: register -> alias -> search_runs, each result read
    back from the database's own tables."""
    from mlflow import MlflowClient

    from infra.local import cluster

    backend = stack.mlflow_backend_store
    assert backend == (
        f"{cluster.MLFLOW_DB_SCHEME}://{cluster.PG_USER}@127.0.0.1:{stack.postgres['port']}/mlflow"
    )
    args = _proc_args(int(stack.procs["mlflow"]["pid"]))  # what the server really runs with
    assert args[args.index("--backend-store-uri") + 1] == backend, args
    assert not list((Path(stack.root) / "mlflow").rglob("*.db")), "MLflow wrote a SQLite file"

    client = MlflowClient(tracking_uri=stack.mlflow_uri)
    run_id = trained.tracking.run_id
    # the training's run and registration are rows in PostgreSQL
    assert [run_id, "FINISHED"] in cluster.psql(
        stack, "mlflow", "SELECT run_uuid, status FROM runs"
    )
    (registered,) = client.search_model_versions("name = 'cunet'")
    assert cluster.psql(
        stack, "mlflow", "SELECT version, run_id FROM model_versions WHERE name = 'cunet'"
    ) == [[registered.version, run_id]]

    # register: a second model with two versions of the run's model
    name = "cunet-pg-check"
    client.create_registered_model(name)
    # the training logged an MLflow 3 LoggedModel: its version's source is models:/<model_id>
    model_id = registered.source.removeprefix("models:/")
    assert model_id.startswith("m-"), registered.source
    source = {"source": registered.source, "run_id": run_id, "model_id": model_id}
    v1 = client.create_model_version(name, **source)
    v2 = client.create_model_version(name, **source)
    assert (v1.version, v2.version) == ("1", "2")
    assert client.get_model_version(name, v1.version).run_id == run_id  # version: int column

    # alias: champion -> v2 with the old one kept as previous, then moved back (a rollback)
    client.set_registered_model_alias(name, "champion", v1.version)
    client.set_registered_model_alias(name, "previous", v1.version)
    client.set_registered_model_alias(name, "champion", v2.version)
    assert client.get_model_version_by_alias(name, "champion").version == v2.version
    assert client.get_model_version_by_alias(name, "previous").version == v1.version
    client.set_registered_model_alias(name, "champion", v1.version)
    client.delete_registered_model_alias(name, "previous")
    assert cluster.psql(
        stack,
        "mlflow",
        f"SELECT alias, version FROM registered_model_aliases WHERE name = '{name}'",
    ) == [["champion", v1.version]]
    client.set_model_version_tag(name, v2.version, "promotion", "rejected")
    assert sorted(v.version for v in client.search_model_versions(f"name = '{name}'")) == ["1", "2"]
    assert sorted(
        v.version for v in client.search_model_versions(f"name = '{name}' AND run_id = '{run_id}'")
    ) == ["1", "2"]
    client.set_registered_model_alias("cunet", "champion", registered.version)
    assert client.get_model_version_by_alias("cunet", "champion").run_id == run_id

    # search_runs: metric, param, tag and attribute filters, ordered, on the training run
    experiment_id = client.get_run(run_id).info.experiment_id
    found = client.search_runs(
        [experiment_id],
        "metrics.`loss/mse` > 0 AND params.`ray.num_workers` = '2' "
        "AND tags.`ray.run_name` LIKE 'train_cunet-%' AND attributes.status = 'FINISHED'",
        order_by=["metrics.`loss/mse` ASC", "attributes.start_time DESC"],
        max_results=10,
    )
    assert [r.info.run_id for r in found] == [run_id]
    assert client.search_runs([experiment_id], "params.`ray.num_workers` = '3'") == []
    print(
        f"mlflow on PostgreSQL: {backend}; {name} v1/v2 registered, champion={v1.version}; "
        f"search_runs found {run_id}"
    )


def test_ray_cluster_requires_its_token(stack, nodes):
    """Token auth is on, deliberately: both nodes were started with this stack's token, the
    driver connected with it (``nodes``), and drivers with a wrong token or none are refused."""
    token = Path(stack.ray_auth_token_path)
    assert token.stat().st_mode & 0o777 == 0o600
    assert re.fullmatch(r"[0-9a-f]{64}", token.read_text())
    for role in ("head", "worker"):
        env = _proc_env(int(stack.procs[f"ray-{role}"]["pid"]))
        assert env.get("RAY_AUTH_MODE") == "token", role
        assert env.get("RAY_AUTH_TOKEN_PATH") == str(token), role
    assert "RAY_AUTH_TOKEN_PATH" in (Path(stack.root) / "env.sh").read_text()

    wrong = Path(stack.root) / "wrong-token"
    wrong.write_text("0" * 64)
    probe = (
        "import ray\n"
        "try:\n"
        f"    ray.init(address={stack.ray_address!r}, log_to_driver=False)\n"
        "except Exception as err:\n"
        "    print('REFUSED', type(err).__name__, str(err).splitlines()[0][:200])\n"
        "    raise SystemExit(3)\n"
        "print('CONNECTED', len(ray.nodes()))\n"
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    base["HOME"] = str(Path(stack.root) / "no-home")  # no ~/.ray/auth_token to fall back on
    cases = {
        "wrong token": {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(wrong)},
        "no token": {"RAY_AUTH_MODE": "disabled"},
        "right token": stack.ray_env(),
    }
    outcome = {}
    for case, extra in cases.items():
        done = subprocess.run(
            [sys.executable, "-c", probe],
            env={**base, **extra},
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        outcome[case] = (done.returncode, done.stdout + done.stderr)
    assert outcome["right token"][0] == 0, outcome["right token"][1][-2000:]
    assert "CONNECTED 2" in outcome["right token"][1]
    assert "Token authentication is" not in outcome["right token"][1]  # no warning
    for case in ("wrong token", "no token"):
        code, text = outcome[case]
        assert code == 3 and "CONNECTED" not in text, (case, text[-2000:])
        # refused by the GCS for its token, not for some other reason
        assert "InvalidAuthToken" in text, (case, text[-2000:])
    # no token-auth warning from any process of the cluster (mode and token set deliberately)
    for info in stack.procs.values():
        if "ray-" in info["log"]:
            assert "Token authentication is" not in Path(info["log"]).read_text(errors="replace")
    print("ray token auth:", {k: v[0] for k, v in outcome.items()})


def test_evaluation_flow_completes_on_the_prefect_server(stack, trained):
    from tests import evalkit

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

    # ... and all of it is in the stack's PostgreSQL database `prefect`, not in a SQLite file
    from infra.local import cluster

    assert stack.prefect_database.startswith(f"{cluster.PREFECT_DB_SCHEME}://")
    assert stack.prefect_database.endswith(f":{stack.postgres['port']}/prefect")
    rows = cluster.psql(
        stack,
        "prefect",
        "SELECT fr.id, fr.state_type FROM flow_run fr JOIN flow f ON f.id = fr.flow_id "
        "WHERE f.name = 'cugan-evaluate'",
    )
    assert rows == [[runs[0]["id"], "COMPLETED"]], rows
    pool_rows = cluster.psql(stack, "prefect", "SELECT name, type FROM work_pool")
    assert ["cugan-local", "process"] in pool_rows, pool_rows
    task_rows = cluster.psql(
        stack, "prefect", f"SELECT count(*) FROM task_run WHERE flow_run_id = '{runs[0]['id']}'"
    )
    assert int(task_rows[0][0]) == len(tasks)
    assert not list(Path(stack.prefect_home).rglob("*.db")), "Prefect wrote a SQLite database"
