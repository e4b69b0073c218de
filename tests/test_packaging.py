"""The wheel ships the product (flows/, stages/ and every subpackage) and never tools/ or tests/."""
from pathlib import Path

import pytest
from setuptools import find_packages

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parents[1]


def test_wheel_packages_are_every_product_package_and_no_tool_or_test():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    shipped = set(packages) if isinstance(packages, list) else set(
        find_packages(str(ROOT), include=packages["find"]["include"]))
    product = {str(p.parent.relative_to(ROOT)).replace("/", ".") for top in ("flows", "stages")
               for p in (ROOT / top).rglob("__init__.py") if "__pycache__" not in p.parts}
    assert shipped == product
    assert {"stages.config", "stages.models", "stages.data", "stages.train"} <= shipped
    assert not {p for p in shipped if p.split(".")[0] in ("tools", "tests")}


def test_wheel_ships_every_recipe_in_configs_as_package_data():
    """`baton ls` / `baton cp` read flows/configs/: a link to configs/ here, real files in the wheel."""
    patterns = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]["flows"]
    shipped = {str(p.relative_to(ROOT / "flows" / "configs")) for pat in patterns for p in (ROOT / "flows").glob(pat)}
    recipes = {str(p.relative_to(ROOT / "configs")) for pat in ("*.yaml", "sweeps/*.yaml")
               for p in (ROOT / "configs").glob(pat)}
    assert shipped == recipes and "vlp-tiny.yaml" in shipped and "sweeps/frozen-vs-finetuned.yaml" in shipped


@pytest.mark.slow  # ~20-60 s: builds the wheel
def test_built_wheel_contains_the_recipes_and_every_subpackage(tmp_path):
    import subprocess
    import sys
    import zipfile

    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q",
                    "-w", str(tmp_path)], check=True, cwd=tmp_path)
    names = set(zipfile.ZipFile(next(tmp_path.glob("baton-*.whl"))).namelist())
    assert {f"flows/configs/{p.name}" for p in (ROOT / "configs").glob("*.yaml")} <= names
    assert {"stages/models/__init__.py", "stages/train/__init__.py", "flows/cli.py"} <= names
    assert not any(n.startswith(("tools/", "tests/")) for n in names)
