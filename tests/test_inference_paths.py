"""pipeline.inference paths and their chooser: exactness of every path, the rules, the cache.

Exactness is asserted on trained-like weights (random init scaled up, so that the output
depends strongly on the input and on every layer: the 0.1-scaled init is near the identity and
would hide differences). Speed is never asserted here (benchmarks/inference.py measures it);
the chooser's rules are tested with injected probe measurements.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
import torch

from models.generator import GeneratorConfig
from models.registry import build_generator
from pipeline.degradation import to_tensor, to_uint8
from pipeline.inference import (
    BF16_TOLERANCE,
    Backend,
    PathSpec,
    Precision,
    Workload,
    choose_path,
    prepare_model,
    restore,
)
from pipeline.inference import choice as choice_mod
from pipeline.inference.choice import FP32_TOLERANCE, Measurement, Tolerance, probe_image
from pipeline.inference.geometry import pad_to_multiple
from pipeline.inference.paths import ALL_PATHS, build_path
from pipeline.inference.prepared import default_prepared

CPU = torch.device("cpu")
Z = torch.tensor([[0.5, 0.6]])


@pytest.fixture(autouse=True)
def _private_cache(tmp_path, monkeypatch):
    """Every test probes into its own cache file, never the user's."""
    monkeypatch.setenv("CUGAN_CACHE_DIR", str(tmp_path / "cache"))
    choice_mod._BF16_VERDICTS.clear()


def _trained_like(cfg: str | GeneratorConfig = "tiny", seed: int = 0, scale: float = 0.3):
    model = build_generator(cfg, generator=torch.Generator().manual_seed(seed))
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return model.eval()


