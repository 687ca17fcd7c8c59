"""LID's full 50-step large-image run, reproduced from its checkpoint (~17,000 UNet evaluations).

Run with `pytest -m slow tests/test_large_image_slow.py`; see tests/test_large_image.py for the
fast checks and the fixture's README for how golden.npz was made.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest

from pipeline.models import load_lid_release
from pipeline.sampling import LID_MODE, LargeImageSampler, decode_canvas

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "seed_ldm_tiny"


@pytest.mark.slow
def test_lid_mode_trajectory_and_decode_match_lid():
    if not (FIXTURE / "golden.npz").is_file():
        pytest.fail(f"LID fixture missing: expected {FIXTURE}")
    with np.load(FIXTURE / "golden.npz") as data:
        golden = {name: data[name] for name in ("pano_grid", "pano_latent", "pano_image")}
    model = load_lid_release(FIXTURE)
    config = LID_MODE.with_(window_batch=64)
    sampler = LargeImageSampler(model, golden["pano_grid"].reshape(4, 4, -1), config)

    started = time.perf_counter()
    latent, stats = sampler.sample()
    print(f"\nlid mode, k=4: {stats.unet_evaluations} UNet evaluations in {stats.seconds:.0f} s")
    assert stats.unet_evaluations == 169 * 2 * 50
    latent_error = float(np.abs(latent.numpy().astype(np.float64) - golden["pano_latent"]).max())
    print(f"pano_latent max abs diff {latent_error:.3g}")
    assert latent_error <= 1e-4

    image = decode_canvas(model, latent, config)
    differences = np.abs(image.astype(np.int16) - golden["pano_image"][0].astype(np.int16))
    print(
        f"pano_image mean abs diff {differences.mean():.4f} grey levels (max {differences.max()}); "
        f"total {time.perf_counter() - started:.0f} s"
    )
    assert differences.mean() <= 0.01
    assert image.shape == (1024, 1024, 3)
