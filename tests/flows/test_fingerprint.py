"""Fingerprint rules (DESIGN.md): what changes a stage's identity and what does not."""
from pathlib import Path

from flows.fingerprint import code_digest, data_digest, plan_fingerprints, source_digest
from flows.store import StageDir
from stages.recipe import load_recipe

RECIPE = """
recipe: t
stages:
  world: {kind: world}
  cnn: {kind: cnn, needs: [world]}
  bert: {kind: bert, needs: [world]}
"""


def fps(tmp_path: Path, *overrides: str) -> dict[str, str]:
    p = tmp_path / "r.yaml"
    p.write_text(RECIPE)
    return {n: sp.fingerprint for n, sp in plan_fingerprints(load_recipe(p, list(overrides)).stages).items()}


def test_runtime_is_not_part_of_the_fingerprint(tmp_path):
    assert fps(tmp_path) == fps(tmp_path, "stages.cnn.runtime.log_every=3", "stages.cnn.runtime.device=cpu",
                                "stages.cnn.runtime.num_workers=2", "runtime.checkpoint_every=7")


def test_config_change_changes_only_that_stage_and_downstream(tmp_path):
    base = fps(tmp_path)
    changed = fps(tmp_path, "stages.cnn.train.lr=0.5")
    assert changed["cnn"] != base["cnn"]
    assert changed["world"] == base["world"] and changed["bert"] == base["bert"]
    up = fps(tmp_path, "stages.world.scenes.train=10")
    assert all(up[n] != base[n] for n in base), "a changed upstream changes every downstream fingerprint"


def test_seed_is_part_of_the_fingerprint(tmp_path):
    assert fps(tmp_path, "stages.cnn.seed=1")["cnn"] != fps(tmp_path)["cnn"]


def test_code_digest_ignores_comments_docstrings_formatting():
    a = 'def f(x):\n    """doc"""\n    return x + 1  # comment\n'
    b = "def f( x ):\n\n    # other comment\n    return (x+1)\n"
    c = "def f(x):\n    return x + 2\n"
    assert source_digest(a) == source_digest(b) != source_digest(c)


def test_code_digest_follows_project_imports():
    mods = code_digest("cnn")
    assert {"stages.cnn", "stages.train.loop", "stages.contract", "stages.data.imagenet", "stages.train.checkpoint"} <= set(mods)
    assert "stages.bert" not in mods


def test_data_digest_sees_changes(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    (d / "a.txt").write_text("x")
    first = data_digest(d)
    assert data_digest(d) == first
    (d / "b.txt").write_text("y")
    assert data_digest(d) != first
    assert data_digest(tmp_path / "nope") == "missing"


def test_store_dir_is_fingerprint_addressed(tmp_path):
    f = fps(tmp_path)
    sd = StageDir(tmp_path / "artifacts", "cnn", f["cnn"])
    assert sd.path == tmp_path / "artifacts" / "stages" / "cnn" / f["cnn"][:16]
    assert sd.status() == "not started" and sd.result() is None


def test_a_changed_real_dataset_reruns_the_world_and_its_readers(tmp_path):
    """Real dataset paths are external inputs: re-importing a region store (or editing a corpus) changes
    the world's fingerprint and so every stage downstream of it."""
    import os

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "train.txt").write_text("a b c\n")
    p = tmp_path / "real.yaml"
    p.write_text(f"""
recipe: t
stages:
  world: {{kind: world, source: real, paths: {{corpus: {corpus}}}}}
  bert: {{kind: bert, needs: [world]}}
""")
    plan = lambda: {n: sp.fingerprint for n, sp in plan_fingerprints(load_recipe(p).stages).items()}  # noqa: E731
    first = plan()
    assert plan() == first
    (corpus / "train.txt").write_text("a b c d\n")
    os.utime(corpus / "train.txt", ns=(1, 1))
    second = plan()
    assert second["world"] != first["world"] and second["bert"] != first["bert"]
