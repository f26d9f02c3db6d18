"""Encoders shipped with locsort, made by ``scripts/pretrain_encoder.py`` (each file's metadata
says on what and how): the starting point of the encoder's training on a recording whose probe
has the same neighbourhood layout, so that a few epochs on the recording's own spikes replace a
training from scratch (``Params.encoder_init``)."""

from __future__ import annotations

from pathlib import Path

from ...errors import LocsortError

# name -> file; each was trained on SpikeInterface-generated recordings of that probe type
ENCODER_PATHS = {
    "neuropixels1": Path(__file__).with_name(
        "encoder_neuropixels1.safetensors"
    ),  # staggered columns, 16 / 20 µm
    "square_mea_15um": Path(__file__).with_name(
        "encoder_square_mea_15um.safetensors"
    ),  # 15 µm square lattice
    "neuropixels2": Path(__file__).with_name(
        "encoder_neuropixels2.safetensors"
    ),  # 2 aligned columns, 32 / 15 µm
}


def matching_encoder(geometry: dict, decay: str, hidden: int, device="cpu"):
    """The shipped AmortizedLocalizer whose probe layout (``amortized._geometry_of``), decay law and
    width are these, or None when no shipped encoder fits this probe."""
    from ..amortized import AmortizedLocalizer, same_geometry

    for name, path in ENCODER_PATHS.items():
        if not path.exists():
            raise LocsortError(
                f"the pretrained encoder {path.name} is missing from the package; "
                "re-install locsort, run scripts/pretrain_encoder.py, or set encoder_init=None"
            )
        encoder = AmortizedLocalizer.load(path, device=device)
        if (
            same_geometry(encoder.geometry, geometry)
            and encoder.globals.decay == decay
            and encoder.hidden == hidden
        ):
            encoder.info.setdefault("name", name)
            return encoder
    return None
