"""Cascaded 3D FCN (Roth et al., CMIG 2018) for multi-organ segmentation of abdominal CT, as a MONAI bundle.

The bundle's runtime (what the configs import and the zoo export ships), one module per responsibility:

- ``labels``: label sets (the paper's seven structures by default) and name/id maps.
- ``preview``: PNG previews (axial, coronal, sagittal) with label overlay.
- ``network``: the valid-convolution 3D U-Net and its size arithmetic.
- ``inferer``: exact, memory-bounded tiled inference for valid-convolution networks.
- ``candidates``: candidate regions C1 (body mask) and C2 (dilated stage-1 foreground).
- ``loss``: class-weighted cross-entropy inside the candidate region (paper eq. 3-4), Dice + CE option.
- ``augment`` / ``sampling``: patch sampling inside the candidate region, elastic + rigid augmentation on device.
- ``data``: MSD dataset.json reading, pairing by case id, dataset verification.

Tools that do not ship live in the repository's ``tools/``: the phantom generator (``tools.phantom``), the demo and
the zoo export. No module here imports them.
"""

__version__ = "0.1.0"
