"""How close the grid prior's samples are to real embedding grids (docs/data_contract.md, "Stage 7").

All in the space the LDM's condition stage sees: unit-norm embeddings. Real crops are the k x k
crops (with at least the prior's ``min_tissue``) of the held-out inputs' grids, or of the trained-on
inputs' when no input was held out (then the figures say how well the prior fits what it saw).
Three sets of k x k grids:

- generated: ``count`` grids sampled from the prior (its dataset label);
- real: the real crops;
- shuffled: the real crops' masks, with every tissue position given an embedding drawn at random
  from all real tissue positions: the right marginals, no spatial structure.

The distances pool tissue positions: the generated grids' against one half of the real inputs'
tissue positions (each position once, though crops overlap), the floor is the other half, and
every set is cut to the same size n (the Fréchet distance grows as n shrinks).

Figures (each a metric record): ``prior_fd`` (Fréchet distance of the pooled tissue positions,
generated vs real), ``prior_fd_real_floor`` (real vs a disjoint real half, same sample size),
``prior_fd_shuffled``; ``prior_neighbour_cosine_{generated,real,shuffled}`` (mean cosine of
horizontally and vertically adjacent tissue positions: spatial coherence; for the shuffled control
its exact expectation, with one draw's value beside it); and
``prior_tissue_fraction_{generated,real}`` (mean share of tissue positions per grid, with spread).
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pipeline.embedding.grids import crop_origins, grid_from_embeddings
from pipeline.embedding.outputs import read_embedding_index
from pipeline.evaluation.distances import degenerate_covariance_warning, features_frechet_distance
from pipeline.evaluation.settings import EvaluationError
from pipeline.models.prior import EmbeddingGridPrior, unit_rows
from pipeline.sampling.prior_grid import sample_grids

SCOPE = "prior_grids"
SHUFFLE_SEED = 20240607


@dataclass(frozen=True, eq=False)
class Grids:
    embeddings: np.ndarray  # (n, k, k, D) unit rows, zeros at background
    tissue: np.ndarray  # (n, k, k) bool

    def positions(self) -> np.ndarray:
        return self.embeddings[self.tissue]


@dataclass(frozen=True, eq=False)
class RealGrids:
    crops: Grids  # every usable k x k crop (they overlap)
    positions: np.ndarray  # (m, D) each tissue position of the inputs once


def real_crops(embeddings_dir: str | Path, inputs: Sequence[str], embedding_key: str, crop: int,
               min_tissue: float) -> RealGrids:
    """Every usable k x k crop of the inputs' grids, and their tissue positions (each once)."""
    embeddings, tissue, positions = [], [], []
    with tempfile.TemporaryDirectory(prefix=".prior-grids-") as work:
        for input_id in inputs:
            grid = grid_from_embeddings(embeddings_dir, input_id, embedding_key, Path(work) / input_id)
            positions.append(unit_rows(np.asarray(grid.embeddings)[grid.tissue]))
            for row, col in crop_origins(grid.tissue, crop, min_tissue):
                embeddings.append(unit_rows(np.asarray(grid.embeddings[row : row + crop, col : col + crop])))
                tissue.append(grid.tissue[row : row + crop, col : col + crop].copy())
            del grid
    if not embeddings:
        raise EvaluationError(f"{embeddings_dir}: no {crop}x{crop} crop with {min_tissue:.0%} tissue in {list(inputs)}")
    return RealGrids(Grids(np.stack(embeddings).astype(np.float32), np.stack(tissue)),
                     np.concatenate(positions).astype(np.float32))


def shuffled_crops(real: RealGrids, rng: np.random.Generator) -> Grids:
    """The real crops' masks, every tissue position filled with a random real position's embedding."""
    crops = real.crops
    embeddings = np.zeros_like(crops.embeddings)
    embeddings[crops.tissue] = real.positions[rng.integers(0, len(real.positions), int(crops.tissue.sum()))]
    return Grids(embeddings, crops.tissue)


def neighbour_cosine(grids: Grids) -> float:
    """Mean cosine of horizontally and vertically adjacent tissue positions (NaN: no such pair)."""
    cosines = []
    for axis in (1, 2):
        first = [slice(None)] * 3
        second = [slice(None)] * 3
        first[axis], second[axis] = slice(None, -1), slice(1, None)
        both = grids.tissue[tuple(first)] & grids.tissue[tuple(second)]
        products = (grids.embeddings[tuple(first)] * grids.embeddings[tuple(second)]).sum(-1)
        cosines.append(products[both])
    values = np.concatenate(cosines)
    return float(values.mean()) if len(values) else float("nan")


