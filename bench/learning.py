"""Does the pipeline's first stage learn? Held-out reconstruction of a trained autoencoder against
the same model untrained and against a bicubic down-up at the same latent size (part 1 of issue
15's learning benchmark; parts 2-4, diffusion FD, condition retrieval and 4-band NAIP, are not
measured yet).

Data: real H&E at 0.5 um/px. The demo slide (``demo_data/cmu_small_region.svs``) tiled as the
pipeline tiles it, plus the 22 crops of ``../shared/data/he_patches_256`` (cut from five sources).
Held out **by whole source image**: every crop of ``--heldout-sources`` (default: the TCGA region
and the TIA target) is never trained on; the others and the slide's patches are. The autoencoder
is the demo's (``workflow_config.yaml``'s ``autoencoder:`` table) unless ``--steps`` changes the
step count.

    OMP_NUM_THREADS=2 .venv/bin/python bench/learning.py                  # about 3-5 minutes on 2 cores
    .venv/bin/python bench/learning.py --steps 200 --out /tmp/learning.json

Writes JSON: ``psnr_ae``, ``ssim_ae``, ``psnr_untrained``, ``ssim_untrained``, ``psnr_bicubic``,
``ssim_bicubic`` (dB / SSIM on held-out patches), the sample counts, settings, machine, seconds,
and a contact sheet (real | reconstructed | bicubic, one row per held-out patch) beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import yaml
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pipeline.autoencoder.data import PatchSplit, read_patches  # noqa: E402
from pipeline.autoencoder.metrics import (baseline_side, bicubic, bicubic_metrics, reconstruct,  # noqa: E402
                                          reconstruction_metrics)
from pipeline.autoencoder.run import fit, with_unit_latents  # noqa: E402
from pipeline.autoencoder.settings import AutoencoderTrainSettings  # noqa: E402
from pipeline.config import load_config, settings_from_table  # noqa: E402
from pipeline.tiling.run import tile_dataset  # noqa: E402

PATCHES = REPO.parent / "shared" / "data" / "he_patches_256"


def crops(heldout_sources: list[str]) -> tuple[list[np.ndarray], list[np.ndarray], list[str]]:
    train, held, held_names = [], [], []
    files = sorted(PATCHES.glob("*.png"))
    if not files:
        sys.exit(f"no real patches in {PATCHES}")
    for path in files:
        rgb = np.array(Image.open(path).convert("RGB"))
        if any(path.name.startswith(source) for source in heldout_sources):
            held.append(rgb), held_names.append(path.stem)
        else:
            train.append(rgb)
    return train, held, held_names


def as_tensor(images: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2).contiguous()


def contact_sheet(real: torch.Tensor, recon: torch.Tensor, base: torch.Tensor, out: Path) -> None:
    rows = [torch.cat([real[i].float() / 255, recon[i], base[i]], dim=-1) for i in range(len(real))]
    sheet = (torch.cat(rows, dim=-2).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    Image.fromarray(sheet).save(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, help="training steps (default: the demo's)")
    parser.add_argument("--heldout-sources", nargs="+", default=["tcga_he_7130", "tia_target"])
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "learning.json")
    args = parser.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))
    config, specs = load_config(REPO / "workflow_config.yaml")
    spec = specs["demo_he_20x"]
    table = dict(config["autoencoder"], **({"max_steps": args.steps} if args.steps else {}))
    settings = settings_from_table(AutoencoderTrainSettings, {**table, "accelerator": "cpu"}, "autoencoder",
                                   in_channels=3, seed=config["seed"])
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        tiles = Path(tmp) / "tiles"
        tile_dataset(spec, tiles)
        slide_split = read_patches(tiles, (), spec.holdout_fraction)  # here all of the slide trains
        slide_all = torch.cat([slide_split.train, slide_split.heldout])
        train_crops, held_crops, held_names = crops(args.heldout_sources)
        split = PatchSplit(train=torch.cat([slide_all, as_tensor(train_crops)]),
                           train_keys=tuple(str(i) for i in range(len(slide_all) + len(train_crops))),
                           heldout=as_tensor(held_crops), heldout_keys=tuple(held_names))
        module = fit(settings, split, Path(tmp) / "run")
    trained_s = time.perf_counter() - started
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(settings.seed)
        untrained = settings.build_model(int(split.train.shape[-1])).eval()
    model = with_unit_latents(module.export_model().eval(), split.train, settings.batch_size)
    with_unit_latents(untrained, split.train, settings.batch_size)
    size = int(split.heldout.shape[-1])
    side = baseline_side(size, settings.downsampling, settings.latent_channels, 3)
    result = {
        "what": "held-out reconstruction of the pipeline's trained first stage vs untrained and bicubic",
        "heldout_by": "whole source image", "heldout_sources": args.heldout_sources,
        "train_patches": len(split.train), "heldout_patches": len(split.heldout),
        "train_sources": {"demo_slide_patches": len(slide_all), "he_patches_256_crops": len(train_crops)},
        **reconstruction_metrics(model, split.heldout, settings.batch_size, "ae"),
        **reconstruction_metrics(untrained, split.heldout, settings.batch_size, "untrained"),
        **bicubic_metrics(split.heldout, side),
        "bicubic_side": side,
        "latent_shape": [settings.latent_channels, size // settings.downsampling, size // settings.downsampling],
        "settings": settings.to_dict(), "train_seconds": round(trained_s, 1),
        "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                    "threads": torch.get_num_threads(), "cuda": torch.cuda.is_available()},
        "not_measured": ["fd_trained/fd_untrained/fd_real_floor/fd_curve", "retrieval_top1/top5", "4-band NAIP"],
    }
    result["beats_bicubic"] = result["psnr_ae"] > result["psnr_bicubic"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    contact_sheet(split.heldout, reconstruct(model, split.heldout, settings.batch_size),
                  bicubic(split.heldout, side), args.out.with_suffix(".contact.png"))
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("psnr", "ssim", "beats", "train_s"))}))


if __name__ == "__main__":
    main()
