"""Synthetic abdominal CT phantoms: the project's data for tests, the demo and benchmarks (a tool: not shipped).

The repository ships no patient data, so the cascade is trained and tested on generated CTs. A model trained on toys
(spheres in noise) learns toys; these phantoms therefore draw a torso with the anatomy a segmentation network has to
tell apart: skin, subcutaneous fat, abdominal wall and back muscles, a spine with vertebral bodies, discs, spinal canal
and posterior elements, ribs with costal cartilages, lung bases above a domed diaphragm, the bottom of the heart, bowel
loops (wall, fluid and gas) and a colon with stool, a patient table, and the organs: liver (with hepatic veins), spleen,
stomach (wall, fluid and air), gallbladder, pancreas, both kidneys (cortex, medulla, sinus, pelvis), aorta with its
main branches, inferior vena cava with renal and iliac veins, and the portal, splenic and superior mesenteric veins.

Every organ is an implicit surface (ellipsoids or swept spheres along a spline) with a smooth random deformation,
placed relative to the spine and the body wall, and scaled so that its volume falls in the range seen on real CTs.
Each case draws its own body size, organ sizes, shapes and positions, contrast phase (native, arterial,
portal-venous), noise, partial-volume blur, voxel spacing, number of slices and voxel orientation (RAS, LPS, LAS: the
array is really flipped and the affine says so, so the world coordinates of the anatomy are the same in every
orientation). Everything follows from one integer seed.

The package, in the order a case is made (``generate.generate_phantom``):

============== ==========================================================================================
``params``     every per-case number, drawn from the seed in a fixed order
``variety``    ``varied`` preset only: field of view, contrast, texture and shape variety (own generator)
``anatomy``    landmarks and organ positions; builds ``vessels``, ``gut`` and ``organs``
``organs``     the organ table (``ORGANS``: one ``OrganSpec`` per labelled organ), its shapes and calibration
``vessels``    arteries, caval and portal systems, hepatic veins (spline centre lines with radii)
``gut``        oesophagus, duodenum, colon, small-bowel loops
``body``       torso outline, fat, abdominal wall, diaphragm
``skeleton``   spine, ribs, pelvis
``pelvis``     ``varied`` preset, pelvic fields of view: bladder, rectum, femoral heads (unlabelled)
``geometry``   implicit surfaces (ellipsoids, swept spheres, smooth unions) and smooth random fields
``render``     the canvas (tissue and owner maps), painting order, label map
``tissues``    tissue classes, HU ranges and textures, owner structures
``acquisition`` presets, voxel grid, orientation, HU image (texture, blur, noise)
``dataset``    MSD dataset writing, preview, the command line (``python -m tools.phantom``)
============== ==========================================================================================

>>> from tools.phantom import generate_phantom
>>> p = generate_phantom(0, preset="tiny")
>>> p.image.shape == p.label.shape, p.label.dtype.name, sorted(p.labels)[:2]
(True, 'uint8', ['artery', 'gallbladder'])
"""

from tools.phantom.acquisition import ORIENTATIONS, OVERRIDES, PHASES, PRESETS
from tools.phantom.dataset import preview, write_dataset
from tools.phantom.generate import GENERATOR_VERSION, Phantom, generate_phantom
from tools.phantom.organs import ORGANS, OrganSpec
from tools.phantom.tissues import OWNERS, TISSUE_HU

__all__ = [
    "GENERATOR_VERSION",
    "PRESETS",
    "PHASES",
    "ORIENTATIONS",
    "OVERRIDES",
    "TISSUE_HU",
    "OWNERS",
    "ORGANS",
    "OrganSpec",
    "Phantom",
    "generate_phantom",
    "write_dataset",
    "preview",
]
