"""Registry URIs wherever a model is named (``cugan restore``, ``cugan studio``, the loader),
against real sqlite stores in tmp_path: which generator of a version each argument takes, the
download cache (reused when complete and verified, never half-written), one-line errors for a
missing name, alias or version and for a store that is not there, and the CLI end to end."""

from __future__ import annotations

import socket
from pathlib import Path

import mlflow.artifacts
import numpy as np
import pytest
import torch
from mlflow import MlflowClient

from models.dni import blend_generators
from pipeline import cli
from pipeline.checkpoint import load_checkpoint
from pipeline.imageio import read_rgb8
from pipeline.inference import load_model_for_inference
from pipeline.inference.loading import registered_cache_dir
from pipeline.studio.session import ModelSession, ModelSpec
from pipeline.studio.ui import Studio
from pipeline.tracking.registry import DOWNLOAD_RECORD, ModelRegistry, resolve_model_uri
from tests import studio_fixtures as kit


def _register_all(client: MlflowClient, root: Path, artifact_location: str | None) -> dict:
    """``cunet`` versions 1 (seed 1, ``champion``) and 2 (seed 2), and ``cugan`` version 1
    holding ``mse`` (seed 1, the CUnet it started from) and ``gan`` (seed 7), ``champion``,
    laid out as the training stages register them (``model/artifacts/<part>``)."""
    exp = client.create_experiment("reg", artifact_location=artifact_location)
    ckpts = {seed: kit.tiny_checkpoint(root / f"ck{seed}", seed) for seed in (1, 2, 7)}

    def register(name: str, parts: dict[str, int]) -> str:
        run = client.create_run(exp).info.run_id
        for part, seed in parts.items():
            client.log_artifacts(run, str(ckpts[seed]), artifact_path=f"model/artifacts/{part}")
        client.set_terminated(run)
        if not client.search_registered_models(f"name = '{name}'"):
            client.create_registered_model(name)
        source = f"{client.get_run(run).info.artifact_uri}/model"
        return str(client.create_model_version(name, source=source, run_id=run).version)

    assert register("cunet", {"mse": 1}) == "1" and register("cunet", {"mse": 2}) == "2"
    assert register("cugan", {"mse": 1, "gan": 7}) == "1"
    client.set_registered_model_alias("cunet", "champion", "1")
    client.set_registered_model_alias("cugan", "champion", "1")
    return ckpts


@pytest.fixture
def store(tmp_path, monkeypatch):
    """A sqlite store in tmp_path holding :func:`_register_all`'s versions; the user cache is
    in tmp_path."""
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CUGAN_CACHE_DIR", str(tmp_path / "cache"))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    client = MlflowClient(uri)
    ckpts = _register_all(client, tmp_path, (tmp_path / "art").as_uri())
    return {"uri": uri, "client": client, "ckpt": ckpts}


