"""synthesize-slide on a side x side grid with a disc of tissue (random 384-d features in a
TRIDENT-layout .h5; the four corner cells are tissue too, so the slide is the whole
side x side grid), the demo's `small` UNet with random tiny VQ-f16 weights, fast mode, CPU):
seconds, UNet evaluations, peak resident set. Writes bench/results/slide_<side>.json.

    python bench/slide.py SIDE WORK_DIR [STEPS]      # e.g. 8 /tmp/slide 20
"""
import json, resource, sys, time
from pathlib import Path
import h5py, numpy as np, torch
torch.set_num_threads(1)
from pipeline.models.autoencoder import random_vq
from pipeline.training import TrainConfig
from pipeline.training.export import export_module
from pipeline.training.module import LatentDiffusion
from pipeline.sampling.slide import SlideSettings, synthesize_slide
side = int(sys.argv[1]); root = Path(sys.argv[2]); root.mkdir(parents=True, exist_ok=True)
model = root / "model"
if not model.exists():
    torch.manual_seed(0)
    config = TrainConfig(preset="small", latent_size=16, embedding_key="hipt_vit_s16", patch_embed_dim=384)
    export_module(LatentDiffusion(config), model, random_vq("tiny-vq-f16", seed=0, allow_random_weights=True))
rng = np.random.default_rng(0)
yy, xx = np.mgrid[:side, :side]
tissue = (yy - side / 2) ** 2 + (xx - side / 2) ** 2 < (side / 2.2) ** 2  # a disc of tissue
tissue[[0, 0, -1, -1], [0, -1, 0, -1]] = True  # and the four corners, so the grid spans side x side
cells = np.argwhere(tissue)
h5 = root / f"grid{side}.h5"
with h5py.File(h5, "w") as f:
    f["coords"] = cells[:, ::-1] * 512
    f["features"] = rng.standard_normal((len(cells), 384)).astype(np.float32)
    f["coords"].attrs["patch_size_level0"] = 512
settings = SlideSettings(steps=int(sys.argv[3]) if len(sys.argv) > 3 else 20, band_rows=2, device="cpu")
t = time.perf_counter()
record = synthesize_slide(model, root / f"out{side}", mpp=0.5, settings=settings, seed=0, h5=h5, progress_every=30)
seconds = time.perf_counter() - t
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
tissue_mpx = record["tissue_cells"] * 256 * 256 / 1e6
result = {"grid": side, "px": record["width"], "tissue_cells": record["tissue_cells"], "steps": settings.steps,
                  "unet_evaluations": record["unet_evaluations"], "seconds": round(seconds, 1),
                  "seconds_per_tissue_mpx": round(seconds / tissue_mpx, 2),
                  "evaluations_per_tissue_mpx": round(record["unet_evaluations"] / tissue_mpx),
                  "peak_rss_mib": round(peak), "levels": record["levels"][:2]}
print(json.dumps(result))
out = Path(__file__).resolve().parent / "results" / f"slide_{side}.json"
out.parent.mkdir(exist_ok=True)
out.write_text(json.dumps(result, indent=2) + "\n")
