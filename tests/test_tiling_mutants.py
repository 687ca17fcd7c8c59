"""Seeded mutants of the demo SVS and the shared GeoTIFFs, tiled as one dataset per source.

For every mutant (tests/tiff_mutants.py): a folder and a status row (never a lost dataset), no
traceback, no crash and no out-of-memory (every claim is bounded before it is allocated), and
either a typed failure whose message names the file, or patches equal to the clean file's at the
same grid positions. One exception, which no reader can do better on: a byte flip or zeroed run
in one tile's entropy data that the Huffman decoder resynchronises after, so that the tile
decodes, ends where it should and OpenSlide reads it without complaint too. Then only patches
overlapping that tile may differ. docs/hostile_inputs.md has the classes.
"""

from __future__ import annotations

import json
import logging

import numpy as np
import openslide
import pandas as pd
import pytest

from helpers import DEMO_SLIDE, SHARED_DATA, decode, make_spec, read_shards
from pipeline.tiling.failures import Reason
from pipeline.tiling.run import DEFAULT_MEMORY_MB, tile_dataset
from tiff_mutants import Layout, mutants

PER_KIND = 8  # per mutation kind in the default run; `pytest -m slow` runs MANY_PER_KIND
MANY_PER_KIND = 64
SOURCES = {  # name -> (file, spec changes, mutation kinds)
    "svs": (DEMO_SLIDE, {"kind": "wsi"}, ["truncate", "directory_flip", "jpeg_tables_flip", "tile_flip", "tile_zero",
                                          "absurd_dimensions", "description_edit"]),
    "cog": (SHARED_DATA / "aerial" / "aerial_rgb_0.6m_cogeo.tif", {"kind": "aerial", "target_mpp": 1.0},
            ["truncate", "directory_flip", "tile_flip", "tile_zero", "absurd_dimensions", "georeference"]),
    "naip": (SHARED_DATA / "aerial" / "m_4709963_se_14_1_20190904.tif", {"kind": "aerial", "target_mpp": 5.0},
             ["truncate", "directory_flip", "tile_flip", "tile_zero", "absurd_dimensions", "georeference"]),
}
# Outcomes that mean a bound or a check was missed, even though the input was recorded.
MISSED = {Reason.UNEXPECTED_ERROR.value, Reason.OUT_OF_MEMORY.value, Reason.READER_CRASHED.value}


def grid_patches(folder) -> dict[str, np.ndarray]:
    """{"rRRRRR_cCCCCC": rgb} of an input folder (the input id left out of the key)."""
    return {sample["__key__"].rsplit("_", 2)[-2] + "_" + sample["__key__"].rsplit("_", 1)[-1]:
            decode(sample["png"]) for sample in read_shards(folder)}


def openslide_reads_tile(path, tile_box) -> bool:
    with openslide.OpenSlide(path) as slide:
        try:
            slide.read_region(tile_box[:2], 0, tile_box[2:])
        except openslide.OpenSlideError:
            return False
    return True


@pytest.mark.parametrize(("source", "per_kind"), [pytest.param(s, PER_KIND, id=s) for s in sorted(SOURCES)] + [
    pytest.param(s, MANY_PER_KIND, id=f"{s}-many", marks=pytest.mark.slow) for s in sorted(SOURCES)])
def test_every_mutant_fails_by_name_or_tiles_as_the_clean_file(source, per_kind, tmp_path, capfd):
    path, changes, kinds = SOURCES[source]
    spec = make_spec(**changes)
    tile_dataset(make_spec(**changes, inputs={"clean": str(path)}), tmp_path / "clean")
    clean = grid_patches(tmp_path / "clean" / "inputs" / "clean")
    assert clean
    layout = Layout.of(path)
    made = {}
    for kind in kinds:
        for mutant in mutants(source, layout, kind, per_kind):
            file = tmp_path / "mutants" / f"{mutant.name}.tif"
            file.parent.mkdir(exist_ok=True)
            file.write_bytes(mutant.data)
            made[mutant.name] = (mutant, file)
    log_file = tmp_path / "tifffile.log"  # forked children inherit the handler: their tifffile lines land here
    handler = logging.FileHandler(log_file)
    logging.getLogger("tifffile").addHandler(handler)
    try:
        tile_dataset(spec.__class__(**{**spec.__dict__, "inputs": {name: str(f) for name, (_, f) in made.items()}}),
                     tmp_path / "out")
    finally:
        logging.getLogger("tifffile").removeHandler(handler)
        handler.close()

    table = pd.read_csv(tmp_path / "out" / "status.tsv", sep="\t").set_index("input_id")
    assert set(table.index) == set(made)  # no lost input, no lost dataset
    problems = []
    for name, (mutant, file) in made.items():
        row, folder = table.loc[name], tmp_path / "out" / "inputs" / name
        status = json.loads((folder / "status.json").read_text())
        if status["status"] != "done":
            if status["reason"] in MISSED or str(file) not in status["message"]:
                problems.append(f"{name} ({mutant.what}): {status['message']}")
            continue
        different = [key for key, rgb in grid_patches(folder).items()
                     if key not in clean or not np.array_equal(rgb, clean[key])]
        if different and not locally_resynchronised(source, mutant, file, different, row):
            problems.append(f"{name} ({mutant.what}): done, {len(different)} of {row.patch_count} patches differ")
    err = capfd.readouterr().err
    assert "Traceback" not in err, err[-3000:]
    unnamed = [line for line in log_file.read_text().splitlines() if str(tmp_path) not in line]
    assert not unnamed, unnamed  # tifffile's lines name the file
    # No child came near the tile rules' memory (each input's peak resident set, as its guard measured it).
    assert 0 < table.tiling_memory_mb.max() < DEFAULT_MEMORY_MB, table.tiling_memory_mb.max()
    assert not problems, "\n".join(problems)


