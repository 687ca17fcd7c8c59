"""Large images cut into the 256 px crops their embeddings describe (docs/data_contract.md,
"Stage 7"): crop (r, c) starts at pixel (r*256, c*256) and pairs with embeddings[r, c]. The
folders themselves are read with `pipeline.sampling.outputs`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.evaluation.settings import EvaluationError
from pipeline.io.images import image_size, read_image
from pipeline.io.shards import encode_image
from pipeline.sampling.outputs import GeneratedRegion, LargeImages

CROP_SIZE = 256  # large images are compared on the 256 px grid their embeddings describe


def check_grid_fits(path: Path, k: int, size: tuple[int, int]) -> None:
    """Stop (before any network is loaded) when an image of `size` (w, h) cannot hold its k x k crops."""
    side = k * CROP_SIZE
    if size[0] < side or size[1] < side:
        raise EvaluationError(f"{path}: {size[0]}x{size[1]} px is smaller than the {k}x{k} grid of "
                              f"{CROP_SIZE} px crops ({side}x{side} px)")


def check_crops_fit(large: LargeImages) -> None:
    """Every region's images hold their k x k grid of crops (read from the headers only)."""
    for region in large.regions:
        for path in (region.generated, region.reference):
            check_grid_fits(path, region.k, image_size(path))


def grid_crops(image: np.ndarray, k: int, path: Path) -> list[np.ndarray]:
    """The k x k grid of 256 px crops, row-major: crop (r, c) starts at pixel (r*256, c*256)."""
    check_grid_fits(path, k, (image.shape[1], image.shape[0]))
    return [image[r * CROP_SIZE:(r + 1) * CROP_SIZE, c * CROP_SIZE:(c + 1) * CROP_SIZE]
            for r in range(k) for c in range(k)]


def write_region_crops(region: GeneratedRegion, folder: Path) -> tuple[list[Path], list[Path]]:
    """Write the generated and reference crops of one region as lossless PNGs under ``folder``
    (clean-fid reads image files); return (generated crops, reference crops), row-major."""
    written = []
    for side, path in (("generated", region.generated), ("reference", region.reference)):
        target = folder / side
        target.mkdir(parents=True, exist_ok=True)
        paths = []
        for index, crop in enumerate(grid_crops(read_image(path), region.k, path)):
            r, c = divmod(index, region.k)
            out = target / f"{region.name}_r{r:03d}_c{c:03d}.png"
            out.write_bytes(encode_image(np.ascontiguousarray(crop), "png"))
            paths.append(out)
        written.append(paths)
    return written[0], written[1]
