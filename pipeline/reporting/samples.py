"""The patch samples in the report: real held-out patches next to the patches generated from
their embeddings (sample_pairs.jpg), from `pipeline.sampling.outputs.read_samples`."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from pipeline.io.images import read_image
from pipeline.reporting.notices import model_parts
from pipeline.io.sheets import pair_sheet, write_jpeg
from pipeline.reporting.sheets import GREY, Caption, random_lines, stack, title_bar
from pipeline.sampling.outputs import read_samples


def sample_pairs(samples_dir: str | Path, out: str | Path, dataset: str, max_pairs: int = 16,
                 per_row: int = 4, side: int = 256) -> int:
    """JPEG sheet of real held-out patches, each next to the patch generated from its embedding,
    spread evenly over the samples; returns the number of pairs shown."""
    samples = read_samples(samples_dir)
    count = len(samples.sample_ids)
    chosen = np.unique(np.linspace(0, count - 1, min(max_pairs, count)).round().astype(int))
    pairs = [(read_image(samples.real[i], side), read_image(samples.generated[i], side), samples.sample_ids[i])
             for i in chosen]
    grid = pair_sheet(pairs, per_row, side)
    sampler = samples.sampler
    mpp = "?" if samples.mpp is None else samples.mpp
    lines = [Caption(f"{dataset}: {len(pairs)} of {count} held-out patches (left) and the patch generated from "
                     f"each one's {samples.embedding_key or 'SSL'} embedding (right)"),
             Caption(f"sampler {sampler.get('sampler', '?')}, {sampler.get('steps', '?')} steps, guidance "
                     f"{sampler.get('guidance_scale', '?')}; pixel size {mpp}", GREY)]
    lines += random_lines(model_parts(samples.random_parts))
    write_jpeg(stack([title_bar(grid.width, lines), grid]), out)
    return len(pairs)
