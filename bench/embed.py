"""Embedding throughput: the real stage end to end against the bare encoder forward.

End to end = ``pipeline.embedding.extract.embed_input`` on real demo-slide tiles (read shards,
decode JPEG, batch, preprocess, forward, write shards + manifest), once per decode mode given:
``workers`` (PIL in DataLoader workers) and ``device`` (TorchCodec in batches on the device:
nvJPEG on CUDA).
Pure forward = the same encoder, batch size, device and precision on tensors decoded beforehand
and already on the device. Both run in this process, one after the other. The issue's goal:
end to end >= 90 % of pure forward.

    .venv/bin/python bench/embed.py --encoder hipt_vit_s16 --copies 8 --decode workers device
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
import warnings
from dataclasses import replace
from pathlib import Path

import pandas as pd
import torch

from pipeline.config import DatasetSpec
from pipeline.embedding.encoders import build_encoder
from pipeline.embedding.extract import EmbeddingSettings, embed_input
from pipeline.io.shard_stage import PatchImages
from pipeline.io.shards import read_shard
from pipeline.tiling.outputs import tile_input
from pipeline.tiling.slide import open_slide_source

REPO = Path(__file__).resolve().parents[1]
DEMO_SLIDE = REPO / "demo_data" / "cmu_small_region.svs"


def demo_tiles(root: Path, copies: int) -> Path:
    """The demo slide's real tiles, its shard repeated ``copies`` times for a longer run."""
    spec = DatasetSpec(name="bench", kind="wsi", inputs={"demo": str(DEMO_SLIDE)}, target_mpp=0.5,
                       patch_size=256, tissue_threshold=0.5, mpp_overrides=None, mpp_from_objective=False,
                       bands=(1, 2, 3), max_nodata_fraction=0.05, max_upsample=1.5, image_format="jpg", jpeg_quality=95,
                       patches_per_shard=10_000)
    single = root / "single"
    tile_input(spec, "demo", DEMO_SLIDE, single, open_slide_source)
    tiles = root / "tiles"
    tiles.mkdir()
    manifest = pd.read_parquet(single / "manifest.parquet")
    frames = []
    for copy in range(copies):
        name = f"patches-{copy:06d}.tar"
        shutil.copyfile(single / "patches-000000.tar", tiles / name)
        frames.append(manifest.assign(shard=name))
    pd.concat(frames, ignore_index=True).to_parquet(tiles / "manifest.parquet")
    return tiles


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads, {platform.processor() or platform.machine()})"


@torch.inference_mode()
def pure_forward(encoder, tiles: Path, settings: EmbeddingSettings, repeats: int) -> tuple[float, int]:
    """Seconds for ``repeats`` passes of forward-only over pre-decoded, on-device batches."""
    device = settings.torch_device()
    images = PatchImages(read_shard(next(tiles.glob("*.tar"))))
    stacked = torch.stack([images[i] for i in range(len(images))]).to(device)
    batches = list(stacked.split(settings.batch_size))
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    with autocast:  # warm-up
        encoder(encoder.preprocess(batches[0]))
    if device.type == "cuda":
        torch.cuda.synchronize()
    started = time.perf_counter()
    for _ in range(repeats):
        for batch in batches:
            with autocast:
                encoder(encoder.preprocess(batch)).float().cpu()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started, repeats * len(stacked)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--encoder", default="hipt_vit_s16")
    parser.add_argument("--copies", type=int, default=8, help="times the demo slide's shard is repeated")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--decode", nargs="+", choices=["workers", "device"], default=["workers"],
                        help="decode modes timed end to end, each in its own run")
    parser.add_argument("--out", default=str(REPO / "bench" / "results" / "embed.json"))
    args = parser.parse_args()

    settings = EmbeddingSettings(batch_size=args.batch_size, num_workers=args.num_workers, device=args.device,
                                 decode=args.decode[0])
    device = settings.torch_device()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # random weights are fine for timing
        encoder = build_encoder(args.encoder, allow_random_weights=True).to(device)
    with tempfile.TemporaryDirectory() as tmp:
        tiles = demo_tiles(Path(tmp), args.copies)
        patches = len(pd.read_parquet(tiles / "manifest.parquet"))
        end_to_end_s = {}
        for mode in args.decode:
            run = replace(settings, decode=mode)
            embed_input(tiles, Path(tmp) / f"warmup-{mode}", [encoder], run)  # warm-up: workers, kernels
            started = time.perf_counter()
            embed_input(tiles, Path(tmp) / f"emb-{mode}", [encoder], run)
            end_to_end_s[mode] = time.perf_counter() - started
        forward_s, forward_patches = pure_forward(encoder, tiles, settings, args.copies)
    forward_rate = forward_patches / forward_s
    end_to_end = {mode: {"seconds": round(seconds, 3), "patches_per_s": round(patches / seconds, 2),
                         "share_of_forward": round(patches / seconds / forward_rate, 3)}
                  for mode, seconds in end_to_end_s.items()}
    result = {
        "encoder": args.encoder, "device": device_name(device), "torch": torch.__version__,
        "batch_size": args.batch_size, "num_workers": args.num_workers,
        "precision": "bf16 autocast" if device.type == "cuda" else "fp32",
        "patches": patches,
        "end_to_end": end_to_end,  # per decode mode
        "pure_forward": {"seconds": round(forward_s, 3), "patches_per_s": round(forward_rate, 2)},
        "goal_share": 0.9,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