def _outputs(path, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return path(x, z).float()


@pytest.mark.parametrize("name", ["channels_last", "onnx"])
def test_fp32_paths_reproduce_eager_up_to_float_reassociation(name: str) -> None:
    """Same 8-bit output as eager fp32, except where float reassociation (another summation
    order) moves a value across a quantisation boundary: then by exactly 1 level, and only
    where eager's value lies within the float difference of that boundary."""
    model = _trained_like()
    image = probe_image(96)
    x = pad_to_multiple(to_tensor(image), model.size_multiple)
    eager = build_path(model, PathSpec(Backend.EAGER), CPU)
    other = build_path(model, PathSpec.from_name(name), CPU)
    for z in (Z, torch.tensor([[0.0, 1.0]]), torch.tensor([[1.0, 0.0]])):
        ref, out = _outputs(eager, x, z), _outputs(other, x, z)
        float_gap = float((ref - out).abs().max())
        assert float_gap < 1e-4, float_gap  # reassociation, not a different computation
        a, b = to_uint8(ref).astype(int), to_uint8(out).astype(int)
        diff = np.abs(a - b)
        assert diff.max() <= 1
        assert FP32_TOLERANCE.accepts(int(diff.max()), float((diff != 0).mean()))
        if diff.any():  # each flip sits at a boundary (k + 0.5) / 255 within the float gap
            v = ref.clamp(0, 1).permute(0, 2, 3, 1)[0].numpy() * 255
            frac = np.abs(v[diff != 0] - np.floor(v[diff != 0]) - 0.5)
            assert (frac <= float_gap * 255 + 1e-4).all()


@pytest.mark.slow
def test_compiled_path_reproduces_eager() -> None:
    model = _trained_like()
    x = pad_to_multiple(to_tensor(probe_image(64)), model.size_multiple)
    eager = build_path(model, PathSpec(Backend.EAGER), CPU)
    compiled = build_path(model, PathSpec(Backend.COMPILE), CPU, example=(x, Z))
    ref, out = _outputs(eager, x, Z), _outputs(compiled, x, Z)
    assert float((ref - out).abs().max()) < 1e-4
    assert np.abs(to_uint8(ref).astype(int) - to_uint8(out).astype(int)).max() <= 1


def test_bf16_paths_run_and_are_judged_by_the_tolerance() -> None:
    model = _trained_like()
    x = pad_to_multiple(to_tensor(probe_image(64)), model.size_multiple)
    ref = _outputs(build_path(model, PathSpec(Backend.EAGER), CPU), x, Z)
    for name in ("bf16", "bf16_channels_last"):
        out = _outputs(build_path(model, PathSpec.from_name(name), CPU), x, Z)
        assert out.dtype == torch.float32 and out.shape == ref.shape
        assert 0 < float((out - ref).abs().max()) < 0.5  # bf16 rounds, visibly but boundedly
        ok, text = choice_mod.bf16_verdict(model, CPU, PathSpec.from_name(name))
        assert (
            text.startswith("vs fp32 on these weights") and ("within" if ok else "outside") in text
        )


def test_tolerance_rule() -> None:
    assert BF16_TOLERANCE.accepts(1, 0.001) and BF16_TOLERANCE.accepts(0, 0.0)
    assert not BF16_TOLERANCE.accepts(2, 0.0)
    assert not BF16_TOLERANCE.accepts(1, 0.0011)
    assert "1 level" in Tolerance(1, 0.001).describe()


def test_path_names_round_trip_and_invalid_pairs_fail() -> None:
    assert {s.name for s in ALL_PATHS} == {
        "eager",
        "channels_last",
        "compile",
        "onnx",
        "bf16",
        "bf16_channels_last",
    }
    for spec in ALL_PATHS:
        assert PathSpec.from_name(spec.name) == spec
    with pytest.raises(ValueError, match="bf16 runs with the eager or channels_last"):
        PathSpec(Backend.ONNX, Precision.BF16)
    with pytest.raises(ValueError, match="unknown inference path"):
        PathSpec.from_name("tensorrt")


# ---------------------------------------------------------------------------------------------
# the chooser, with injected measurements


def _fake_probe(table: dict[str, tuple[float, float, int]], calls: list[list[str]]):
    """probe_paths stand-in: ``name -> (ms, setup_s, max 8-bit diff)``."""

    def probe(model, device, specs, rounds=3):
        names = ["eager"] + [s.name for s in specs if s.name != "eager"]
        calls.append(names)
        return {
            n: Measurement(
                n, table[n][0], table[n][1], table[n][2], 0.0 if not table[n][2] else 1e-4
            )
            for n in names
        }

    return probe


TABLE = {
    "eager": (100.0, 0.0, 0),
    "channels_last": (70.0, 0.01, 0),
    "onnx": (50.0, 2.0, 0),
    "compile": (40.0, 60.0, 0),
    "bf16": (90.0, 0.0, 1),
    "bf16_channels_last": (20.0, 0.01, 1),
}


@pytest.fixture
def demo():
    return build_generator("demo").eval()  # above MIN_PARAMETERS: the chooser measures it


@pytest.fixture
def probe_calls(monkeypatch):
    calls: list[list[str]] = []
    monkeypatch.setattr(choice_mod, "probe_paths", _fake_probe(TABLE, calls))
    return calls


def _flags(monkeypatch, flags: list[str]) -> None:
    monkeypatch.setattr(choice_mod, "cpu_features", lambda: {"model": "test cpu", "flags": flags})


def test_without_bf16_hardware_the_fastest_exact_path_wins(monkeypatch, demo, probe_calls):
    _flags(monkeypatch, ["avx512f"])
    got = choose_path(demo, CPU, workload=Workload.library(512 * 512))
    assert got.spec.name == "onnx"
    assert "no AMX-BF16/AVX512-BF16" in got.reason and "compile" in got.reason
    assert probe_calls == [["eager", "channels_last", "onnx"]]  # bf16 and compile never built


def test_one_shot_does_not_pay_a_setup_it_cannot_recover(monkeypatch, demo, probe_calls):
    _flags(monkeypatch, ["avx512f"])
    # one probe-sized image: onnx saves 50 ms but costs 2 s of export -> channels_last
    assert (
        choose_path(demo, CPU, workload=Workload.one_shot(choice_mod.PROBE_SIZE**2)).spec.name
        == "channels_last"
    )
    # a long-lived consumer with many images: compile's minute is worth it
    assert choose_path(demo, CPU, workload=Workload(100_000, 512 * 512)).spec.name == "compile"


def test_bf16_only_where_its_output_is_within_tolerance(monkeypatch, demo, probe_calls):
    _flags(monkeypatch, ["amx_bf16", "avx512_bf16"])
    verdicts: list[str] = []

    def verdict(ok):
        def judge(model, device, spec):
            verdicts.append(spec.name)
            return ok, f"{spec.name}: {'within' if ok else 'outside'}"

        return judge

    monkeypatch.setattr(choice_mod, "bf16_verdict", verdict(False))
    got = choose_path(demo, CPU)
    assert got.spec.name == "onnx" and "bf16_channels_last: outside" in got.reason
    monkeypatch.setattr(choice_mod, "bf16_verdict", verdict(True))
    assert choose_path(demo, CPU).spec.name == "bf16_channels_last"
    # an explicit precision needs no verdict; fp32 never considers bf16
    verdicts.clear()
    assert choose_path(demo, CPU, precision="bf16").spec.name == "bf16_channels_last"
    assert choose_path(demo, CPU, precision="fp32").spec.name == "onnx"
    assert verdicts == []


def test_requests_and_small_models_skip_the_probe(monkeypatch, demo, probe_calls):
    got = choose_path(demo, CPU, backend="onnx", precision="fp32")
    assert got.spec.name == "onnx" and got.reason == "requested"
    tiny = build_generator("tiny")
    assert choose_path(tiny, CPU).spec.name == "eager"
    assert choose_path(tiny, CPU, precision="bf16").spec.name == "bf16"
    assert probe_calls == []
    # an explicit backend with auto precision: that backend, fp32 unless bf16 earns its place
    _flags(monkeypatch, ["avx512f"])
    assert choose_path(demo, CPU, backend="channels_last").spec.name == "channels_last"


def test_an_inexact_fp32_path_is_dropped(monkeypatch, demo):
    _flags(monkeypatch, ["avx512f"])
    table = dict(TABLE, onnx=(10.0, 0.0, 3))
    monkeypatch.setattr(choice_mod, "probe_paths", _fake_probe(table, []))
    got = choose_path(demo, CPU)
    assert got.spec.name == "channels_last" and "onnx differs from eager by 3 levels" in got.reason


def test_measurements_are_cached_per_machine_and_config(monkeypatch, demo, probe_calls, tmp_path):
    _flags(monkeypatch, ["avx512f"])
    choose_path(demo, CPU)
    choose_path(demo, CPU)
    assert len(probe_calls) == 1  # the second choice read the cache
    data = json.loads((tmp_path / "cache" / "inference-paths.json").read_text())
    (entry,) = data["entries"].values()
    assert entry["key"]["config"] == demo.config.to_dict()
    assert entry["key"]["cpu"] == {"model": "test cpu", "flags": ["avx512f"]}
    assert set(entry["paths"]) == {"eager", "channels_last", "onnx"}
    # more candidates later (a long-lived workload): only the missing one is probed
    choose_path(demo, CPU, workload=Workload(100_000, 512 * 512))
    assert probe_calls[-1] == ["eager", "compile"]
    # another thread count is another key
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1 if threads > 1 else 2)
        choose_path(demo, CPU)
    finally:
        torch.set_num_threads(threads)
    assert len(probe_calls) == 3


