"""Tissue detection on a low-resolution thumbnail, and background checks on patches.

H&E tissue is saturated (pink/purple) while glass is white and grey: threshold the HSV
saturation with Otsu, after a median blur that removes JPEG and dust speckle, never below a
floor so that an empty slide yields no tissue instead of thresholded noise.
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage
from skimage import filters, morphology

MIN_SATURATION = 0.07  # Otsu on blank glass splits noise; this floor keeps it empty
MIN_VALUE = 0.08  # near-black (out-of-focus edge, slide holder) is not tissue
MEDIAN_SIZE = 5
CLOSE_RADIUS = 2
MIN_OBJECT_FRACTION = 2e-4  # drop specks smaller than this fraction of the thumbnail

# Patch-level background test: near-white or near-black pixels.
WHITE_LEVEL = 220
BLACK_LEVEL = 30
MAX_BACKGROUND_FRACTION = 0.9


def tissue_mask(thumbnail_rgb: np.ndarray) -> np.ndarray:
    """Boolean tissue mask of an HxWx3 uint8 thumbnail."""
    saturation, value = saturation_and_value(thumbnail_rgb)
    saturation = ndimage.median_filter(saturation, size=MEDIAN_SIZE)
    if np.ptp(saturation) > 0:
        threshold = max(float(filters.threshold_otsu(saturation)), MIN_SATURATION)
    else:
        threshold = MIN_SATURATION
    mask = (saturation > threshold) & (value > MIN_VALUE)
    mask = ndimage.binary_closing(mask, morphology.disk(CLOSE_RADIUS), border_value=0)
    speck = max(4, int(MIN_OBJECT_FRACTION * mask.size))
    # Fill only small holes (nuclei-sized gaps); large holes are glass inside the tissue.
    mask = morphology.remove_small_objects(mask, max_size=speck)
    return morphology.remove_small_holes(mask, max_size=speck)


def saturation_and_value(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """HSV saturation and value in [0, 1] of uint8 RGB (skimage's rgb2hsv without the hue it
    would spend most of its time on)."""
    high = rgb.max(axis=2).astype(np.float64)
    low = rgb.min(axis=2).astype(np.float64)
    saturation = np.divide(high - low, high, out=np.zeros_like(high), where=high > 0)
    return saturation, high / 255.0


def box_fractions(mask: np.ndarray, x0: np.ndarray, y0: np.ndarray, size: float) -> np.ndarray:
    """Mean of ``mask`` over square boxes in mask pixels (fractional corners rounded),
    computed from one summed-area table."""
    table = np.pad(mask.astype(np.float64).cumsum(0).cumsum(1), ((1, 0), (1, 0)))
    h, w = mask.shape
    xa = np.clip(np.round(x0).astype(int), 0, w)
    ya = np.clip(np.round(y0).astype(int), 0, h)
    xb = np.clip(np.round(x0 + size).astype(int), 0, w)
    yb = np.clip(np.round(y0 + size).astype(int), 0, h)
    area = np.maximum((xb - xa) * (yb - ya), 1)
    total = table[yb, xb] - table[ya, xb] - table[yb, xa] + table[ya, xa]
    return total / area


def background_fraction(rgb: np.ndarray) -> float:
    """Fraction of a patch's pixels that are near-white glass or near-black."""
    r, g, b = rgb[..., 0], rgb[..., 1], rgb[..., 2]
    # Pairwise minimum/maximum: numpy's reductions over a length-3 axis are 20x slower.
    white = np.minimum(np.minimum(r, g), b) >= WHITE_LEVEL
    black = np.maximum(np.maximum(r, g), b) <= BLACK_LEVEL
    return np.count_nonzero(white | black) / white.size


def is_background_patch(rgb: np.ndarray) -> bool:
    return background_fraction(rgb) > MAX_BACKGROUND_FRACTION
