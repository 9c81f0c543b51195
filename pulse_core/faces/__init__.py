"""Faces in whole photos: detect (MTCNN), align (FFHQ or demo crop), paste restored faces back.

    faces = detect_faces(photo)                       # list[DetectedFace], sorted by x then y
    aligned = align_faces(photo, faces, generator.resolution, recipe="ffhq")
    # ... restore each aligned[i].lr with the search (its forward operator: aligned[i].operator)
    result = paste_faces(photo, aligned, restored, upscale=2)   # result.image: PIL RGB

Pure library (torch, numpy, pillow). The faces stage needs no extra package: detection needs
the MTCNN weights, which `pulse models pull mtcnn` (and `make model`) takes out of the pinned
facenet-pytorch wheel into the model cache (a pip dependency cannot work: the package pins
torch<2.3 and numpy<2). Without them detection raises `FacesUnavailable`, saying so. The
pipeline runs this stage with `RestoreSettings(faces="align" | "paste")`: `docs/faces.md`.
"""

from pulse_core.faces.align import AlignedFace, Recipe, align_face, align_faces, choose_lr_size
from pulse_core.faces.mtcnn import (
    MTCNN,
    DetectedFace,
    DetectorConfig,
    FacesUnavailable,
    detect_faces,
    fetch_mtcnn_weights,
    load_mtcnn,
    weights_available,
)
from pulse_core.faces.paste import PastedPhoto, paste_faces, upscale_photo
from pulse_core.faces.photo import Photo

__all__ = [
    "MTCNN",
    "AlignedFace",
    "DetectedFace",
    "DetectorConfig",
    "FacesUnavailable",
    "PastedPhoto",
    "Photo",
    "Recipe",
    "align_face",
    "align_faces",
    "choose_lr_size",
    "detect_faces",
    "fetch_mtcnn_weights",
    "load_mtcnn",
    "paste_faces",
    "upscale_photo",
    "weights_available",
]
