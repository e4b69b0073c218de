"""Record fields that must be numbers (issue 12 item 7): a wrong value is a StageError naming the file,
the record and the key, never a bare ValueError/TypeError from int()/float()."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

from stages.contract import StageError
from stages.data.regions import import_bua_tsv
from stages.data.visual_genome import load_vg

FIXTURES = Path(__file__).resolve().parents[2] / "fixtures"


def vg(tmp_path: Path, merged) -> Path:
    d = tmp_path / "vg"
    d.mkdir()
    (d / "image_data.json").write_text(json.dumps([{"image_id": 1, "width": 10, "height": 10}]))
    objs = [{"object_id": 7, "x": 0, "y": 0, "w": 5, "h": 5, "names": ["cat"], "merged_object_ids": merged},
            {"object_id": 8, "x": 1, "y": 1, "w": 5, "h": 5, "names": ["dog"]}]
    (d / "objects.json").write_text(json.dumps([{"image_id": 1, "objects": objs}]))
    return d


@pytest.mark.parametrize("merged", [["x"], [8, None], [1.5], 8])
def test_vg_merged_object_ids_not_integers(tmp_path, merged):
    d = vg(tmp_path, merged)
    with pytest.raises(StageError) as e:
        load_vg(d)
    msg = str(e.value)
    assert msg.startswith(f"{d / 'objects.json'}: record 0 (image_id 1) object 0") and "'merged_object_ids'" in msg


def test_vg_merged_object_ids_still_merge(tmp_path):
    images, stats = load_vg(vg(tmp_path, [8]))
    assert stats["merged"] == 1 and len(images[0].boxes) == 1


def test_bua_tsv_nan_image_size_is_refused(tmp_path):
    spec = importlib.util.spec_from_file_location("make_fixtures", FIXTURES / "make_fixtures.py")
    mf = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mf)
    rows = mf.bua_rows(0)
    tsv = tmp_path / "nan.tsv"
    mf.write_bua_tsv(tsv, [rows[0], dict(rows[1], image_w=float("nan"))], mf.BUA_FIELDS)
    with pytest.raises(StageError, match=r"nan\.tsv: line 2 \(image_id 25\): image size nanx\d+(\.\d+)? is not a positive"):
        import_bua_tsv(tsv, tmp_path / "out")
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
