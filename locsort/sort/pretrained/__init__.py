"""The backbone shipped with locsort (backbone.safetensors), made by
``scripts/pretrain_backbone.py``; its metadata says on what and how it was trained."""

from pathlib import Path

BACKBONE_PATH = Path(__file__).with_name("backbone.safetensors")
