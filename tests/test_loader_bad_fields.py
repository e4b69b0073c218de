"""Record fields that must be numbers (issue 12 item 7): a wrong value is a StageError naming the file,
the record and the key, never a bare ValueError/TypeError from int()/float()."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from stages.contract import StageError
from stages.data.visual_genome import load_vg


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
