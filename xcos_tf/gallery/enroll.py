"""Enrolment: an ImageFolder of people (`FOLDER/person/photo.jpg`) -> a gallery index folder.

Every photo is aligned as `xcos_tf.explain` aligns it (the largest face; aligned 112x112 crops
as they are) and embedded in batches. A photo without a usable face (or unreadable) becomes a
reject with its reason, never a failure. Photos already in the index, enrolled or rejected, are
skipped, so running again after adding photos embeds only the new ones.
"""
import os

import numpy as np

from xcos_tf import progress as progress_lib
from xcos_tf.gallery import index as index_lib

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
BATCH = 32


def scan_people(images_dir):
    """[(identity, photo path)] of an ImageFolder, sorted by person then photo."""
    images_dir = os.fspath(images_dir)
    if not os.path.isdir(images_dir):
        raise FileNotFoundError(f"{images_dir}: not a folder (expected FOLDER/person/photo.jpg)")
    photos = []
    for person in sorted(os.listdir(images_dir)):
        folder = os.path.join(images_dir, person)
        if os.path.isdir(folder):
            photos += [(person, os.path.abspath(os.path.join(folder, name))) for name in sorted(os.listdir(folder))
                       if name.lower().endswith(IMAGE_SUFFIXES)]
    if not photos:
        raise FileNotFoundError(f"{images_dir}: no photos in person folders (expected FOLDER/person/photo.jpg)")
    return photos


def embed_faces(model, photos, progress=True):
    """Aligns and embeds [(identity, path)]: (entries, grids float16 [N, h, w, C], rejects)."""
    entries, grids, rejects, batch = [], [], [], []

    def flush():
        outputs = model.runtime.embed(np.stack([face for _, face in batch]))
        entries.extend(entry for entry, _ in batch)
        grids.append(index_lib.stored_grids(outputs["grid"], model.runtime.grid_shape))  # half the RAM until saved
        batch.clear()

    for identity, photo in progress_lib.bar(photos, description="enrolling", unit="photo", show=progress):
        try:
            face, _ = model.align(photo, label=photo)
        except ValueError as err:  # ImageError, FaceError: the reason names the photo
            rejects.append({"photo": photo, "reason": str(err)})
            continue
        batch.append(({"identity": identity, "photo": photo}, face))
        if len(batch) == BATCH:
            flush()
    if batch:
        flush()
    return (entries, np.concatenate(grids) if grids else np.zeros((0, *model.runtime.grid_shape), index_lib.GRID_DTYPE),
            rejects)


def enroll(model, model_dir, images_dir, index_dir, progress=True):
    """Adds the new photos of `images_dir` to the index at `index_dir` (created when absent).

    Args:
        model: `xcos_tf.api.FaceModel` loaded from `model_dir`.
        model_dir: str, the exported model's folder (recorded in the index).
        images_dir: str, an ImageFolder of people.
        index_dir: str, the index folder.
        progress: bool, show a progress bar on stderr.

    Returns:
        dict: `added` (faces), `rejected` (new rejects), `skipped` (already in the index),
        `entries` (faces in the index now), `rejects` (the new rejects, `{"photo", "reason"}`).
    """
    index_lib.check_replaceable(index_dir)
    fingerprint = index_lib.model_fingerprint(model.runtime.manifest)
    if os.path.exists(os.path.join(os.fspath(index_dir), index_lib.MANIFEST)):
        data = index_lib.open_index(index_dir)  # memory-mapped: the save streams its rows into the new folder
        if data.fingerprint != fingerprint:
            raise index_lib.GalleryError(
                f"{index_dir} was enrolled with another model ({data.model_dir}): enrol into a new index"
            )
    else:
        data = index_lib.IndexData.empty(model_dir, fingerprint, model.runtime.grid_shape)
    known = data.known_photos()
    photos = scan_people(images_dir)
    new = [(identity, photo) for identity, photo in photos if photo not in known]
    entries, grids, rejects = embed_faces(model, new, progress=progress)
    if new:
        index_lib.save(data, index_dir, entries=entries, grids=grids, rejects=rejects)
    return {"added": len(entries), "rejected": len(rejects), "skipped": len(photos) - len(new),
            "entries": len(data.entries) + len(entries), "rejects": rejects}
