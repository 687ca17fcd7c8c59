"""The paths that make sampling fast on a GPU, checked on the CPU against the float32 reference:
bfloat16 autocast, chunked windows, deep-feature reuse, several processes (gloo)."""

from __future__ import annotations

import sys

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from helpers import LID_FIXTURE
from pipeline.models import load_lid_release
from pipeline.sampling import FAST_MODE, LargeImageSampler
from pipeline.sampling.denoiser import WindowDenoiser

pytestmark = pytest.mark.usefixtures("single_thread_torch")


@pytest.fixture(scope="module")
def lid():
    return load_lid_release(LID_FIXTURE)


@pytest.fixture(scope="module")
def grid() -> torch.Tensor:
    with np.load(LID_FIXTURE / "golden.npz") as golden:
        return torch.from_numpy(golden["pano_grid"].reshape(4, 4, -1)[:2, :2].copy())


def sample(lid, grid, **changes) -> tuple[torch.Tensor, object]:
    config = FAST_MODE.with_(steps=4, seed=5, **changes)
    return LargeImageSampler(lid, grid, config).sample()


def test_the_unet_attends_through_pytorch_sdpa(lid):
    assert {type(p).__name__ for p in lid.unet.attn_processors.values()} == {"AttnProcessor2_0"}


def test_chunked_windows_equal_one_call(lid, grid):
    """The canvas does not depend on how many windows share a UNet call (3 of 9, or all 9)."""
    chunked, stats = sample(lid, grid, window_batch=3)
    whole, whole_stats = sample(lid, grid, window_batch=9)
    assert stats.unet_calls == 3 * whole_stats.unet_calls and stats.unet_evaluations == whole_stats.unet_evaluations
    torch.testing.assert_close(chunked, whole, atol=2e-4, rtol=1e-4)  # float32 kernels differ by batch size
    automatic, _ = sample(lid, grid, window_batch=None)  # on a CPU: up to 32 windows a call
    torch.testing.assert_close(automatic, whole, atol=2e-4, rtol=1e-4)


def test_bfloat16_stays_close_to_float32(lid):
    """Autocast bf16 against the float32 reference: one UNet call on LID's fixture. Measured on this
    CPU: relative L2 4.0e-3 for one call; over a whole 4-step fast-mode canvas 5.8e-2 (stochastic
    DDIM carries the differences along; 452 s, since this CPU has no bf16 units: bf16 runs 26x
    slower here than float32, so only the one call is a test)."""
    generator = torch.Generator().manual_seed(0)
    windows = torch.randn(1, 3, 64, 64, generator=generator)
    context = lid.condition(torch.randn(1, lid.embedding_dim, generator=generator))
    t = torch.full((1,), 500.0)
    reference = WindowDenoiser(lid.unet, "float32")(windows, t, context)
    bf16 = WindowDenoiser(lid.unet, "bfloat16")(windows, t, context)
    assert bf16.dtype == torch.float32
    gap = float((bf16 - reference).norm() / reference.norm())
    print(f"\nbf16 vs float32 noise prediction, relative L2: {gap:.3g}")
    assert 0 < gap < 2e-2


def test_channels_last_gives_the_same_noise_prediction_and_is_wired_from_the_settings(lid):
    """NHWC weights and windows: the same numbers in another memory layout (CPU kernels differ in
    summation order only), asked for by the `channels_last` setting of the render tables."""
    import copy

    from pipeline.sampling.config import LargeImageSettings

    generator = torch.Generator().manual_seed(0)
    windows = torch.randn(2, 3, 64, 64, generator=generator)
    context = lid.condition(torch.randn(2, lid.embedding_dim, generator=generator))
    t = torch.full((2,), 500.0)
    reference = WindowDenoiser(lid.unet, "float32")(windows, t, context)
    unet = copy.deepcopy(lid.unet)  # converted in place: keep the shared fixture's layout
    nhwc = WindowDenoiser(unet, "float32", channels_last=True)
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(nhwc(windows, t, context), reference, atol=1e-4, rtol=1e-4)
    assert LargeImageSettings(channels_last=True).sampler_config(64).channels_last
    assert not LargeImageSettings().sampler_config(64).channels_last


