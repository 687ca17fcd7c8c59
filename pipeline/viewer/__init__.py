"""The deep-zoom viewer: a static site of the large images, opened from the file system.

`build_viewer(results_dir)` writes ``OUT/viewer/``: ``index.html`` (a thumbnail per large image)
and one page per image with the generated image and its real reference in two synchronised
OpenSeadragon viewers, a scale bar and the region's provenance. Tiles are Deep Zoom pyramids
written from the stage's pyramidal TIFFs (``dzi.py``); the pages inline the DZI metadata, so a
browser only loads ``<img>`` tiles and scripts, which works from ``file://`` without a server.
"""

from pipeline.viewer.settings import ViewerSettings
from pipeline.viewer.site import build_viewer

__all__ = ["ViewerSettings", "build_viewer"]
