"""``python -m stages`` (stages/__main__.py), the GPU-box entry: issue 12 item 8."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from stages.__main__ import main


@pytest.fixture
def real_world(tmp_path) -> Path:
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("one document\n\nanother one\n")
    f = tmp_path / "recipe.yaml"
    f.write_text(yaml.safe_dump({"recipe": "x", "stages": {"world": {"kind": "world", "source": "real",
                                                                     "paths": {"corpus": str(corpus)}}}}))
    return f


def test_real_world_into_an_out_dir_that_does_not_exist(real_world, tmp_path):
    out = tmp_path / "new" / "world"
    assert main([str(real_world), "world", "--out", str(out)]) == 0
    assert (out / "result.json").is_file()


def test_overrides_after_upstream_as_in_the_docstring(real_world, tmp_path, capsys):
    first = tmp_path / "w1"
    assert main([str(real_world), "world", "--out", str(first)]) == 0
    out = tmp_path / "w2"
    assert main([str(real_world), "world", "--out", str(out), "--upstream", f"world={first}",
                 "stages.world.seed=3"]) == 0
    assert (out / "result.json").is_file()


@pytest.mark.parametrize("value, expect", [("some/dir", "expected NAME=DIR"), ("world=", "expected NAME=DIR"),
                                           ("world=/nonexistent/dir", "not a completed stage")])
def test_bad_upstream_is_a_usage_error(real_world, tmp_path, capsys, value, expect):
    with pytest.raises(SystemExit) as e:
        main([str(real_world), "world", "--out", str(tmp_path / "o"), "--upstream", value])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert "argument --upstream" in err and expect in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()