def _same(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sb = b.state_dict()
    return all(torch.equal(v, sb[k]) for k, v in a.state_dict().items())


def _weights(seed_path: Path) -> torch.nn.Module:
    return load_checkpoint(seed_path).model


# ---------------------------------------------------------------------------------------------
# which generator each argument takes


def test_versions_and_aliases_load_their_generators(store) -> None:
    uri, ck = store["uri"], store["ckpt"]
    by_version = load_model_for_inference("models:/cunet/2", tracking_uri=uri)
    assert _same(by_version.model, _weights(ck[2])) and by_version.names == ("models:/cunet/2",)
    champion = load_model_for_inference("models:/cunet@champion", tracking_uri=uri)
    assert _same(champion.model, _weights(ck[1]))
    assert champion.names == ("models:/cunet/1",)  # pinned: the alias may move later
    assert "models:/cunet@champion" in champion.source
    cached = champion.parts[0].path
    assert cached.is_relative_to(registered_cache_dir()) and cached.name == "mse"


def test_a_cugan_version_gives_its_gan_generator_and_both_ends_of_alpha(store) -> None:
    uri, ck = store["uri"], store["ckpt"]
    mse, gan = _weights(ck[1]), _weights(ck[7])
    one = load_model_for_inference("models:/cugan/1", tracking_uri=uri)
    assert _same(one.model, gan)  # --model: the generator the CUGAN stage trained
    roles = load_model_for_inference(
        mse_model="models:/cugan/1", gan_model="models:/cugan@champion", alpha=0.3, tracking_uri=uri
    )
    assert _same(roles.parts[0].model, mse) and _same(roles.parts[1].model, gan)
    assert _same(roles.model, blend_generators(mse, gan, 0.3))
    own = load_model_for_inference("models:/cugan/1", alpha=0.3, tracking_uri=uri)
    assert _same(own.model, roles.model)  # --alpha with --model: the version's own pair
    assert own.names == ("models:/cugan/1", "models:/cugan/1")
    mixed = load_model_for_inference(
        mse_model="models:/cunet@champion", gan_model="models:/cugan@champion", alpha=0.3,
        tracking_uri=uri,
    )  # fmt: skip
    assert _same(mixed.model, roles.model)  # cunet v1 is the CUnet cugan v1 started from
    with pytest.raises(ValueError, match=r"^models:/cunet/1: no 'gan' generator .*\(mse\)$"):
        load_model_for_inference("models:/cunet/1", alpha=0.5, tracking_uri=uri)
    with pytest.raises(ValueError, match="no 'gan' generator"):
        load_model_for_inference(
            mse_model="models:/cunet/1", gan_model="models:/cunet/2", alpha=0.5, tracking_uri=uri
        )
    with pytest.raises(ValueError, match=r"not both \(--alpha with --model takes a registry"):
        from pipeline.cli.restore import MODEL_FLAGS

        load_model_for_inference(str(ck[1]), alpha=0.5, names=MODEL_FLAGS)


# ---------------------------------------------------------------------------------------------
# the download cache


def test_downloads_are_reused_only_when_complete_and_verified(store, monkeypatch) -> None:
    uri, client = store["uri"], store["client"]
    first = load_model_for_inference("models:/cunet/1", tracking_uri=uri).parts[0].path
    version_dir = first.parents[2]  # .../<store>/cunet/1 (model/artifacts/mse below)
    assert version_dir.name == "1" and version_dir.parent.name == "cunet"
    assert (version_dir / DOWNLOAD_RECORD).is_file()
    calls = []
    real = mlflow.artifacts.download_artifacts

    def counting(*args, **kwargs):
        calls.append(kwargs["artifact_uri"])
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", counting)
    again = load_model_for_inference("models:/cunet@champion", tracking_uri=uri)
    assert again.parts[0].path == first and calls == []  # the same version: reused
    # A damaged copy fails its sha256 check: downloaded again, whole, and it loads.
    tensors = first / "generator.safetensors"
    tensors.write_bytes(tensors.read_bytes()[:-8] + b"\0" * 8)
    repaired = load_model_for_inference("models:/cunet/1", tracking_uri=uri)
    assert len(calls) == 1 and _same(repaired.model, _weights(store["ckpt"][1]))
    # An alias that moved is looked up again and names the other version.
    client.set_registered_model_alias("cunet", "champion", "2")
    moved = load_model_for_inference("models:/cunet@champion", tracking_uri=uri)
    assert moved.names == ("models:/cunet/2",) and len(calls) == 2
    # Nothing half-written is left next to the versions (staging and old copies are gone).
    leftovers = [p.name for p in version_dir.parent.iterdir() if p.name.startswith(".")]
    assert leftovers == [] and sorted(p.name for p in version_dir.parent.iterdir()) == ["1", "2"]


def test_a_failed_download_leaves_nothing(store, monkeypatch) -> None:
    def broken(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", broken)
    with pytest.raises(ValueError, match=r"^models:/cunet/1: download of .*No space left"):
        load_model_for_inference("models:/cunet/1", tracking_uri=store["uri"])
    cunet = next(registered_cache_dir().iterdir()) / "cunet"
    assert not cunet.exists() or list(cunet.iterdir()) == []


# ---------------------------------------------------------------------------------------------
# errors: one line


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_missing_names_and_stores_are_one_line_in_the_cli(store, tmp_path, capsys) -> None:
    image = kit.photo(tmp_path / "in.png", 32, 32)
    absent = tmp_path / "absent.db"
    cases = {
        ("models:/nope/1", store["uri"]): "models:/nope/1: ",
        ("models:/cunet/9", store["uri"]): "models:/cunet/9: ",
        ("models:/cunet@best", store["uri"]): "model 'cunet' has no alias 'best'",
        ("models:/nope@champion", store["uri"]): "no registered model 'nope'",
        ("models:/cunet", store["uri"]): "not a registered model URI",
        ("models:/cunet/1", f"sqlite:///{absent}"): f"no MLflow store at {absent}",
        ("models:/cunet/1", f"http://127.0.0.1:{_free_port()}"): "cannot be used: unreachable",
    }
    for (model, tracking), words in cases.items():
        argv = ["restore", image, tmp_path / "o.png", "--model", model, "--tracking-uri", tracking]
        argv += ["--blur", "1", "--noise", "5"]
        assert cli.main([str(a) for a in argv]) == 2, model
        err = capsys.readouterr().err.strip()
        assert err.startswith("cugan: error: ") and words in err and "\n" not in err, err
    assert not absent.exists()  # MLflow was never asked to create an empty store
    assert not (tmp_path / "o.png").exists()


# ---------------------------------------------------------------------------------------------
# end to end


def _restore(tmp_path: Path, name: str, *model_args: str) -> np.ndarray:
    image = tmp_path / "in.png"
    if not image.exists():
        kit.photo(image, 48, 64)
    out = tmp_path / f"{name}.png"
    argv = ["restore", str(image), str(out), "--blur", "1.5", "--noise", "12", "-q", *model_args]
    assert cli.main(argv) == 0
    return read_rgb8(out).array


def test_cli_restore_with_registry_uris_equals_the_checkpoints(
    store, tmp_path, monkeypatch
) -> None:
    uri, ck = store["uri"], store["ckpt"]
    by_uri = _restore(tmp_path, "u", "--model", "models:/cunet/2", "--tracking-uri", uri)
    np.testing.assert_array_equal(by_uri, _restore(tmp_path, "p", "--model", str(ck[2])))
    pair = ["--mse-model", str(ck[1]), "--gan-model", str(ck[7]), "--alpha", "0.4"]
    local = _restore(tmp_path, "pair", *pair)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # the store from the environment
    champions = _restore(
        tmp_path,
        "champions",
        "--mse-model",
        "models:/cunet@champion",
        "--gan-model",
        "models:/cugan@champion",
        "--alpha",
        "0.4",
    )
    np.testing.assert_array_equal(champions, local)
    own = _restore(tmp_path, "own", "--model", "models:/cugan/1", "--alpha", "0.4")
    np.testing.assert_array_equal(own, local)
    gan = _restore(tmp_path, "gan", "--model", "models:/cugan@champion")
    np.testing.assert_array_equal(gan, _restore(tmp_path, "g", "--model", str(ck[7])))


def test_relative_store_from_params_yaml(store, tmp_path, monkeypatch) -> None:
    """Without --tracking-uri or $MLFLOW_TRACKING_URI: ``tracking.uri`` of ./params.yaml."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "params.yaml").write_text("tracking:\n  uri: sqlite:///mlflow.db\n")
    got = _restore(tmp_path, "rel", "--model", "models:/cunet/2")
    np.testing.assert_array_equal(got, _restore(tmp_path, "p", "--model", str(store["ckpt"][2])))


def test_studio_with_registry_models_and_its_command(store, tmp_path) -> None:
    uri = store["uri"]
    spec = ModelSpec(mse_model="models:/cunet@champion", gan_model="models:/cugan@champion")
    session = ModelSession(spec, tracking_uri=uri)
    assert session.has_alpha and "models:/cunet/1, models:/cugan/1" in session.describe()
    studio = Studio(session)
    try:
        photo = kit.photo(tmp_path / "p.png", 48, 64)
        image = studio.load(str(photo))[0]
        _, result, _, command, _ = studio.full(
            image, 1.0, 10.0, 0.7, None, None, 64, False, None, 0, 0, progress=lambda *a, **k: 0
        )
        # The command names the versions the aliases pointed at, and the store.
        assert "--mse-model models:/cunet/1 --gan-model models:/cugan/1" in command
        assert f"--tracking-uri {uri}" in command
        store["client"].set_registered_model_alias("cunet", "champion", "2")  # moves later
        written = read_rgb8(result).array
        np.testing.assert_array_equal(kit.cli_restore(command, photo, tmp_path / "c.png"), written)
    finally:
        studio.close()
    single = ModelSession(ModelSpec(model="models:/cugan/1"), tracking_uri=uri)
    assert not single.has_alpha and _same(single.generator(None), _weights(store["ckpt"][7]))
    swapped = single.with_spec(ModelSpec(model="models:/cunet/2"))
    assert swapped.tracking_uri == uri and _same(
        swapped.generator(None), _weights(store["ckpt"][2])
    )


def test_restore_by_version_and_by_alias_equals_the_checkpoint_dir(store, tmp_path) -> None:
    uri, ck = store["uri"], store["ckpt"]
    direct = _restore(tmp_path, "dir", "--model", str(ck[1]))
    for name, model in (("v1", "models:/cunet/1"), ("alias", "models:/cunet@champion")):
        got = _restore(tmp_path, name, "--model", model, "--tracking-uri", uri)
        np.testing.assert_array_equal(got, direct, err_msg=model)


def test_download_into_a_relative_dst(store, tmp_path, monkeypatch) -> None:
    """A relative ``dst`` is the caller's working directory's (MLflow answers with absolute
    paths: the checkpoint is found in them and returned absolute)."""
    monkeypatch.chdir(tmp_path)
    registry = ModelRegistry(store["uri"])
    got = registry.download("cugan", "1", "downloads/cugan", prefer="gan")
    assert got.is_absolute() and got.is_relative_to(tmp_path / "downloads" / "cugan")
    assert got.name == "gan" and _same(load_checkpoint(got).model, _weights(store["ckpt"][7]))
    again = resolve_model_uri("models:/cunet@champion", store["uri"], "downloads/cunet")
    assert again.is_relative_to(tmp_path / "downloads" / "cunet")
    assert _same(load_checkpoint(again).model, _weights(store["ckpt"][1]))


def test_registry_uris_through_a_real_mlflow_server(tmp_path, monkeypatch, capsys) -> None:
    """``mlflow server`` with proxied artifacts (mlflow-artifacts:/ over HTTP), as a team's
    shared store is: restore by version and by alias equals the checkpoint directory, the
    studio loads the alias, a missing alias is one line."""
    from tests.mlflow_server import mlflow_server

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("CUGAN_CACHE_DIR", str(tmp_path / "cache"))
    with mlflow_server(tmp_path / "server") as server:
        ck = _register_all(MlflowClient(server.uri), tmp_path, None)
        direct = _restore(tmp_path, "dir", "--model", str(ck[1]))
        by_version = _restore(
            tmp_path, "v", "--model", "models:/cunet/1", "--tracking-uri", server.uri
        )
        np.testing.assert_array_equal(by_version, direct)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", server.uri)
        np.testing.assert_array_equal(
            _restore(tmp_path, "a", "--model", "models:/cunet@champion"), direct
        )
        session = ModelSession(ModelSpec(model="models:/cugan@champion"))
        assert session.tracking_uri == server.uri and "models:/cugan/1" in session.describe()
        assert _same(session.generator(None), _weights(ck[7]))
        image = tmp_path / "in.png"
        argv = ["restore", str(image), str(tmp_path / "x.png"), "--model", "models:/cunet@best"]
        capsys.readouterr()
        assert cli.main([*argv, "--cond", "0,0"]) == 2
        err = capsys.readouterr().err.strip()
        assert err == "cugan: error: models:/cunet@best: model 'cunet' has no alias 'best'", err
    assert not (tmp_path / "x.png").exists()
