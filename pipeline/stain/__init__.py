"""Stain normalisation of tiled H&E patches with tiatoolbox (`snakemake stain`), between tiling and
embedding. tiatoolbox pins torch and dozens of other packages that the main environment cannot
share, so the stage runs in tiatoolbox's own environment (`environment.py`); this package's
`__init__` and `settings`, `environment` and `sheet` modules import nothing from it.
"""
