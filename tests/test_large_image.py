"""The large-image sampler against LID's own large-image outputs (golden.npz), plus fast mode.

The fixture's README says how LID computed every pano_* array. The full 50-step trajectory
is in test_large_image_slow.py (marked slow).
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.models import load_lid_release
from pipeline.sampling import (
    FAST_MODE,
    LID_MODE,
    LargeImageConfig,
    LargeImageSampler,
    decoded_bands,
    generate_large_image,
    large_image_seam_score,
    seam_score,
    window_boundaries,
)
from pipeline.sampling.conditions import slerp, window_embeddings
from pipeline.sampling.decode import blended_bands
from pipeline.models.guidance import guided_epsilon
from pipeline.sampling.fusion import WindowFusion
from pipeline.sampling.weights import gaussian_window_weights, hann_window_weights, window_weights
from pipeline.sampling.seams import boundary_gradient_ratio
from pipeline.sampling.steppers import DiffusersStepper, LidDDIMStepper
from pipeline.sampling.windows import WindowLayout, window_offsets

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "seed_ldm_tiny"


@pytest.fixture(scope="module")
def lid():
    if not (FIXTURE / "golden.npz").is_file():
        pytest.fail(f"LID fixture missing: expected {FIXTURE} (../shared next to the repo)")
    return load_lid_release(FIXTURE)


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURE / "golden.npz") as data:
        return {name: data[name] for name in data.files if name.startswith("pano_") or name == "betas"}


@pytest.fixture(scope="module")
def lid_sampler(lid, golden) -> LargeImageSampler:
    return LargeImageSampler(lid, golden["pano_grid"].reshape(4, 4, -1), LID_MODE.with_(window_batch=64))


def max_abs(ours: torch.Tensor, expected: np.ndarray) -> float:
    assert tuple(ours.shape) == expected.shape
    return float(np.max(np.abs(ours.numpy().astype(np.float64) - expected)))


# --- windows, conditions, guidance: no UNet -------------------------------------------------------


def test_window_offsets_cover_the_canvas():
    assert window_offsets(256, 64, 16) == list(range(0, 193, 16))  # LID's 13 per axis
    assert window_offsets(256, 64, 40) == [0, 40, 80, 120, 160, 192]  # last one flush with the edge
    layout = WindowLayout(128, 256, 64, 32)
    assert len(layout) == 3 * 7 and layout.origins[:2] == [(0, 0), (0, 32)]  # row-major
    coverage = layout.coverage()
    assert coverage.min() >= 1 and coverage[0, 0] == 1 and coverage[64, 64] == 4


def test_slerp_endpoints_norm_and_parallel_fallback():
    generator = torch.Generator().manual_seed(0)
    start, end = torch.nn.functional.normalize(torch.randn(2, 5, 16, generator=generator), dim=-1)
    for t in (0.0, 1.0):
        torch.testing.assert_close(slerp(torch.full((5,), t), start, end), end if t else start)
    middle = slerp(torch.full((5,), 0.3), start, end)
    torch.testing.assert_close(middle.norm(dim=1), torch.ones(5))  # stays on the sphere
    same = slerp(torch.full((5,), 0.5), start, start)  # parallel: linear branch, no division by 0
    torch.testing.assert_close(same, start)


def test_window_embeddings_hit_grid_cells_and_padding():
    grid = torch.randn(2, 3, 8, generator=torch.Generator().manual_seed(1))
    embeddings = window_embeddings(grid, [(0, 0), (0, 64), (64, 128), (64, 160)], cell=64)
    torch.testing.assert_close(embeddings[:3], torch.stack([grid[0, 0], grid[0, 1], grid[1, 2]]))
    # Half a cell right of the last column: its right neighbour is itself (replicated padding).
    torch.testing.assert_close(embeddings[3], grid[1, 2])


def test_window_conditions_match_lid(lid_sampler, golden):
    assert len(lid_sampler.layout) == 169
    contexts = lid_sampler.fusion.contexts
    assert contexts.shape == (169, 1, 64)
    assert max_abs(contexts[:, 0], golden["pano_window_context"]) <= 1e-5


def test_guidance_is_standard_and_bit_identical_to_lids_form():
    conditional, unconditional = torch.randn(2, 4, 3, generator=torch.Generator().manual_seed(2))
    # LID's large-image code: (1 + g) c - g u with g = 3, which is s = 4 of u + s (c - u).
    assert torch.equal(guided_epsilon(conditional, unconditional, 4.0), (1 + 3.0) * conditional - 3.0 * unconditional)
    torch.testing.assert_close(guided_epsilon(conditional, unconditional, 4.0),
                               unconditional + 4.0 * (conditional - unconditional))


def test_config_rejects_nonsense():
    with pytest.raises(ValueError, match="sampler"):
        LargeImageConfig(sampler="euler_a")
    with pytest.raises(ValueError, match="exceeds the window"):
        LargeImageConfig(stride=80)
    with pytest.raises(ValueError, match="dividing"):
        LidDDIMStepper(np.linspace(1e-3, 2e-2, 1000), steps=30, eta=1.0)


# --- steps ------------------------------------------------------------------------------------------


def test_lid_stepper_draw_order_and_final_x0(golden):
    """Draws: L, eps0, then one per step but the last; the last step returns x0."""
    stepper = LidDDIMStepper(golden["betas"], steps=50, eta=1.0)
    assert stepper.timesteps[:2] == [1000, 980] and stepper.timesteps[-1] == 20
    shape = (1, 3, 8, 8)
    generator = torch.Generator().manual_seed(5)
    canvas = stepper.initial_canvas(shape, generator)
    x0 = torch.zeros(shape)
    for t in stepper.timesteps:
        canvas = stepper.step(t, canvas, x0, generator)
    assert torch.equal(canvas, x0)
    reference = torch.Generator().manual_seed(5)
    draws = [torch.randn(shape, generator=reference) for _ in range(len(golden["pano_noise_shapes"]) + 1)]
    assert torch.equal(torch.randn(shape, generator=generator), draws[-1])
    assert [tuple(s) for s in golden["pano_noise_shapes"]] == [(1, 3, 256, 256)] * 51


def test_ddim_stepper_takes_x0_as_its_prediction(lid):
    stepper = DiffusersStepper("ddim", lid.scheduler_config, steps=10, eta=0.0, spacing="trailing")
    assert stepper.timesteps[0] == 999
    t, t_prev = stepper.timesteps[:2]
    canvas, x0 = torch.randn(2, 1, 3, 8, 8, generator=torch.Generator().manual_seed(3))
    alpha_bar, alpha_bar_prev = stepper.alpha_bar(t), stepper.alpha_bar(t_prev)
    epsilon = (canvas - math.sqrt(alpha_bar) * x0) / math.sqrt(1 - alpha_bar)
    expected = math.sqrt(alpha_bar_prev) * x0 + math.sqrt(1 - alpha_bar_prev) * epsilon
    torch.testing.assert_close(stepper.step(t, canvas, x0, torch.Generator()), expected)


def test_start_and_first_step_match_lid(lid_sampler, golden):
    """One step of all 169 windows, conditional and unconditional: 338 UNet evaluations."""
    trajectory = lid_sampler.trajectory()
    assert max_abs(next(trajectory), golden["pano_x_start"]) <= 1e-5
    evaluations = lid_sampler.fusion.evaluations
    assert max_abs(next(trajectory), golden["pano_x_after_step1"]) <= 1e-4
    assert lid_sampler.fusion.evaluations - evaluations == 169 * 2


# --- decoding ---------------------------------------------------------------------------------------


def test_gaussian_weights_are_lids_kernel():
    weights = gaussian_window_weights(256, 0.8)
    axis = torch.linspace(-1, 1, 256)
    corner = math.exp(-2 / 0.64) / math.exp(-2 * float(axis[128]) ** 2 / 0.64)
    assert weights.max() == 1 and weights[0, 0] == pytest.approx(corner, rel=1e-5)


@pytest.mark.parametrize("kind", ["gaussian", "hann"])
def test_streamed_bands_equal_a_whole_canvas_blend(kind):
    """With a stand-in decoder (nearest upsampling), the bands equal a direct weighted average."""
    latent = torch.rand(1, 3, 96, 128, generator=torch.Generator().manual_seed(4)) * 2 - 1

    def upsample(z: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.interpolate(z, scale_factor=2, mode="nearest") * 0.9

    weights = window_weights(kind, 64, 0.8)
    bands = list(blended_bands(upsample, latent, factor=2, window=32, stride=16, batch=3, weights=weights))
    tops = [top for top, _ in bands]
    assert tops == [0, 32, 64, 96, 128] and sum(len(rows) for _, rows in bands) == 192
    image = np.concatenate([rows for _, rows in bands])

    total, weight_sum = torch.zeros(3, 192, 256), torch.zeros(1, 192, 256)
    for row, column in WindowLayout(96, 128, 32, 16).origins:
        tile = upsample(latent[:, :, row : row + 32, column : column + 32])[0]
        total[:, 2 * row : 2 * row + 64, 2 * column : 2 * column + 64] += tile * weights
        weight_sum[:, 2 * row : 2 * row + 64, 2 * column : 2 * column + 64] += weights
    expected = (((total / weight_sum + 1) / 2).clamp(0, 1) * 255).to(torch.uint8).permute(1, 2, 0).numpy()
    assert np.abs(image.astype(int) - expected.astype(int)).max() <= 1  # summation order only


def test_blended_decode_matches_lid(lid, golden):
    """Output rows 0-127 of LID's pano_image, from the 26 window decodes that cover them
    (the stream stops there; rows 64-127 blend two window rows, every column blends up to four)."""
    latent = torch.from_numpy(golden["pano_latent"])
    rows = []
    for top, band in decoded_bands(lid, latent, LID_MODE.with_(decode_batch=13)):
        rows.append(band)
        if top + len(band) >= 128:
            break
    ours = np.concatenate(rows)[:128].astype(np.int16)
    expected = golden["pano_image"][0, :128].astype(np.int16)
    assert ours.shape == expected.shape == (128, 1024, 3)
    assert np.abs(ours - expected).mean() <= 0.01


# --- fast mode and seams ----------------------------------------------------------------------------


def test_fast_mode_is_deterministic_and_counts_evaluations(lid):
    grid = torch.randn(2, 2, 384, generator=torch.Generator().manual_seed(7))
    config = FAST_MODE.with_(steps=2, window_batch=16, decode_stride=64, seed=11)
    first = generate_large_image(lid, grid, config)
    second = generate_large_image(lid, grid, config, decode=False)
    assert torch.equal(first.latent, second.latent)
    windows = 3 * 3  # 128-latent canvas, stride 32
    assert first.stats.windows == windows and first.stats.steps == 2
    assert first.stats.unet_evaluations == windows * 2 * 2  # conditional + unconditional, 2 steps
    assert first.stats.unet_calls == 2  # one batch per step
    assert first.latent.shape == (1, 3, 128, 128) and torch.isfinite(first.latent).all()
    assert first.image.shape == (512, 512, 3) and first.image.dtype == np.uint8
    score = large_image_seam_score(first.image, first.latent.shape, config, factor=4)
    assert math.isfinite(score) and score > 0


def test_seam_score_sees_jumps_and_flat_lines_at_boundaries():
    noise = np.random.default_rng(0).normal(size=(256, 256))
    boundaries = window_boundaries(64, window=16, stride=8, factor=4)
    assert boundaries == list(range(32, 256, 32))
    assert seam_score(noise, boundaries, boundaries) == pytest.approx(1.0, abs=0.05)
    jumps = noise + 20 * (np.arange(256)[None, :] // 32 % 2)  # steps exactly at the column boundaries
    assert boundary_gradient_ratio(jumps, boundaries, boundaries, band=1) > 3
    distance = np.minimum(np.arange(256) % 32, 32 - np.arange(256) % 32)
    fade = np.minimum(1.0, 0.2 + distance / 4)
    flat = noise * np.minimum(fade[:, None], fade[None, :])  # texture fades near every boundary
    assert boundary_gradient_ratio(flat, boundaries, boundaries) < 0.8
    assert seam_score(flat, boundaries, boundaries) > 1.25


class ZeroNoiseUNet(torch.nn.Module):
    """Predicts zero noise, so every window's x0 is its own crop / sqrt(alpha_bar)."""

    def forward(self, sample, timestep, encoder_hidden_states):
        return type("Output", (), {"sample": torch.zeros_like(sample)})()


