"""Config of stage kind `targets` (:mod:`stages.targets`): the four target sets of the 2x2 advisor."""
from __future__ import annotations

from typing import Literal

from pydantic import Field

from stages.contract import StageConfig


class Config(StageConfig):
    kind: Literal["targets"] = "targets"
    image_size: int = Field(32, ge=16, le=1024, description="side of every image (the world's classification size)")
    small_per_class: int = Field(10, ge=1, le=100_000, description="train images per class of the *_small sets")
    large_per_class: int = Field(300, ge=1, le=100_000, description="train images per class of the *_large sets")
    val_per_class: int = Field(50, ge=1, le=100_000, description="val images per class (same val for small and large)")
    texture_contrast: float = Field(0.7, gt=0.0, le=1.0, description="different domain: amplitude of the texture "
                                                                     "pattern as a fraction of the colour gap")
    noise: float = Field(6.0, ge=0.0, le=64.0, description="Gaussian pixel noise (std, 0-255 scale), as the world's")

    def declared_outputs(self) -> set[str]:
        return set(OUTPUTS)


OUTPUTS = {f"{d}_{s}": f"outputs/{d}_{s}" for d in ("similar", "different") for s in ("small", "large")}
