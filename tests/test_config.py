"""params.yaml validation: unknown keys and bad values fail with one line naming the key."""

from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline.config import ConfigError, Params, load_params, parse_params

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_yaml_is_valid():
    params = load_params(REPO / "params.yaml")
    assert isinstance(params, Params)


def test_defaults_match_method_doc():
    p = parse_params({})
    assert p.degradation.kernel_size == 21
    assert (p.degradation.blur_max, p.degradation.noise_max) == (4.0, 50.0)
    assert (p.degradation.blur_step, p.degradation.noise_step) == (0.1, 1.0)


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"base": {"sed": 1}}, "params.yaml: base.sed: unknown key"),
        ({"nonsense": {}}, "params.yaml: nonsense: unknown key"),
        ({"base": {"seed": -1}}, "params.yaml: base.seed: "),
        ({"base": {"pretrained": "maybe"}}, "params.yaml: base.pretrained: "),
        ({"degradation": {"kernel_size": 20}}, "params.yaml: degradation: "),
    ],
)
def test_bad_values_give_one_line_naming_the_key(raw, expected):
    with pytest.raises(ConfigError) as info:
        parse_params(raw)
    message = str(info.value)
    assert message.startswith(expected)
    assert "\n" not in message


def test_load_params_reports_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(ConfigError, match="file not found"):
        load_params(tmp_path / "absent.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("base: [unclosed\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_params(bad)
    scalar = tmp_path / "scalar.yaml"
    scalar.write_text("42\n")
    with pytest.raises(ConfigError, match="mapping of sections"):
        load_params(scalar)


def test_params_are_frozen():
    p = parse_params({})
    with pytest.raises(ValidationError, match="frozen"):
        p.base.seed = 3  # type: ignore[misc]
