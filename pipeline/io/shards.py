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

from pipeline.io.atomic import atomic_file, remove_path

# WebDataset splits "key.ext" at the first dot, so keys must not contain one.
KEY_RE = re.compile(r"^[A-Za-z0-9_-]+$")
# Fixed tar metadata so that the same samples always give byte-identical shards; the samples'
# fields are bytes already (no encoder).
TAR_OPTIONS = {"encoder": False, "mtime": 0.0, "user": "rldiff", "group": "rldiff"}


def check_key(key: str) -> str:
    if not KEY_RE.match(key):
        raise ValueError(f"sample key {key!r} may only hold letters, digits, '_' and '-'")
    return key


def encode_image(pixels: np.ndarray, image_format: str, jpeg_quality: int = 95) -> bytes:
    """Encode an HxWxC uint8 array: PNG or JPEG (4:4:4, so colour is not halved) for C = 3, a
    lossless TIFF (any C, Deflate, one strip, no date: the same pixels give the same bytes) with ``tif``."""
    if pixels.dtype != np.uint8 or pixels.ndim != 3 or not (image_format == "tif" or pixels.shape[2] == 3):
        expected = "HxWxC" if image_format == "tif" else "HxWx3"
        raise ValueError(f"expected an {expected} uint8 image for {image_format}, got {pixels.dtype} {pixels.shape}")
    if image_format == "jpg":
        # libjpeg-turbo straight from the array: the same bytes as PIL's encoder with these
        # settings, without PIL's image copy and file-object round trip (a third of the cost).
        return imagecodecs.jpeg8_encode(np.ascontiguousarray(pixels), level=jpeg_quality, subsampling="444")
    buffer = io.BytesIO()
    if image_format == "tif":
        import tifffile

        tifffile.imwrite(buffer, np.ascontiguousarray(pixels), photometric="minisblack", planarconfig="contig",
                         compression="zlib", metadata=None, software=False, rowsperstrip=pixels.shape[0])
        return buffer.getvalue()
    if image_format != "png":
        raise ValueError(f"unknown image format {image_format!r}")
    Image.fromarray(pixels, "RGB").save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


TIFF_MAGIC = (b"II*\x00", b"MM\x00*")


def decode_bands(data: bytes) -> np.ndarray:
    """Every band of a patch image as HxWxC uint8: C = 3 for PNG and JPEG, the stored bands for TIFF."""
    if data[:4] in TIFF_MAGIC:
        import tifffile

        pixels = tifffile.imread(io.BytesIO(data))
        return pixels[..., None] if pixels.ndim == 2 else pixels
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


def decode_image(data: bytes) -> np.ndarray:
    """A patch image as HxWx3 RGB uint8: a multi-band TIFF's first three bands."""
    if data[:4] in TIFF_MAGIC:
        return np.ascontiguousarray(decode_bands(data)[..., :3])
    with Image.open(io.BytesIO(data)) as image:
        return np.array(image.convert("RGB"))


def encode_json(obj: dict[str, Any]) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


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


IMAGE_EXTENSIONS = ("jpg", "png", "tif")


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
        writer = TarWriter(stream, **TAR_OPTIONS)
        for sample in samples:
            check_key(sample["__key__"])
            writer.write(sample)
        writer.close()


class ShardWriter(webdataset.ShardWriter):
    """webdataset's ShardWriter into ``<folder>/<prefix>-000000.tar``, … (at most ``max_count``
    samples each) with this module's fixed tar metadata and validated keys. Each shard is written
    under a temporary name and renamed in ``post`` once complete, so a killed job never leaves a
    finished-looking shard; leaving the ``with`` block on an error drops the shard being written."""

    def __init__(self, folder: str | Path, prefix: str = "patches", max_count: int = 2000):
        # An absolute path: webdataset's gopen reads "scheme:" prefixes as URLs.
        folder = str(Path(folder).absolute()).replace("%", "%%")
        self._temp_suffix = f".tmp-{os.getpid()}"
        super().__init__(f"{folder}/.{prefix}-%06d.tar{self._temp_suffix}", maxcount=max_count,
                         maxsize=float("inf"), post=self._publish, verbose=0, **TAR_OPTIONS)

    def _final(self, temp: str) -> Path:
        temp_path = Path(temp)
        return temp_path.with_name(temp_path.name[1:].removesuffix(self._temp_suffix))

    def _publish(self, temp: str) -> None:
        if self.count == 0:  # the shard opened on construction, when no sample was written
            remove_path(Path(temp))
        else:
            os.replace(temp, self._final(temp))

    def write(self, sample: dict[str, Any]) -> str:
        """Add one sample {'__key__': key, ext: bytes, ...}; returns the name of the shard it went into."""
        check_key(sample["__key__"])
        super().write(sample)
        return self._final(self.fname).name

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.post = lambda temp: remove_path(Path(temp))
            self.close()
