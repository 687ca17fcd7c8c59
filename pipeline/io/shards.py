"""WebDataset tar shards: deterministic, atomically written, with validated keys."""

from __future__ import annotations

import io
import json
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import imagecodecs
import numpy as np
from PIL import Image
import webdataset
from webdataset import TarWriter

from pipeline.io.atomic import atomic_file, remove_path, temp_sibling

# WebDataset splits "key.ext" at the first dot, so keys must not contain one.
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# Fixed tar metadata so that the same samples always give byte-identical shards.
TAR_MTIME = 0.0


def check_key(key: str) -> str:
    if not KEY_RE.match(key):
        raise ValueError(f"sample key {key!r} may only hold letters, digits, '_' and '-'")
    return key


def encode_image(rgb: np.ndarray, image_format: str, jpeg_quality: int = 95) -> bytes:
    """Encode an HxWx3 uint8 array as PNG or JPEG (4:4:4, so colour is not halved)."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an HxWx3 uint8 image, got {rgb.dtype} {rgb.shape}")
    if image_format == "jpg":
        # libjpeg-turbo straight from the array: the same bytes as PIL's encoder with these
        # settings, without PIL's image copy and file-object round trip (a third of the cost).
        return imagecodecs.jpeg8_encode(np.ascontiguousarray(rgb), level=jpeg_quality, subsampling="444")
    if image_format != "png":
        raise ValueError(f"unknown image format {image_format!r}")
    buffer = io.BytesIO()
    Image.fromarray(rgb, "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def decode_image(data: bytes) -> np.ndarray:
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


def encode_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


def _tar_writer(stream) -> TarWriter:
    return TarWriter(stream, encoder=False, mtime=TAR_MTIME, user="rldiff", group="rldiff")


def iter_shard(path: str | Path) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard, in order, undecoded: {'__key__': key, ext: bytes, ...}."""
    # No node/worker splitting: this reads one whole shard, whatever process it runs in
    # (webdataset's defaults raise under torch.distributed and split shards across workers).
    dataset = webdataset.WebDataset(str(path), shardshuffle=False, empty_check=False,
                                    nodesplitter=None, workersplitter=None)
    for sample in dataset:
        yield {k: v for k, v in sample.items() if k == "__key__" or not k.startswith("__")}


def read_shard(path: str | Path) -> list[dict[str, Any]]:
    return list(iter_shard(path))


IMAGE_EXTENSIONS = ("jpg", "png")


def image_field(sample: dict[str, Any]) -> str:
    """The member of a sample that holds its patch image."""
    for ext in IMAGE_EXTENSIONS:
        if ext in sample:
            return ext
    raise ValueError(f"sample {sample['__key__']!r} has no image ({', '.join(IMAGE_EXTENSIONS)})")


def encode_npy(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def decode_npy(data: bytes) -> np.ndarray:
    return np.load(io.BytesIO(data), allow_pickle=False)


def write_shard(final: str | Path, samples: list[dict[str, Any]]) -> None:
    """Write one complete shard atomically; each sample is {'__key__': key, ext: bytes, ...}."""
    with atomic_file(final) as temp, open(temp, "wb") as stream:
        writer = _tar_writer(stream)
        for sample in samples:
            check_key(sample["__key__"])
            writer.write(sample)
        writer.close()


class ShardWriter:
    """Write samples into ``<folder>/<prefix>-000000.tar``, … with at most ``max_count``
    samples each. Each shard is a temporary file until it is complete, then renamed."""

    def __init__(self, folder: str | Path, prefix: str = "patches", max_count: int = 2000):
        self.folder = Path(folder)
        self.prefix = prefix
        self.max_count = max_count
        self.shard_names: list[str] = []
        self._index = 0
        self._count = 0
        self._writer: TarWriter | None = None
        self._stream = None
        self._temp: Path | None = None
        self._final: Path | None = None

    def _open(self) -> None:
        name = f"{self.prefix}-{self._index:06d}.tar"
        self._final = self.folder / name
        self._temp = temp_sibling(self._final)
        self._stream = open(self._temp, "wb")
        self._writer = _tar_writer(self._stream)
        self.shard_names.append(name)
        self._count = 0

    def _finish(self) -> None:
        if self._writer is None:
            return
        self._writer.close()  # also closes the stream
        os.replace(self._temp, self._final)
        self._writer = self._stream = self._temp = None
        self._index += 1

    def write(self, key: str, fields: dict[str, bytes]) -> str:
        """Add one sample; returns the shard name it went into."""
        check_key(key)
        if self._writer is not None and self._count >= self.max_count:
            self._finish()
        if self._writer is None:
            self._open()
        self._writer.write({"__key__": key, **fields})
        self._count += 1
        return self.shard_names[-1]

    def close(self) -> None:
        self._finish()

    def abort(self) -> None:
        """Drop the shard being written (on error)."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                remove_path(self._temp)
                self._writer = self._stream = self._temp = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()
