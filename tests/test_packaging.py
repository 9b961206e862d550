"""pyproject.toml and environment.yml declare the same dependencies."""

import re
from pathlib import Path

import tomllib
import yaml

ROOT = Path(__file__).resolve().parents[1]


def _requirements(specs):
    """{normalized name: spec} from pip requirement strings."""
    out = {}
    for spec in specs:
        name = re.split(r"[<>=!~\[ ]", spec, maxsplit=1)[0]
        out[name.lower().replace("_", "-")] = spec.replace(" ", "")
    return out


def test_environment_yml_matches_pyproject():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    declared = _requirements(project["dependencies"] + project["optional-dependencies"]["dev"])
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    pip_section = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
    conda_env = _requirements(s for s in pip_section if not s.startswith("-e"))
    assert conda_env == declared
