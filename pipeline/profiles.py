"""Parameter profiles: a partial params file merged over ``params.yaml``.

The default ``params.yaml`` is a small CPU demo; ``profiles/paper.yaml`` holds only the keys
that differ for the paper's setup (DIV2K, full model sizes, batch 16, the paper's iterations,
real ImageNet backbones). Select it with one command, then run the pipeline::

    python -m pipeline.profiles profiles/paper.yaml     # rewrites params.yaml in place
    dvc repro

``git checkout params.yaml`` goes back to the default. Mappings merge key by key; any other
value (numbers, strings, lists) replaces the one in params.yaml. The merged result is
validated before anything is written, and written atomically with its comments kept
(ruamel.yaml round-trip, the YAML library DVC itself uses).
"""

from __future__ import annotations

import argparse
import io
import os
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML
from ruamel.yaml.error import YAMLError

from pipeline.atomic import atomic_write_text
from pipeline.config import ConfigError, Params, parse_params

__all__ = ["apply_profile", "merge"]


def merge(base: Any, overlay: Any, path: str = "") -> Any:
    """``overlay`` deep-merged into ``base`` (in place for mappings); returns the result."""
    if isinstance(base, dict) and isinstance(overlay, dict):
        for key, value in overlay.items():
            base[key] = merge(base[key], value, f"{path}{key}.") if key in base else value
        return base
    return overlay


def _load(yaml: YAML, path: Path) -> Any:
    try:
        return yaml.load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path}: file not found") from None
    except YAMLError as err:
        raise ConfigError(f"{path}: not valid YAML: {str(err).splitlines()[0]}") from None


def apply_profile(
    profile: str | os.PathLike[str],
    params_path: str | os.PathLike[str] = "params.yaml",
    *,
    write: bool = True,
) -> Params:
    """Merge ``profile`` into ``params_path``; validate; write (unless ``write=False``)."""
    yaml = YAML()  # round-trip: keeps comments and key order
    yaml.width = 100
    params_path, profile = Path(params_path), Path(profile)
    base = _load(yaml, params_path) or {}
    overlay = _load(yaml, profile) or {}
    if not isinstance(overlay, dict):
        raise ConfigError(f"{profile}: top level must be a mapping of sections")
    merged = merge(base, overlay)
    plain = YAML(typ="safe").load(_dump(yaml, merged))
    validated = parse_params(plain, source=f"{params_path} + {profile}")
    if write:
        atomic_write_text(params_path, _dump(yaml, merged))
    return validated


def _dump(yaml: YAML, data: Any) -> str:
    buf = io.StringIO()
    yaml.dump(data, buf)
    return buf.getvalue()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="merge a params profile into params.yaml")
    ap.add_argument("profile", help="e.g. profiles/paper.yaml")
    ap.add_argument("--params", default="params.yaml")
    ap.add_argument("--check", action="store_true", help="validate the merge, write nothing")
    args = ap.parse_args(argv)
    try:
        apply_profile(args.profile, args.params, write=not args.check)
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"{args.params}: {'would apply' if args.check else 'applied'} {args.profile}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