def test_feature_reuse_is_exact_on_full_steps_and_cheap_between(lid):
    unet = lid.unet
    generator = torch.Generator().manual_seed(0)
    windows = torch.randn(2, 3, 64, 64, generator=generator)
    context = lid.condition(torch.randn(2, lid.embedding_dim, generator=generator))
    t = torch.full((2,), 500.0)
    with torch.no_grad():
        expected = unet(windows, t, encoder_hidden_states=context).sample
    reusing = WindowDenoiser(unet, reuse_every=3, reuse_depth=1)
    reusing.begin_step(0)
    full = reusing(windows, t, context, key=0)
    assert torch.equal(full, expected)  # the full pass is the UNet's own computation
    reusing.begin_step(1)
    cached = reusing(windows, t, context, key=0)
    torch.testing.assert_close(cached, expected, atol=1e-6, rtol=1e-5)  # same inputs: same deep features
    moved = reusing(windows * 0.9, t - 50, context, key=0)  # another step: shallow blocks only
    assert not torch.allclose(moved, expected, atol=1e-3)


def test_feature_reuse_samples_with_fewer_full_passes(lid, grid):
    reference, _ = sample(lid, grid)
    reused, stats = sample(lid, grid, feature_reuse=2)
    assert stats.unet_evaluations == 4 * 9 * 2  # every window every step, half of them shallow
    gap = float((reused - reference).norm() / reference.norm())
    print(f"\nfeature_reuse=2 vs none, relative L2 of the canvas: {gap:.3g}")
    assert 0 < gap < 0.5
    with pytest.raises(ValueError, match="cannot shift"):
        FAST_MODE.with_(feature_reuse=2, shift_windows=True)


def _sample_in_group(rank: int, world: int, init_file: str, grid: np.ndarray, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        canvas, stats = LargeImageSampler(load_lid_release(LID_FIXTURE), grid, FAST_MODE.with_(
            steps=4, seed=5, window_batch=2)).sample()
        if rank == 0:
            torch.save({"canvas": canvas, "evaluations": stats.unet_evaluations}, out)
    finally:
        dist.destroy_process_group()


def test_two_gloo_processes_give_the_one_process_image(lid, grid, tmp_path):
    """Windows are dealt out to the ranks and the x0 sums all-reduced: the same canvas as one process."""
    alone, stats = sample(lid, grid, window_batch=2)
    out = tmp_path / "two.pt"
    mp.spawn(_sample_in_group, args=(2, str(tmp_path / "rendezvous"), grid.numpy(), str(out)), nprocs=2)
    together = torch.load(out)
    assert together["evaluations"] == stats.unet_evaluations
    torch.testing.assert_close(together["canvas"], alone, atol=2e-4, rtol=1e-4)


def test_the_gpu_script_runs_every_path_in_its_dry_run(tmp_path):
    """bench/gpu.sh --dry-run: the UNet, large-image and training sections and the embedding bench
    at a tiny size on the CPU (the figures come from a real card)."""
    import json
    import subprocess

    from helpers import REPO, pipeline_env

    result = subprocess.run(["bash", str(REPO / "bench" / "gpu.sh"), "--dry-run"], cwd=REPO, capture_output=True,
                            text=True, env={**pipeline_env(), "PYTHON": sys.executable}, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((REPO / "bench" / "results" / "gpu_dry_run.json").read_text())
    assert report["dry_run"] and report["unet"]["flops_per_evaluation"] > 0
    assert {(row["precision"], row["channels_last"]) for row in report["unet"]["rows"]} == {
        ("float32", False), ("bfloat16", False), ("bfloat16", True)}
    assert [(row["side_px"], row["mode"]) for row in report["large_image"]] == [(512, "lid"), (512, "fast")]
    assert report["training"]["steps_per_s"] > 0
    embed = json.loads((REPO / "bench" / "results" / "embed_dry_run.json").read_text())
    assert set(embed["end_to_end"]) == {"workers", "device"}  # both JPEG decode paths ran
    assert all(run["patches_per_s"] > 0 for run in embed["end_to_end"].values())
    assert embed["pure_forward"]["patches_per_s"] > 0
