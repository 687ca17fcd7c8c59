"""bench/learning.py (issue 15's learning benchmark): its held-out sets are disjoint and never
trained on, its retrieval figures are right on a case with a known answer, and ``--quick`` runs
the diffusion and condition parts end to end (about 20 s on one core)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from helpers import REPO, SHARED_DATA

sys.path.insert(0, str(REPO / "bench"))

pytestmark = [pytest.mark.usefixtures("single_thread_torch"),
              pytest.mark.skipif(not (SHARED_DATA / "he_images").is_dir(), reason="needs ../shared/data")]

HELD_OUT = ["tcga_he_7130", "tia_target"]


def test_the_two_held_out_sets_are_disjoint_equal_and_from_held_out_sources_only():
    from learning_data import crops, heldout_pair

    pair = heldout_pair(HELD_OUT, per_set=100)
    assert pair.conditions.shape == pair.reference.shape == (9, 3, 256, 256)  # 2 x 3x3 grid tiles, dealt
    assert all(name.startswith(tuple(HELD_OUT)) for name in pair.names)
    a = {bytes(t.numpy()) for t in pair.conditions}
    b = {bytes(t.numpy()) for t in pair.reference}
    trained, _, _ = crops(HELD_OUT)
    assert len(a) == len(b) == 9 and not a & b
    assert not (a | b) & {bytes(np.moveaxis(t, -1, 0).copy()) for t in trained}


class PixelEncoder(torch.nn.Module):
    """A stand-in conditioning encoder: the 4x4 average-pooled pixels."""

    spec = SimpleNamespace(name="pixels")

    def preprocess(self, images):
        return images.float() / 255

    def forward(self, x):
        return torch.nn.functional.adaptive_avg_pool2d(x, 4).flatten(1) - 0.5


def test_patches_that_are_their_conditions_retrieve_them_all():
    from learning_diffusion import condition_following, embed

    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    stage = SimpleNamespace(encoder=PixelEncoder())
    figures = condition_following(stage, images, embed(stage.encoder, images, 4), 4)
    assert figures["retrieval_top1"] == figures["retrieval_top5"] == 1.0
    assert figures["retrieval_chance"] == {"top1": 1 / 6, "top5": 5 / 6}
    assert figures["cosine_paired"] == pytest.approx(1.0) and figures["cosine_shuffled"] < 1.0
    shuffled = condition_following(stage, images.roll(1, 0), embed(stage.encoder, images, 4), 4)
    assert shuffled["retrieval_top1"] == 0.0


def test_quick_diffusion_parts_write_every_figure_and_the_contact_sheet(tmp_path):
    out = tmp_path / "learning.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    subprocess.run([sys.executable, str(REPO / "bench" / "learning.py"), "--quick", "--parts", "2", "3",
                    "--out", str(out)], check=True, env=env, capture_output=True, timeout=300)
    result = json.loads(out.read_text())
    for key in ("fd_trained", "fd_untrained", "fd_real_floor", "retrieval_top1", "retrieval_top5",
                "cosine_paired", "cosine_shuffled"):
        assert np.isfinite(result[key]), key
    assert [p["step"] for p in result["fd_curve"]] == [0, 5, 10]
    assert result["fd_extractor"]["random_weights"] is True and result["samples"]["conditions_A"] == 3
    assert "psnr_ae" not in result and "naip" not in result
    assert out.with_suffix(".generated.png").is_file()