def test_a_corrupt_cache_is_ignored(monkeypatch, demo, probe_calls, tmp_path):
    _flags(monkeypatch, ["avx512f"])
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "inference-paths.json").write_text("{not json")
    assert choose_path(demo, CPU).spec.name == "onnx"
    assert json.loads((tmp_path / "cache" / "inference-paths.json").read_text())["version"] == 1


def test_the_real_probe_measures_and_caches(monkeypatch, tmp_path):
    """The probe itself (no injection) on a model just above the size rule: every candidate
    measured, eager exact against itself, the choice logged with its reason."""
    _flags(monkeypatch, ["avx512f"])
    model = _trained_like(
        GeneratorConfig(blocks_per_scale=(1, 1, 1), channels_per_scale=(32, 48, 64))
    )
    assert sum(p.numel() for p in model.parameters()) >= choice_mod.MIN_PARAMETERS
    got = choose_path(model, CPU, workload=Workload.library(128 * 128))
    assert got.measurements["eager"].max_8bit_diff == 0
    for name in ("channels_last", "onnx"):
        m = got.measurements[name]
        assert m.error is None and m.ms > 0 and m.max_8bit_diff <= 1
    assert got.spec.exact and "x eager on the probe" in got.reason


# ---------------------------------------------------------------------------------------------
# prepared models


