"""A stage's code digest covers exactly the code it runs (issue 10, bug 2): editing one module changes
the fingerprints of the kinds that import it, and no others.

An edit is simulated by changing the digest of one module's source (flows.fingerprint._module_digest),
so the test does not depend on the module's text."""
from pathlib import Path

import pytest

from flows import fingerprint
from stages.recipe import load_recipe

RECIPE = """
recipe: t
stages:
  world: {kind: world}
  cnn: {kind: cnn, needs: [world]}
  detector: {kind: detector, needs: [world], backbone_from: null}
  bert: {kind: bert, needs: [world]}
  vl: {kind: vl, needs: [world, detector, bert]}
  caption: {kind: caption, needs: [world, detector, bert], init: bert}
  vqa: {kind: vqa, needs: [world, detector, vl]}
"""


def fingerprints(tmp_path: Path) -> dict[str, str]:
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE)
    return {n: sp.fingerprint for n, sp in fingerprint.plan_fingerprints(load_recipe(p).stages).items()}


def edited(tmp_path: Path, monkeypatch, module: str) -> dict[str, str]:
    """Fingerprints after an edit of ``module``'s code."""
    real = fingerprint._module_digest

    def digest(name, *args):
        d, deps = real(name, *args)
        return (d + "-edited" if name == module else d), deps

    monkeypatch.setattr(fingerprint, "_module_digest", digest)
    return fingerprints(tmp_path)


def changed(before: dict[str, str], after: dict[str, str]) -> set[str]:
    return {n for n in before if before[n] != after[n]}


@pytest.mark.parametrize(("module", "expected"), [
    # caption with init: bert does not run vl's code; vqa (init: vl) is downstream of vl anyway
    ("stages.vl", {"vl", "vqa"}),
    # detector with backbone_from: null builds its own backbone: cnn's run() is not its code
    ("stages.cnn", {"cnn"}),
    # a shared model module: the kinds importing it (vl, caption, vqa), and what is downstream of them
    ("stages.models.vlp", {"vl", "caption", "vqa"}),
    ("stages.models.resnet", {"cnn", "detector", "vl", "caption", "vqa"}),
])
def test_an_edit_changes_exactly_the_kinds_that_run_it(tmp_path, monkeypatch, module, expected):
    before = fingerprints(tmp_path)
    assert changed(before, edited(tmp_path, monkeypatch, module)) == expected


def test_a_kind_digest_holds_only_what_it_imports():
    assert "stages.vl" not in fingerprint.code_digest("caption")
    assert "stages.cnn" not in fingerprint.code_digest("detector")
    assert "stages.models.vlp" in fingerprint.code_digest("caption")
    assert not any(m.startswith("stages.models.vlp") for m in fingerprint.code_digest("bert"))