def locally_resynchronised(source, mutant, file, different, row) -> bool:
    """The undetectable case of the module docstring: a level-0 tile of the slide whose damage
    OpenSlide does not notice either, and differences only in patches overlapping it."""
    if source != "svs" or mutant.tile is None or mutant.tile[0] != 0:
        return False
    tiles_across = -(-int(row.width) // 240)
    index = mutant.tile[1]
    box = ((index % tiles_across) * 240, (index // tiles_across) * 240, 240, 240)
    if not openslide_reads_tile(file, box):
        return False
    read = int(row.read_size)
    for key in different:
        patch_row, patch_col = (int(part[1:]) for part in key.split("_"))
        x, y = patch_col * read, patch_row * read
        if x >= box[0] + 240 or x + read <= box[0] or y >= box[1] + 240 or y + read <= box[1]:
            return False
    return True


GUARDED_RUN = """
import os, signal, sys
import pipeline.tiling.slide as slide
from helpers import make_spec
from pipeline.tiling.run import tile_dataset

real_open = slide.open_slide_source

def hostile(path, spec):
    if "killed" in str(path):
        os.kill(os.getpid(), signal.SIGKILL)  # runs in the forked child: kills only it
    if "hungry" in str(path):
        bytearray(256 * 2**20)  # past the 64 MB limit
    return real_open(path, spec)

slide.open_slide_source = hostile
inputs = {name: os.path.join(sys.argv[1], name + ".svs") for name in ("killed", "hungry", "good")}
print(tile_dataset(make_spec(inputs=inputs), os.path.join(sys.argv[1], "out"), memory_mb=64))
"""


def test_a_child_that_dies_or_runs_out_of_memory_is_that_inputs_failure(tmp_path):
    """The per-input guard: a reader killed by a signal, and one that allocates past the limit
    (a tiny one here: nothing near gigabytes is allocated), fail their input; the dataset completes.
    In a fresh process, as the tile rule runs: the limit bounds the address space, and a long-lived
    process (this test session) has free heap a child could reuse without growing it."""
    import subprocess
    import sys

    from helpers import REPO, pipeline_env

    for name in ("killed", "hungry", "good"):
        (tmp_path / f"{name}.svs").write_bytes(DEMO_SLIDE.read_bytes())
    inputs = {name: str(tmp_path / f"{name}.svs") for name in ("killed", "hungry", "good")}
    run = subprocess.run([sys.executable, "-c", GUARDED_RUN, str(tmp_path)], capture_output=True, text=True,
                         env={**pipeline_env(), "PYTHONPATH": f"{REPO}:{REPO / 'tests'}"}, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    summary = run.stdout
    table = pd.read_csv(tmp_path / "out" / "status.tsv", sep="\t").set_index("input_id")
    assert table.loc["good", "status"] == "done" and table.loc["good", "patch_count"] > 0
    assert table.loc["killed", "reason"] == "reader_crashed" and "SIGKILL" in table.loc["killed", "message"]
    assert table.loc["hungry", "reason"] == "out_of_memory"
    for name in ("killed", "hungry"):
        assert inputs[name] in table.loc[name, "message"] and f"FAILED {name}.svs" in summary
        assert pd.read_parquet(tmp_path / "out" / "inputs" / name / "manifest.parquet").empty
    assert not list((tmp_path / "out" / "inputs").glob(".*"))  # no half-written folder left


def test_the_summary_records_an_input_folder_that_is_missing(tmp_path):
    """A tile_input job killed from outside leaves no folder: the summary still covers the dataset."""
    from pipeline.tiling.outputs import summarize_dataset

    tile_dataset(make_spec(inputs={"good": str(DEMO_SLIDE)}), tmp_path)
    table = summarize_dataset([tmp_path / "inputs" / "good", tmp_path / "inputs" / "gone"],
                              tmp_path / "status.tsv", tmp_path / "manifest.parquet").set_index("input_id")
    assert table.loc["good", "status"] == "done"
    assert (table.loc["gone", "status"], table.loc["gone", "reason"]) == ("error", "reader_crashed")