@pytest.mark.parametrize("weights", [None, gaussian_window_weights(16, 0.8), hann_window_weights(16)])
@pytest.mark.parametrize("shift", [(0, 0), (3, 7)])
def test_fusion_is_a_weighted_mean_that_keeps_agreeing_windows(weights, shift):
    """Where all windows agree, any positive weighting and any shift returns their common x0."""
    layout = WindowLayout(48, 64, 16, 8, row_shift=shift[0], column_shift=shift[1])
    fusion = WindowFusion(ZeroNoiseUNet(), layout, torch.zeros(len(layout), 1, 4), torch.zeros(1, 1, 4),
                          guidance_scale=1.0, window_batch=5, window_weights=weights)
    canvas = torch.randn(1, 3, 48, 64, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(fusion.predict_x0(canvas, 500.0, 0.25), canvas / 0.5)


def test_hann_weights_cross_fade_to_one_at_half_window_stride():
    """sin^2 tapers: ~0 at a window's edges, and at stride = window / 2 the interior sums to 1."""
    weights = hann_window_weights(64)
    assert weights[0, 0] < 1e-6 and weights[31:33, 31:33].min() > 0.99
    layout = WindowLayout(256, 256, 64, 32)
    total = torch.zeros(256, 256)
    for r, c in layout.origins:
        total[r:r + 64, c:c + 64] += weights
    torch.testing.assert_close(total[32:-32, 32:-32], torch.ones(192, 192))


def test_shifted_windows_cover_the_canvas_and_move_every_step(lid):
    from pipeline.sampling.windows import max_shift

    for size, window, stride in ((256, 64, 32), (64, 16, 8), (100, 16, 12)):
        for shift in range(max_shift(window, stride) + 1):
            offsets = window_offsets(size, window, stride, shift)
            gaps = np.diff([0, *[o + window for o in offsets]])
            assert offsets[0] == 0 and offsets[-1] == size - window and all(
                b - a <= window for a, b in zip(offsets, offsets[1:]))
            assert (gaps >= 0).all()
    with pytest.raises(ValueError, match="shift 40"):
        window_offsets(256, 64, 32, 40)
    grid = torch.randn(2, 2, 384, generator=torch.Generator().manual_seed(7))
    sampler = LargeImageSampler(lid, grid, FAST_MODE.with_(shift_windows=True, seed=3))
    layouts = sampler.shifted_layouts()
    shifts = [(layout.row_shift, layout.column_shift) for layout in (next(layouts) for _ in range(6))]
    again = LargeImageSampler(lid, grid, FAST_MODE.with_(shift_windows=True, seed=3)).shifted_layouts()
    assert shifts == [(layout.row_shift, layout.column_shift) for layout in (next(again) for _ in range(6))]
    assert len(set(shifts)) > 1 and all(0 <= s <= 31 for pair in shifts for s in pair)


def test_seam_score_of_one_window_is_one():
    image = np.random.default_rng(0).integers(0, 255, (256, 256, 3), dtype=np.uint8)
    assert large_image_seam_score(image, (1, 3, 64, 64), LID_MODE, factor=4) == 1.0


# --- tissue mask: glass costs nothing and is white --------------------------------------------------


def test_background_windows_cost_no_unet_call_and_are_white(lid):
    tissue = np.array([[1, 0], [0, 0]], dtype=bool)
    grid = torch.randn(2, 2, 384, generator=torch.Generator().manual_seed(5))
    config = FAST_MODE.with_(steps=1, guidance_scale=1.0, window_batch=64, decode_stride=64, seed=2)
    window = config.window
    full = generate_large_image(lid, grid, config, decode=False)
    masked = generate_large_image(lid, grid, config, tissue=tissue)
    # Independently: a window is evaluated when its latent square holds any tissue-cell latent.
    tissue_latent = np.kron(tissue, np.ones((window, window), dtype=bool))
    layout = WindowLayout(2 * window, 2 * window, window, config.stride)
    background = sum(not tissue_latent[r : r + window, c : c + window].any() for r, c in layout.origins)
    assert full.stats.windows == len(layout) == 9 and background == 5
    assert masked.stats.windows == len(layout) - background
    assert full.stats.unet_evaluations == 9  # one step, no unconditional pass
    assert full.stats.unet_evaluations - masked.stats.unet_evaluations == background
    cell = window * lid.downsampling_factor
    image = masked.image
    assert image.shape == (2 * cell, 2 * cell, 3)
    white = np.kron(~tissue, np.ones((cell, cell), dtype=bool))
    assert (image[white] == 255).all()
    assert (image[:cell, :cell] == 255).all(axis=-1).mean() < 0.5  # the tissue cell is rendered, not glass
    # A mask of tissue everywhere changes nothing.
    same = generate_large_image(lid, grid, config, decode=False, tissue=np.ones((2, 2), dtype=bool))
    assert torch.equal(same.latent, full.latent)


def test_background_cells_take_the_nearest_tissue_embedding():
    from pipeline.sampling.conditions import fill_background

    grid = torch.arange(9.0).reshape(3, 3, 1)
    tissue = np.array([[1, 0, 0], [0, 0, 0], [0, 0, 1]], dtype=bool)
    filled = fill_background(grid, tissue)
    assert filled[0, 0, 0] == 0 and filled[2, 2, 0] == 8 and filled[0, 1, 0] == 0 and filled[2, 1, 0] == 8
    assert torch.equal(fill_background(grid, np.ones((3, 3), dtype=bool)), grid)
