"""Each stage's readers of what it writes (docs/data_contract.md, "Readers"): writer and reader
agree, a missing or malformed output is a StageOutputError naming the file, and evaluation and
the report read stage outputs through the readers only. Also the shard writer's atomic shards."""

from __future__ import annotations

import json
import re

import pandas as pd
import pytest

from helpers import REPO
from pipeline.embedding.outputs import read_embedding_index
from pipeline.errors import StageOutputError
from pipeline.evaluation.outputs import METRICS_FORMAT, read_metrics, write_metrics
from pipeline.io.shards import ShardWriter, read_shard
from pipeline.sampling.outputs import read_large_images, read_samples
from pipeline.tiling.failures import Reason
from pipeline.tiling.outputs import summarize_dataset
from pipeline.tiling.status import read_tiling_status
from pipeline.training.outputs import read_training_done, read_training_log, write_training_done


def test_tiling_status_records_come_from_the_summary_writer(tmp_path):
    inputs = tmp_path / "tiles" / "inputs"
    for input_id, status in (("a", {"status": "done", "reason": None, "patch_count": 3, "width": 800,
                                    "height": 600, "level0_mpp": 0.25, "mpp_source": "openslide_mpp"}),
                             ("b", {"status": "error", "reason": "would_upsample", "patch_count": 0,
                                    "message": "b.svs: would_upsample: 2x", "width": 100, "height": 90})):
        folder = inputs / input_id
        folder.mkdir(parents=True)
        (folder / "status.json").write_text(json.dumps({"input_id": input_id, "source": f"{input_id}.svs",
                                                        "kind": "wsi", "message": None, **status}))
        pd.DataFrame({"key": pd.Series(dtype=str)}).to_parquet(folder / "manifest.parquet")
    (inputs / "a" / "thumbnail.jpg").write_bytes(b"")
    summarize_dataset([inputs / "a", inputs / "b"], tmp_path / "tiles" / "status.tsv", tmp_path / "tiles" / "m.parquet")
    a, b = read_tiling_status(tmp_path / "tiles")
    assert (a.input_id, a.done, a.reason, a.patch_count, a.width, a.pixel_size, a.pixel_size_from) == (
        "a", True, None, 3, 800, 0.25, "openslide_mpp")
    assert a.thumbnail == inputs / "a" / "thumbnail.jpg" and b.thumbnail is None
    assert (b.done, b.reason, b.message) == (False, Reason.WOULD_UPSAMPLE, "b.svs: would_upsample: 2x")
    with pytest.raises(StageOutputError, match=re.escape(f"{tmp_path / 'x' / 'status.tsv'}: no tiling status")):
        read_tiling_status(tmp_path / "x")


def test_embedding_index_names_its_encoders_and_its_file(tmp_path):
    rows = pd.DataFrame({"key": ["a_r00000_c00000"], "input_id": ["a"], "col": [0], "row": [0],
                         "shard": ["a/patches-000000.tar"], "hipt_vit_s16_weights_sha256": ["random"],
                         "phikon_weights_sha256": ["ab" * 32]})
    rows.to_parquet(tmp_path / "index.parquet")
    index = read_embedding_index(tmp_path)
    assert len(index) == 1 and index.encoders == ("hipt_vit_s16", "phikon") and index.random_encoders == ("hipt_vit_s16",)
    rows.drop(columns="shard").to_parquet(tmp_path / "index.parquet")
    with pytest.raises(StageOutputError, match=r"index\.parquet: missing column\(s\) shard"):
        read_embedding_index(tmp_path)
    with pytest.raises(StageOutputError, match="embedding index not found"):
        read_embedding_index(tmp_path / "nothing")