def test_default_prepared_is_kept_until_the_weights_change() -> None:
    model = _trained_like()
    first = default_prepared(model, CPU, 64 * 64)
    assert default_prepared(model, CPU, 64 * 64) is first
    with torch.no_grad():
        next(model.parameters()).add_(0.01)  # an optimiser step does this in place
    assert default_prepared(model, CPU, 64 * 64) is not first


def test_restore_with_a_prepared_model_equals_the_plain_one() -> None:
    model = _trained_like()
    image = probe_image(40)
    prepared = prepare_model(model, device="cpu", backend="eager", precision="fp32")
    assert np.array_equal(restore(prepared, image, [0.5, 0.6]), restore(model, image, [0.5, 0.6]))
    elsewhere = dataclasses.replace(prepared, device=torch.device("cuda", 0))
    with pytest.raises(ValueError, match="prepared for cuda:0, not cpu"):
        restore(elsewhere, image, [0.5, 0.6], device="cpu")


def test_vector_only_paths_send_a_z_map_through_the_eager_module() -> None:
    calls = []

    class Recorder(torch.nn.Module):
        config = build_generator("tiny").config

        def forward(self, x, z):
            calls.append(z.dim())
            return x

    from pipeline.inference.paths import _VectorOnly

    path = _VectorOnly(PathSpec(Backend.ONNX), Recorder(), CPU)
    path.forward = lambda x, z: calls.append("graph") or x
    x = torch.zeros(1, 3, 8, 8)
    path(x, torch.zeros(1, 2))
    path(x, torch.zeros(1, 2, 8, 8))
    assert calls == ["graph", 4]


def test_default_prepared_keeps_only_the_last_few_generators() -> None:
    import gc
    import weakref

    from pipeline.inference import prepared as prepared_mod

    first = build_generator("tiny")
    gone = weakref.ref(first)
    default_prepared(first, CPU, 32 * 32)
    del first
    for _ in range(prepared_mod.DEFAULTS_KEPT):
        default_prepared(build_generator("tiny"), CPU, 32 * 32)
    gc.collect()
    assert gone() is None  # evicted, and nothing else held it
    assert len(prepared_mod._DEFAULTS) == prepared_mod.DEFAULTS_KEPT


def test_a_chosen_path_that_cannot_build_falls_back_to_eager(monkeypatch, demo, caplog) -> None:
    from pipeline.inference import PathUnavailable
    from pipeline.inference import prepared as prepared_mod

    monkeypatch.setattr(
        prepared_mod,
        "choose_path",
        lambda *a, **k: choice_mod.PathChoice(PathSpec(Backend.ONNX), "test"),
    )
    real = prepared_mod.build_path

    def broken(model, spec, device, example=None):
        if spec.name == "onnx":
            raise PathUnavailable("onnx: no provider")
        return real(model, spec, device, example=example)

    monkeypatch.setattr(prepared_mod, "build_path", broken)
    assert prepare_model(demo).name == "eager"
    assert "running eager" in caplog.text
    with pytest.raises(PathUnavailable, match="no provider"):
        prepare_model(demo, backend="onnx")
