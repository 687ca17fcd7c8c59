"""Writers of small slide files in the formats OpenSlide reads, from real H&E pixels, for tests.

- generic tiled TIFF (tifffile), optionally with a second, unrelated scene after the first;
- Aperio SVS whose tiles are JPEG 2000 (compression 33003 YCbCr or 33005 RGB, as Aperio writes
  them; imagecodecs encodes), with a reduced level, thumbnail, label and macro image;
- DICOM whole-slide image (VL Whole Slide Microscopy, TILED_FULL, JPEG baseline frames), one file
  per pyramid level in one folder, written with pydicom.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import tifffile
from PIL import Image

APERIO_JP2K_YCBCR = 33003
APERIO_JP2K_RGB = 33005
VL_WHOLE_SLIDE_MICROSCOPY = "1.2.840.10008.5.1.4.1.1.77.1.6"
TILE = 256


def write_tiled_tiff(path, rgb, mpp=None, second_scene=None):
    """A single-level tiled TIFF (OpenSlide's generic TIFF), with resolution tags if mpp is given;
    ``second_scene`` is written as a further full-resolution image after it."""
    kwargs = {}
    if mpp is not None:
        kwargs = {"resolution": (1e4 / mpp, 1e4 / mpp), "resolutionunit": "CENTIMETER"}
    with tifffile.TiffWriter(path) as tif:
        tif.write(rgb, tile=(TILE, TILE), photometric="rgb", compression="zlib", metadata=None, **kwargs)
        if second_scene is not None:
            tif.write(second_scene, tile=(TILE, TILE), photometric="rgb", compression="zlib", metadata=None)
    return path


def shrink(rgb: np.ndarray, factor: int) -> np.ndarray:
    image = Image.fromarray(rgb)
    return np.asarray(image.resize((image.width // factor, image.height // factor), Image.Resampling.BOX))


def write_aperio_jp2k_svs(path, rgb, mpp, compression=APERIO_JP2K_RGB, associated=None):
    """An Aperio SVS with JPEG 2000 tiles: level 0, thumbnail, level 1 (/2) and, from
    ``associated`` pixels, a label and a macro image (which must never be tiled)."""
    height, width = rgb.shape[:2]
    description = (f"Aperio Image Library v12.0.15 \r\n{width}x{height} [0,0 {width}x{height}] ({TILE}x{TILE}) "
                   f"J2K/KDU Q=90|AppMag = 20|MPP = {mpp}")

    def level_pixels(pixels):
        # 33003 tiles hold YCbCr samples; OpenSlide converts them back to RGB
        return np.asarray(Image.fromarray(pixels).convert("YCbCr")) if compression == APERIO_JP2K_YCBCR else pixels

    j2k = {"tile": (TILE, TILE), "photometric": "rgb", "compression": compression, "metadata": None}
    if compression == APERIO_JP2K_YCBCR:
        j2k["compressionargs"] = {"level": 90}
    with tifffile.TiffWriter(path) as tif:
        tif.write(level_pixels(rgb), description=description, **j2k)
        tif.write(shrink(rgb, 4), photometric="rgb", compression="jpeg", description="Aperio Image Library thumbnail",
                  metadata=None)
        tif.write(level_pixels(shrink(rgb, 2)), description=description, **j2k)
        if associated is not None:
            tif.write(associated[:300, :400], photometric="rgb", compression="lzw", subfiletype=1, metadata=None,
                      description="Aperio Image Library v12.0.15\r\nlabel 400x300")
            tif.write(associated, photometric="rgb", compression="jpeg", subfiletype=9, metadata=None,
                      description=f"Aperio Image Library v12.0.15\r\nmacro {associated.shape[1]}x{associated.shape[0]}")
    return path


def write_dicom_wsi(folder: Path, name: str, rgb: np.ndarray, mpp: float, levels: int = 2) -> Path:
    """A DICOM WSI series in ``folder`` (``<name>.dcm`` level 0, ``<name>_level<k>.dcm`` below);
    returns the level-0 file, which OpenSlide opens together with the other levels."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.encaps import encapsulate
    from pydicom.sequence import Sequence
    from pydicom.uid import JPEGBaseline8Bit, generate_uid

    folder.mkdir(parents=True, exist_ok=True)
    study, series, frame_of_reference = generate_uid(), generate_uid(), generate_uid()
    paths = []
    for level in range(levels):
        pixels = shrink(rgb, 2**level) if level else rgb
        height, width = pixels.shape[:2]
        frames = []
        for y in range(0, height, TILE):  # TILED_FULL: row-major tiles, edge tiles padded
            for x in range(0, width, TILE):
                tile = np.full((TILE, TILE, 3), 255, np.uint8)
                crop = pixels[y:y + TILE, x:x + TILE]
                tile[:crop.shape[0], :crop.shape[1]] = crop
                buffer = io.BytesIO()
                Image.fromarray(tile).save(buffer, "JPEG", quality=95)
                frames.append(buffer.getvalue())
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = VL_WHOLE_SLIDE_MICROSCOPY
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = JPEGBaseline8Bit
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = VL_WHOLE_SLIDE_MICROSCOPY, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID, ds.FrameOfReferenceUID = study, series, frame_of_reference
        ds.Modality, ds.PatientName, ds.PatientID = "SM", "Test^Slide", "rldiff-test"
        ds.ImageType = ["ORIGINAL", "PRIMARY", "VOLUME", "NONE"]
        ds.DimensionOrganizationType = "TILED_FULL"
        ds.TotalPixelMatrixColumns, ds.TotalPixelMatrixRows = width, height
        ds.TotalPixelMatrixFocalPlanes, ds.NumberOfOpticalPaths = 1, 1
        ds.Columns, ds.Rows, ds.NumberOfFrames = TILE, TILE, len(frames)
        ds.SamplesPerPixel, ds.PhotometricInterpretation, ds.PlanarConfiguration = 3, "YBR_FULL_422", 0
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
        ds.LossyImageCompression = "01"
        measures = Dataset()
        measures.PixelSpacing = [mpp * 2**level / 1000, mpp * 2**level / 1000]  # millimetres
        measures.SliceThickness = 0.001
        shared = Dataset()
        shared.PixelMeasuresSequence = Sequence([measures])
        ds.SharedFunctionalGroupsSequence = Sequence([shared])
        optical_path = Dataset()
        optical_path.OpticalPathIdentifier = "1"
        ds.OpticalPathSequence = Sequence([optical_path])
        ds.PixelData = encapsulate(frames)
        ds["PixelData"].VR = "OB"
        path = folder / (f"{name}.dcm" if level == 0 else f"{name}_level{level}.dcm")
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths[0]
