"""Pair scoring, batched, for every caller: the trainer's evaluator, `tools/choose_threshold`
and `xcos_tf.evaluate`. Faces or grids in, scores (and maps) out.

`decompose_pairs` batches the export's `decompose` signature (the teacher's cosine split per cell).

A "scorer" is anything with `embed(faces) -> {"embedding", "grid"}` and
`compare(grid_a, grid_b) -> {"score", "cos_map", "attention_map"}` on numpy arrays: a runtime
(`xcos_tf.runtime.load`), or a Keras `Verifier` wrapped in `VerifierScorer`.
"""
import numpy as np

BATCH_SIZE = 64


class VerifierScorer:
    """A Keras `Verifier` (xcos_tf.model.build_verifier) with the runtimes' numpy interface."""

    def __init__(self, verifier):
        self.verifier = verifier

    def embed(self, faces):
        outputs = self.verifier.embed({"image": faces}, training=False)
        return {key: np.asarray(value) for key, value in outputs.items()}

    def compare(self, grid_a, grid_b):
        outputs = self.verifier.compare({"grid_a": grid_a, "grid_b": grid_b}, training=False)
        return {key: np.asarray(value) for key, value in outputs.items()}


def embed_faces(model, faces, batch_size=BATCH_SIZE):
    """(embedding [N, D], grid [N, H, W, C]) of faces, in batches."""
    embeddings, grids = [], []
    for start in range(0, len(faces), batch_size):
        outputs = model.embed(np.asarray(faces[start:start + batch_size], np.float32))
        embeddings.append(np.asarray(outputs["embedding"], np.float32))
        grids.append(np.asarray(outputs["grid"], np.float32))
    return np.concatenate(embeddings), np.concatenate(grids)


def compare_grids(model, grid_a, grid_b, batch_size=BATCH_SIZE):
    """The model's `compare` over pairs of grids, in batches: score, cos_map, attention_map."""
    parts = [model.compare(grid_a[start:start + batch_size], grid_b[start:start + batch_size])
             for start in range(0, len(grid_a), batch_size)]
    return {key: np.concatenate([np.asarray(p[key], np.float32) for p in parts]) for key in parts[0]}


def decompose_pairs(model, faces_a, faces_b, batch_size=BATCH_SIZE):
    """The model's `decompose` over pairs of faces, in batches: score, contribution_map, bias
    (the original teacher's cosine split per cell; the model must have the signature)."""
    parts = [model.decompose(np.asarray(faces_a[start:start + batch_size], np.float32),
                             np.asarray(faces_b[start:start + batch_size], np.float32))
             for start in range(0, len(faces_a), batch_size)]
    return {key: np.concatenate([np.asarray(p[key], np.float32) for p in parts]) for key in parts[0]}


def row_cosine(a, b):
    """Cosine of corresponding rows."""
    a = a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)
    b = b / np.maximum(np.linalg.norm(b, axis=1, keepdims=True), 1e-12)
    return np.sum(a * b, axis=1)


def score_pairs(model, faces_a, faces_b, batch_size=BATCH_SIZE):
    """The xCos outputs (score, cos_map, attention_map) of each pair of faces, plus `cosine`:
    the plain cosine of the two embeddings. One backbone pass per face."""
    embedding_a, grid_a = embed_faces(model, faces_a, batch_size)
    embedding_b, grid_b = embed_faces(model, faces_b, batch_size)
    outputs = compare_grids(model, grid_a, grid_b, batch_size)
    outputs["cosine"] = row_cosine(embedding_a, embedding_b)
    return outputs


def grids_by_key(model, keys, faces, cache, batch_size=BATCH_SIZE):
    """The grids of `faces` [N, H, W, 3] named by `keys`, stacked; faces whose key is in `cache`
    (a dict key -> grid, updated here) are not run again: evaluation sets reuse faces across pairs."""
    missing = [i for i, key in enumerate(keys) if key not in cache]
    if missing:
        _, computed = embed_faces(model, np.asarray(faces)[missing], batch_size)
        cache.update({keys[i]: grid for i, grid in zip(missing, computed)})
    return np.stack([cache[key] for key in keys])
