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
