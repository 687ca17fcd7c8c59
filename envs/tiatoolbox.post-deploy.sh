#!/usr/bin/env bash
# Run by Snakemake (--use-conda) inside envs/tiatoolbox.yaml's new environment: tiatoolbox without
# its declared dependencies (torch<2.13 and the rest; the yaml has what its stain normalisers import).
# The version is envs/tiatoolbox-lock.txt's (tests/test_envs.py checks).
set -euo pipefail
python -m pip install --no-deps tiatoolbox==2.1.3
