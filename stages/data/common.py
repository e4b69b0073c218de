"""Helpers every reader uses: JSON, typed record fields whose errors name file, record and key, images."""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from PIL import Image, UnidentifiedImageError

from stages.contract import StageError

IMAGE_EXTS = (".jpeg", ".jpg", ".png")


def read_json(path: Path) -> Any:
    path = Path(path)
    if not path.is_file():
        raise StageError(f"{path}: file not found")
    try:
        with open(path, "rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise StageError(f"{path}: not valid JSON ({e})") from None


def _get(rec: Any, key: str, path: Path, where: str) -> Any:
    if not isinstance(rec, dict):
        raise StageError(f"{path}: {where}: expected an object, got {type(rec).__name__}")
    if key not in rec:
        raise StageError(f"{path}: {where}: missing key {key!r}")
    return rec[key]


def _get_any(rec: Any, keys: tuple[str, ...], path: Path, where: str) -> Any:
    if not isinstance(rec, dict):
        raise StageError(f"{path}: {where}: expected an object, got {type(rec).__name__}")
    for k in keys:
        if k in rec:
            return rec[k]
    alt = " or ".join(repr(k) for k in keys[1:])
    raise StageError(f"{path}: {where}: missing key {keys[0]!r}" + (f" (or {alt})" if alt else ""))


def _int(v: Any, key: str, path: Path, where: str) -> int:
    try:
        if isinstance(v, bool) or v is None:
            raise TypeError
        f = float(v)
        if f != int(f):
            raise ValueError
        return int(f)
    except (TypeError, ValueError):
        raise StageError(f"{path}: {where}: key {key!r} must be an integer, got {v!r}") from None


def _num(v: Any, key: str, path: Path, where: str) -> float:
    try:
        if isinstance(v, bool) or v is None:
            raise TypeError
        return float(v)
    except (TypeError, ValueError):
        raise StageError(f"{path}: {where}: key {key!r} must be a number, got {v!r}") from None


def _list(v: Any, key: str, path: Path, where: str) -> list:
    if not isinstance(v, list):
        raise StageError(f"{path}: {where}: key {key!r} must be a list, got {type(v).__name__}")
    return v


_WS = re.compile(r"\s+")


def normalize_name(s: str) -> str:
    """Lowercase, strip, collapse whitespace."""
    return _WS.sub(" ", str(s).strip().lower())


def open_rgb(path: Path) -> Image.Image:
    """Open and fully decode an image as RGB; unreadable -> StageError naming the file."""
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise StageError(f"{path}: cannot read image ({e})") from None


def image_size(path: Path) -> tuple[int, int]:
    """(width, height) from the file's header, without decoding the pixels; unreadable -> StageError naming the file."""
    try:
        with Image.open(path) as im:
            return im.size
    except (OSError, UnidentifiedImageError, ValueError, SyntaxError) as e:
        raise StageError(f"{path}: cannot read image ({e})") from None
