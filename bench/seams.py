"""Seam quality of lid mode against fast mode on the LID fixture, over several noise seeds.

Model: LID's own fixture release (``../shared/fixtures/seed_ldm_tiny``) and its 4x4
embedding grid (``golden.npz: pano_grid``), 1024 px. Lid mode's canvas is LID's own
``pano_latent`` (our lid mode reproduces it to 4e-5: ``tests/test_large_image_slow.py``;
sampling it again costs 16,900 evaluations, about 40 min on one CPU core), decoded by our code
with the mode's own decode settings. Fast mode is sampled here once per ``--seeds`` value.

For every image: the seam score (docs/data_contract.md: the worst of three edge classes) and the
ratio of each class, and a control: the same statistic on the lines halfway between the
64-px decode edges, which are no window edge in either mode. How far the control strays from
1.0 is the measure's own noise on that image (the fixture's texture varies from place to
place), so a seam score within the control's range is a seam nobody can see.

    .venv/bin/python bench/seams.py                      # fast mode, seeds 1234 1 2; ~15 min
    .venv/bin/python bench/seams.py --set decode_weights=gaussian --seeds 1234
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

from pipeline.models import load_lid_release  # noqa: E402
from pipeline.sampling import FAST_MODE, LID_MODE, LargeImageSampler, decode_canvas  # noqa: E402
from pipeline.sampling.large_image import large_image_seam_score, window_edge_classes  # noqa: E402
from pipeline.sampling.seams import boundary_gradient_ratio, seam_score  # noqa: E402

FIXTURE = Path(__file__).resolve().parents[2] / "shared" / "fixtures" / "seed_ldm_tiny"


def parse_value(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def score_image(image: np.ndarray, config, size: int, factor: int) -> dict:
    classes = window_edge_classes(size, config, factor)
    ratios = {name: round(boundary_gradient_ratio(image, lines, lines), 4) for name, lines in classes.items() if lines}
    # Halfway between the finest edges of both modes (every 16 latent px = 64 output px).
    control = [x for x in range(32, size * factor, 64)]
    return {
        "seam_score": round(large_image_seam_score(image, (size, size), config, factor), 4),
        "class_ratios": ratios,
        "control_score": round(seam_score(image, control, control), 4),
        "control_ratio": round(boundary_gradient_ratio(image, control, control), 4),
    }


def load_fixture(path: Path):
    """The LID fixture's model, its 4x4 panorama embedding grid and LID's own sample of it (golden)."""
    model = load_lid_release(path)
    golden = np.load(path / "golden.npz")
    return model, golden["pano_grid"].reshape(4, 4, -1), torch.from_numpy(golden["pano_latent"]).float()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fixture", type=Path, default=FIXTURE)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1234, 1, 2])
    parser.add_argument("--set", nargs="*", default=[], help="key=value overrides of FAST_MODE")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "seams.json")
    args = parser.parse_args()
    torch.set_num_threads(1)

    model, grid, lid_latent = load_fixture(args.fixture)
    factor = model.downsampling_factor
    overrides = {key: parse_value(value) for key, value in (item.split("=", 1) for item in args.set)}
    fast = FAST_MODE.with_(**overrides)
    runs = []

    size = lid_latent.shape[-1]
    image = decode_canvas(model, lid_latent, LID_MODE)
    runs.append({"mode": "lid", "seed": "LID's own sample (golden pano_latent)", "unet_evaluations": 16900,
                 **score_image(image, LID_MODE, size, factor)})
    print(json.dumps(runs[-1]), flush=True)
    # The same canvas with fast mode's decode blend: what LID's Gaussian decode was hiding.
    hann = LID_MODE.with_(decode_weights=fast.decode_weights)
    image = decode_canvas(model, lid_latent, hann)
    runs.append({"mode": f"lid canvas, {fast.decode_weights} decode", "seed": "golden pano_latent",
                 "unet_evaluations": 16900, **score_image(image, hann, size, factor)})
    print(json.dumps(runs[-1]), flush=True)

    for seed in args.seeds:
        config = fast.with_(seed=seed)
        started = time.perf_counter()
        latent, stats = LargeImageSampler(model, grid, config).sample()
        image = decode_canvas(model, latent, config)
        runs.append({"mode": "fast", "seed": seed, "unet_evaluations": stats.unet_evaluations,
                     "seconds": round(time.perf_counter() - started, 1), **score_image(image, config, size, factor)})
        print(json.dumps(runs[-1]), flush=True)

    fast_scores = [run["seam_score"] for run in runs if run["mode"] == "fast"]
    controls = [run["control_score"] for run in runs]
    report = {
        "fixture": str(args.fixture), "size_px": size * factor, "fast_mode": {**vars(fast)}, "runs": runs,
        "fast_seam_score_mean": round(float(np.mean(fast_scores)), 4),
        "fast_seam_score_max": max(fast_scores), "lid_seam_score": runs[0]["seam_score"],
        "control_score_max": max(controls), "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps({k: report[k] for k in ("fast_seam_score_mean", "fast_seam_score_max", "lid_seam_score",
                                              "control_score_max")}))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