def shuffled_neighbour_cosine(real: RealGrids) -> float:
    """The expected cosine of adjacent tissue positions of shuffled grids: E[u_i . u_j] over
    independent uniform draws i, j of the real positions, |mean of the positions|^2."""
    mean = real.positions.astype(np.float64).mean(0)
    return float(mean @ mean)


def tissue_fractions(grids: Grids) -> np.ndarray:
    return grids.tissue.reshape(len(grids.tissue), -1).mean(1)


def prior_figures(prior: EmbeddingGridPrior, dataset: str, real: RealGrids, count: int, steps: int,
                  seed: int) -> list[dict[str, Any]]:
    """The figures of the module docstring, as (name, value, counts, extra) records."""
    crop = prior.crop
    sampled = sample_grids(prior, crop, crop, count, dataset, steps=steps, seed=seed)
    generated = Grids(sampled.embeddings, sampled.tissue)
    rng = np.random.default_rng(SHUFFLE_SEED)
    shuffled = shuffled_crops(real, rng)
    # Pooled positions, all sets cut to one size n so that the distances compare (FD grows as n shrinks);
    # the real ones split into two disjoint halves: the reference and the floor's other set.
    pool = real.positions[rng.permutation(len(real.positions))]
    half = len(pool) // 2
    reference, other = pool[:half], pool[half : 2 * half]
    gen_positions, shuffled_positions = generated.positions(), shuffled.positions()
    n = min(len(gen_positions), half, len(shuffled_positions))
    figures: list[dict[str, Any]] = []
    if n >= 2:
        def pick(values: np.ndarray) -> np.ndarray:
            return values[rng.permutation(len(values))[:n]]

        counts = {"generated": n, "real": n}
        warning = degenerate_covariance_warning(counts, prior.embedding_dim)
        for name, values in (("prior_fd", pick(gen_positions)), ("prior_fd_real_floor", pick(other)),
                             ("prior_fd_shuffled", pick(shuffled_positions))):
            figures.append({"name": name, "value": features_frechet_distance(values, pick(reference)),
                            "counts": counts, "warnings": [warning] if warning else []})
    for side, grids in (("generated", generated), ("real", real.crops)):
        figures.append({"name": f"prior_neighbour_cosine_{side}", "value": neighbour_cosine(grids),
                        "counts": {"generated": len(grids.tissue) if side == "generated" else 0,
                                   "real": 0 if side == "generated" else len(grids.tissue)}, "warnings": []})
    # Shuffled neighbours are two independent draws from the real positions: their expected cosine
    # is exactly |mean position|^2. One draw of the shuffled grids scatters about it (std 0.024 on
    # the demo slide's 27 crops), as much as the layout effect it is there to reveal.
    figures.append({"name": "prior_neighbour_cosine_shuffled", "value": shuffled_neighbour_cosine(real),
                    "counts": {"generated": 0, "real": len(real.positions)}, "warnings": [],
                    "extra": {"one_draw": neighbour_cosine(shuffled)}})
    for side, grids in (("generated", generated), ("real", real.crops)):
        fractions = tissue_fractions(grids)
        figures.append({"name": f"prior_tissue_fraction_{side}", "value": float(fractions.mean()),
                        "counts": {"generated": len(fractions) if side == "generated" else 0,
                                   "real": 0 if side == "generated" else len(fractions)}, "warnings": [],
                        "extra": {"std": float(fractions.std()), "min": float(fractions.min()),
                                  "median": float(np.median(fractions)), "max": float(fractions.max())}})
    if n < 2:
        figures.append({"skipped": "prior_fd", "reason": f"{len(gen_positions)} generated and {len(pool)} real "
                                                        "tissue positions: too few for a distance"})
    return figures


def real_inputs(embeddings_dir: str | Path, heldout: Mapping[str, Sequence[str]], trained: Mapping[str, Sequence[str]],
                dataset: str) -> tuple[list[str], str]:
    """The inputs whose crops are the real set, and which they are."""
    held = list(heldout.get(dataset) or [])
    if held:
        return held, "held-out inputs"
    present = set(read_embedding_index(embeddings_dir).rows.input_id.astype(str))
    return sorted(set(trained.get(dataset) or []) & present), "trained-on inputs (no input held out)"
