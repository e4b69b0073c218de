"""External inputs are part of every fingerprint (issue 10, bug 1) and relative paths follow one rule
(issue 12, item 3): a path in a recipe is relative to the recipe file's folder.

Every path-valued config field of every kind is replaced in place by a same-size file whose mtime is
set back (what ``cp -p`` / ``rsync -a`` do): the stage and its downstream get new fingerprints."""
import os
from pathlib import Path

import pytest

from flows.fingerprint import data_digest, plan_fingerprints
from stages.config.world import PathsCfg
from stages.recipe import load_recipe

BASE = """
recipe: t
stages:
  world: {world}
  cnn: {{kind: cnn, needs: [world]{cnn}}}
  detector: {{kind: detector, needs: [world, cnn]{detector}}}
  bert: {{kind: bert, needs: [world]{bert}}}
  vl: {{kind: vl, needs: [world, detector, bert]}}
"""


@pytest.fixture(autouse=True)
def digest_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BATON_DIGEST_CACHE", str(tmp_path / "cache" / "sha256.json"))


def replace_same_size(f: Path) -> None:
    """Overwrite ``f`` in place with other bytes of the same size, then put its mtime back."""
    st = f.stat()
    f.write_bytes(bytes(b ^ 1 for b in f.read_bytes()))
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert f.stat().st_mtime_ns == st.st_mtime_ns and f.stat().st_size == st.st_size


def plan(recipe: Path) -> dict[str, str]:
    return {n: sp.fingerprint for n, sp in plan_fingerprints(load_recipe(recipe).stages).items()}


def weights_dir(d: Path) -> Path:
    d.mkdir()
    (d / "config.json").write_text('{"hidden_size": 64}')
    (d / "model.safetensors").write_bytes(b"A" * 64)
    return d / "model.safetensors"


def case(tmp_path: Path, field: str) -> tuple[str, Path, list[str]]:
    """(recipe text, the file to replace, stages whose fingerprint must change) for one path field."""
    parts = {"world": "{kind: world}", "cnn": "", "detector": "", "bert": ""}
    w = tmp_path / "w.pt"
    w.write_bytes(b"A" * 64)
    if field == "cnn.model.init":
        parts["cnn"] = f", model: {{init: {w}}}"
        return BASE.format(**parts), w, ["cnn", "detector", "vl"]
    if field == "detector.model.backbone.init":
        parts["detector"] = f", backbone_from: null, model: {{backbone: {{init: {w}}}}}"
        return BASE.format(**parts), w, ["detector", "vl"]
    if field == "bert.tokenizer.path":
        tok = tmp_path / "tok"
        tok.mkdir()
        (tok / "vocab.txt").write_text("[PAD]\n[UNK]\n[CLS]\n[SEP]\n[MASK]\nab\n")
        parts["bert"] = f", tokenizer: {{path: {tok}}}"
        return BASE.format(**parts), tok / "vocab.txt", ["bert", "vl"]
    if field == "bert.model.pretrained":
        f = weights_dir(tmp_path / "pretrained")
        parts["bert"] = f", model: {{pretrained: {f.parent}}}"
        return BASE.format(**parts), f, ["bert", "vl"]
    key = field.split(".")[-1]
    paths = {key: key, **({"karpathy": "karpathy"} if key == "karpathy_images" else {}),
             **({"cc_train": "cc_train", "cc_val": "cc_val"} if key.startswith("cc_") else {})}
    for k in paths:
        p = tmp_path / "data" / k
        if k in ("karpathy", "cc_train", "cc_val"):  # files
            p.parent.mkdir(exist_ok=True)
            p.write_bytes(b"A" * 64)
        else:  # folders
            p.mkdir(parents=True)
            (p / "x.txt").write_bytes(b"A" * 64)
    target = tmp_path / "data" / key
    parts["world"] = "{kind: world, source: real, paths: {" + ", ".join(f"{k}: data/{k}" for k in paths) + "}}"
    return BASE.format(**parts), target if target.is_file() else target / "x.txt", ["world", "cnn", "detector",
                                                                                     "bert", "vl"]


FIELDS = ["cnn.model.init", "detector.model.backbone.init", "bert.tokenizer.path", "bert.model.pretrained",
          *(f"world.paths.{k}" for k in PathsCfg.model_fields)]


@pytest.mark.parametrize("field", FIELDS)
def test_same_size_replacement_reruns_the_stage_and_its_downstream(tmp_path, field):
    text, target, changed = case(tmp_path, field)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(text)
    first = plan(recipe)
    assert plan(recipe) == first, "no change, same fingerprints"
    replace_same_size(target)
    second = plan(recipe)
    assert {n for n in first if first[n] != second[n]} == set(changed)