def test_training_done_and_log_readers(tmp_path):
    assert read_training_done(tmp_path) is None and len(read_training_log(tmp_path)) == 0
    encoder = {"name": "hipt_vit_s16", "weights_sha256": "random", "random_weights": True}
    write_training_done(tmp_path / "done.json", tmp_path / "last.ckpt", 300, encoder)
    done = read_training_done(tmp_path)
    assert (done.checkpoint, done.max_steps, done.encoder) == (str(tmp_path / "last.ckpt"), 300, encoder)
    (tmp_path / "done.json").write_text("{}")
    with pytest.raises(StageOutputError, match=r"done\.json: cannot read the done record"):
        read_training_done(tmp_path)


def test_metrics_reader_round_trip_and_foreign_files(tmp_path):
    entry = {"name": "embedding_cosine", "value": 0.5, "scope": "patches", "samples": {"generated": 3, "real": 0},
             "feature_extractor": {"name": "hipt_vit_s16", "random_weights": True}, "std": 0.1, "min": 0.2,
             "median": 0.5, "max": 0.8, "warnings": [], "sampler": {}}
    write_metrics(tmp_path / "metrics.json", {"format": METRICS_FORMAT, "settings": {}, "metrics": [entry],
                                              "skipped": [{"name": "clip_fid", "reason": "no CLIP"}]})
    [metric] = read_metrics(tmp_path / "metrics.json").metrics
    assert (metric.generated, metric.real, metric.random_extractor) == (3, 0, True)
    assert metric.spread == {"std": 0.1, "min": 0.2, "median": 0.5, "max": 0.8} and metric.regions is None
    (tmp_path / "other.json").write_text(json.dumps({"metrics": []}))
    with pytest.raises(StageOutputError, match="other.json: not an evaluation's metrics.json"):
        read_metrics(tmp_path / "other.json")


def test_sampling_readers_name_the_missing_folder(tmp_path):
    with pytest.raises(StageOutputError, match="patch samples folder not found"):
        read_samples(tmp_path / "samples")
    (tmp_path / "large").mkdir()
    with pytest.raises(StageOutputError, match=re.escape(f"{tmp_path / 'large' / 'manifest.parquet'}: cannot read")):
        read_large_images(tmp_path / "large")


def test_shard_writer_renames_complete_shards_only(tmp_path):
    sample = {"json": b"{}", "png": b"x"}
    (tmp_path / "a").mkdir()
    with ShardWriter(tmp_path / "a", max_count=2) as shards:
        names = [shards.write({"__key__": f"k{i}", **sample}) for i in range(3)]
    assert names == ["patches-000000.tar", "patches-000000.tar", "patches-000001.tar"]
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["patches-000000.tar", "patches-000001.tar"]
    assert [s["__key__"] for s in read_shard(tmp_path / "a" / "patches-000001.tar")] == ["k2"]
    (tmp_path / "b").mkdir()
    with pytest.raises(ValueError, match="may only hold"), ShardWriter(tmp_path / "b", max_count=2) as shards:
        shards.write({"__key__": "k0", **sample})
        shards.write({"__key__": "bad.key", **sample})
    assert list((tmp_path / "b").iterdir()) == []  # the shard being written is dropped, not published
    (tmp_path / "c").mkdir()
    with ShardWriter(tmp_path / "c"):
        pass
    assert list((tmp_path / "c").iterdir()) == []  # no sample, no shard


STAGE_FILE_READS = re.compile(r"\b(read_parquet|read_csv|np\.load|json\.loads|read_(parquet|json|npy)_file)\(")


@pytest.mark.parametrize("package", ["reporting", "evaluation"])
def test_evaluation_and_report_read_stage_outputs_through_the_readers(package):
    """Only the owning stage parses its files; evaluation's own outputs.py reads its metrics.json,
    and settings.py parses the settings JSON a rule passes."""
    own = {"evaluation": {"outputs.py", "settings.py"}, "reporting": set()}[package]
    offenders = [f"{path.name}: {line.strip()}" for path in sorted((REPO / "pipeline" / package).glob("*.py"))
                 if path.name not in own for line in path.read_text().splitlines() if STAGE_FILE_READS.search(line)]
    assert offenders == []
