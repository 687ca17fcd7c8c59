"""The price of each speed-up, on LID's fixture at 1024 px: seconds, UNet evaluations, seam score
and a crop Fréchet distance against lid mode's image.

Lid mode's image is LID's own sample (``golden.npz: pano_latent``, decoded by our lid-mode
decoder; our lid mode reproduces it to 4e-5, tests/test_large_image_slow.py). Each speed-up is
sampled with ``--seeds`` on the fixture's 4x4 embedding grid:

* ``fast``: fast mode (1,960 UNet evaluations instead of 16,900);
* ``fast+reuse2``, ``fast+reuse3``: fast mode with DeepCache-style feature reuse, the whole UNet
  every 2nd / 3rd step and only its outer blocks on cached deep features in between.

Crop Fréchet distance: every image is cut into 64-px crops (256 per image); a crop's features are
its 8x8 RGB thumbnail (192 numbers, box-averaged); the distance is between a method's crops (all
seeds) and lid mode's. It measures pixel statistics at the 64-px scale, not perception, and is
not comparable with FID. Its floor is the distance between two lid-mode-like sets, estimated here
by fast mode's seeds against each other (``fast_seed_vs_seed``).

    .venv/bin/python bench/speedups.py                # ~30 min on one CPU core
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from pipeline.evaluation.distances import features_frechet_distance  # noqa: E402
from pipeline.sampling import FAST_MODE, LID_MODE, LargeImageSampler, decode_canvas  # noqa: E402
from seams import FIXTURE, load_fixture, score_image  # noqa: E402

METHODS = {"fast": {}, "fast+reuse2": {"feature_reuse": 2}, "fast+reuse3": {"feature_reuse": 3}}
CROP, THUMB = 64, 8


def crop_features(image: np.ndarray) -> np.ndarray:
    """(n, 192): each 64-px crop box-averaged to 8x8 RGB."""
    height, width = image.shape[0] // CROP * CROP, image.shape[1] // CROP * CROP
    block = CROP // THUMB
    thumbs = image[:height, :width].astype(np.float64).reshape(
        height // CROP, THUMB, block, width // CROP, THUMB, block, 3).mean(axis=(2, 5))
    return thumbs.transpose(0, 2, 1, 3, 4).reshape(-1, THUMB * THUMB * 3)


def summarise(runs: list[dict], features: dict[str, list[np.ndarray]], reference: np.ndarray) -> dict:
    summary = {}
    for method, parts in features.items():
        if not parts:
            continue
        crops = np.concatenate(parts)
        own = [r for r in runs if r["method"] == method]
        summary[method] = {
            "sampling_s_mean": round(float(np.mean([r["sampling_s"] for r in own])), 1),
            "seam_score_mean": round(float(np.mean([r["seam_score"] for r in own])), 4),
            "crop_fd_vs_lid": round(features_frechet_distance(crops, reference), 2),
            "crops": len(crops), "lid_crops": len(reference), "seeds": len(parts)}
    if len(features.get("fast", [])) >= 2:
        summary["fast_seed_vs_seed"] = round(features_frechet_distance(features["fast"][0], features["fast"][1]), 2)
    return summary


def write_report(args, size_px: int, lid_seam: float, runs: list[dict], features: dict[str, list[np.ndarray]],
                 reference: np.ndarray) -> dict:
    summary = summarise(runs, features, reference)
    report = {"fixture": str(args.fixture), "size_px": size_px, "lid_seam_score": lid_seam, "runs": runs,
              "summary": summary, "complete": len(runs) == len(args.methods) * len(args.seeds),
              "date": time.strftime("%Y-%m-%d %H:%M")}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    temp = args.out.with_name(args.out.name + ".tmp")
    temp.write_text(json.dumps(report, indent=2) + "\n")
    temp.replace(args.out)
    return summary


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", type=Path, default=FIXTURE)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "speedups.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model, grid, lid_latent = load_fixture(args.fixture)
    factor = model.downsampling_factor
    size = lid_latent.shape[-1]
    lid_image = decode_canvas(model, lid_latent, LID_MODE)
    reference = crop_features(lid_image)
    lid_seam = score_image(lid_image, LID_MODE, size, factor)["seam_score"]
    runs, features = [], {}
    for method in args.methods:
        config = FAST_MODE.with_(**METHODS[method])
        features[method] = []
        for seed in args.seeds:
            started = time.perf_counter()
            latent, stats = LargeImageSampler(model, grid, config.with_(seed=seed)).sample()
            sampled = time.perf_counter() - started
            image = decode_canvas(model, latent, config)
            features[method].append(crop_features(image))
            full_steps = -(-stats.steps // config.feature_reuse)  # the others run the outer blocks only
            runs.append({"method": method, "seed": seed, "unet_evaluations": stats.unet_evaluations,
                         "full_unet_evaluations": stats.unet_evaluations * full_steps // stats.steps,
                         "sampling_s": round(sampled, 1), **score_image(image, config, size, factor)})
            print(json.dumps(runs[-1]), flush=True)
            # after every image, so that a killed run keeps what it measured
            summary = write_report(args, size * factor, lid_seam, runs, features, reference)
    print(json.dumps(summary, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