def test_every_path_field_of_every_kind_is_an_external_input():
    """The parametrisation above covers every field marked as a path (a new one is tested or fails here)."""
    from stages import KINDS, kind_config

    def marked(model, prefix):
        for name, info in model.model_fields.items():
            extra = info.json_schema_extra if isinstance(info.json_schema_extra, dict) else {}
            if "baton_external" in extra:
                yield f"{prefix}{name}"
            for sub in getattr(info.annotation, "__args__", (info.annotation,)):
                if isinstance(sub, type) and hasattr(sub, "model_fields"):
                    yield from marked(sub, f"{prefix}{name}.")

    found = {f for kind in KINDS for f in marked(kind_config(kind), f"{kind}.")}
    assert found == set(FIELDS) | {"detector.model.backbone.init"}


def test_content_digest_is_cached_and_sees_a_cp_p_copy(tmp_path, monkeypatch):
    from flows import inputs

    w = tmp_path / "w.safetensors"
    w.write_bytes(b"A" * 1000)
    calls = []
    real = inputs.sha256_file
    monkeypatch.setattr(inputs, "sha256_file", lambda p: calls.append(p) or real(p))
    first = data_digest(w, "weights")
    assert data_digest(w, "weights") == first and len(calls) == 1, "the second digest comes from the cache"
    assert inputs.cache_file().is_file()
    replace_same_size(w)
    assert data_digest(w, "weights") != first and len(calls) == 2


def test_a_weights_name_is_not_a_path(tmp_path, monkeypatch):
    """cnn model.init / bert model.pretrained may name torchvision weights or a hub model: such a value
    is not resolved against the recipe's folder, and digests as the name plus its revision."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    recipe = tmp_path / "r.yaml"
    recipe.write_text("recipe: t\nstages:\n  world: {kind: world}\n"
                      "  bert: {kind: bert, needs: [world], model: {pretrained: prajjwal1/bert-tiny}}\n")
    r = load_recipe(recipe)
    assert r.stages["bert"].model.pretrained == "prajjwal1/bert-tiny"
    payload = plan_fingerprints(r.stages)["bert"].payload
    assert payload["data"]["model.pretrained"]["name"] == "prajjwal1/bert-tiny"


def test_relative_paths_are_relative_to_the_recipe_folder(tmp_path, monkeypatch):
    """From another working directory, a relative world.paths entry names the file beside the recipe:
    the config, the fingerprint's data digest and the stage read the same absolute file."""
    folder = tmp_path / "project"
    (folder / "data" / "corpus").mkdir(parents=True)
    (folder / "data" / "corpus" / "train.txt").write_text("a b c\n")
    (folder / "w.pt").write_bytes(b"A" * 8)
    recipe = folder / "r.yaml"
    recipe.write_text("recipe: t\nstages:\n  world: {kind: world, source: real, paths: {corpus: data/corpus}}\n"
                      "  cnn: {kind: cnn, needs: [world], model: {init: ./w.pt}}\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    r = load_recipe(recipe)
    assert r.stages["world"].paths.corpus == str(folder / "data" / "corpus")
    assert r.stages["cnn"].model.init == str(folder / "w.pt")
    assert r.raw["stages"]["world"]["paths"]["corpus"] == str(folder / "data" / "corpus"), "the snapshot too"
    payload = plan_fingerprints(r.stages)["world"].payload
    assert payload["data"]["paths.corpus"] not in ("missing", data_digest(elsewhere / "data" / "corpus"))
    assert load_recipe(recipe, raw=r.raw).stages == r.stages, "resolving again changes nothing"


def _digest_many(files: list[str]) -> list[str]:
    return [data_digest(f, "weights") for f in files]


def test_the_digest_cache_survives_concurrent_processes(tmp_path):
    """Processes hashing at once never leave a torn cache file; every digest stays right."""
    import hashlib
    import json
    from concurrent.futures import ProcessPoolExecutor

    from flows.inputs import cache_file

    files = []
    for i in range(24):
        f = tmp_path / f"w{i}.bin"
        f.write_bytes(bytes([i]) * 4096)
        files.append(str(f))
    with ProcessPoolExecutor(4) as pool:
        results = list(pool.map(_digest_many, [files[i::4] for i in range(4)]))
    want = {f: hashlib.sha256(Path(f).read_bytes()).hexdigest() for f in files}
    assert sorted(d for r in results for d in r) == sorted(want.values())
    cached = json.loads(cache_file().read_text())
    assert cached and all(v[4] == want[k] for k, v in cached.items())
