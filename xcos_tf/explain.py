"""Explain one face verification: score, decision, and the picture of why.

`python -m xcos_tf.explain PHOTO_A PHOTO_B --model DIR [--method xcos|decomposition|gradcam|all]
[--out pair.png] [--json] [--choose largest|central] [--max_megapixels 50]`

Raw photos are detected and aligned with YuNet (`--choose`: the largest or the most central
face when there are several); aligned 112x112 crops are taken as they are. The pair is
verified (the xCos score and decision) and explained by one or more methods, each giving a
7x7 `contribution_map`:
- `xcos`: the model's own account, `cos_map * attention_map` (sums to the score);
- `decomposition`: the exact per-cell split of the original teacher's cosine (needs the
  export's `decompose` signature);
- `gradcam`: Grad-CAM of the plain embedding cosine on the grid layer
  (`xcos_tf.explanations.gradcam`), the baseline the official xCos code ships.
The picture (`xcos_tf.explain_picture`) has one row per method in one layout.

Library use (the web demo calls these):

```python
result = explain_photos("a.jpg", "b.jpg", runtime.load("exported/default"), FaceAligner(YUNET, choose="largest"),
                        methods=("xcos", "gradcam"))
picture = explain_picture.render_explanation(result["face_a"], result["face_b"], result)
```

No TensorFlow import here: with a TFLite or ONNX runtime, explain runs without it.
"""
import json
import os
import sys
import types

import numpy as np
from absl import flags

from xcos_tf import cli, runtime  # numpy only; the chosen format's backend is imported by `load`
from xcos_tf.data import align, image_io
from xcos_tf.explain_picture import decide, save_explanation, single_map
from xcos_tf.explanations import gradcam

EXIT_BAD_INPUT = 2
# Faces are searched for in a copy at most this large: YuNet misses a face that fills a large
# photo (measured: an LFW close-up scaled to 1600 px: no face; to 1000 px: a box on half the
# face; to 640 px: found).
DETECTION_MAX_SIDE = 640


def _detection_copy(image):
    """(image scaled to at most `DETECTION_MAX_SIDE` on its longer side, the scale used)."""
    import cv2

    scale = DETECTION_MAX_SIDE / max(image.shape[:2])
    if scale >= 1.0:
        return image, 1.0
    size = (round(image.shape[1] * scale), round(image.shape[0] * scale))
    return cv2.resize(image, size, interpolation=cv2.INTER_AREA), scale


def align_photo(photo, label, aligner, max_pixels=image_io.MAX_PIXELS):
    """One photo (a path or an RGB uint8 array) -> (aligned RGB uint8 face, note or None).

    Aligned 112x112 crops are used as they are. Other photos are searched for faces at most
    `DETECTION_MAX_SIDE` pixels wide or high (YuNet misses faces that fill a large photo),
    and the chosen face is then aligned from the full-resolution photo. The note says when
    the photo held several faces or was taken as a crop. `ImageError` and `FaceError`
    messages name the photo (`label` for arrays, the path for files); a file of more than
    `max_pixels` pixels is an `ImageError` (`image_io.ImageTooLargeError`).
    """
    if isinstance(photo, (str, os.PathLike)):
        name = os.fspath(photo)
        image = align.read_image(name, max_pixels)
    else:
        name = label
        image = np.asarray(photo)
    if align.is_aligned_crop(image):
        return align.aligned_crop(image).image, f"{label}: an aligned 112x112 crop, used as it is"
    small, scale = _detection_copy(image)
    try:
        face = aligner.align(small, assume_aligned=False)
    except align.FaceError as err:
        raise type(err)(f"{name}: {err}") from None
    aligned = face.image if scale == 1.0 else align.align_face(image, face.landmarks / scale)
    if face.num_faces > 1:
        choice = getattr(aligner, "choose", "chosen")
        return aligned, f"{label}: {face.num_faces} faces found in {name}, using the {choice} one"
    return aligned, None


NO_DECOMPOSE = "this model folder has no decompose signature"


class MethodUnavailableError(ValueError):
    """An explanation method the loaded model cannot run (e.g. no `decompose` signature)."""


def _xcos(runtime_model, face_a, face_b, verified):
    del runtime_model, face_a, face_b  # the verify outputs hold everything
    cos_map, attention_map = single_map(verified, "cos_map"), single_map(verified, "attention_map")
    return {"explains": "xcos score", "explained_score": float(np.asarray(verified["score"]).reshape(-1)[0]),
            "contribution_map": cos_map * attention_map, "cos_map": cos_map, "attention_map": attention_map}


def _decomposition(runtime_model, face_a, face_b, verified):
    del verified
    if not method_available(runtime_model, "decomposition"):
        raise MethodUnavailableError(f"{NO_DECOMPOSE} (export it with a teacher to explain the teacher's cosine)")
    try:
        outputs = runtime_model.decompose(face_a[None].astype(np.float32), face_b[None].astype(np.float32))
    except runtime.SignatureUnavailableError as error:  # e.g. --format tflite: decompose is not in that file
        raise MethodUnavailableError(str(error)) from None
    return {"explains": "teacher cosine", "explained_score": float(np.asarray(outputs["score"]).reshape(-1)[0]),
            "contribution_map": single_map(outputs, "contribution_map"),
            "bias": float(np.asarray(outputs["bias"]).reshape(-1)[0])}


def _gradcam(runtime_model, face_a, face_b, verified):
    del verified
    grids = runtime_model.embed(np.stack([face_a, face_b]).astype(np.float32))["grid"]
    maps = gradcam.grid_gradcam(grids[:1], grids[1:])
    return {"explains": "embedding cosine", "explained_score": float(maps["score"][0]),
            **{key: single_map(maps, key) for key in ("contribution_map", "gradcam_a", "gradcam_b")}}


# What each method explains, the same keys for all: `explains`, `explained_score` and a
# `contribution_map` (H, W), then the method's own maps (xcos: score = sum(contribution_map);
# decomposition: score = sum(contribution_map) + bias; gradcam: a saliency, no such sum).
METHODS = {"xcos": _xcos, "decomposition": _decomposition, "gradcam": _gradcam}


def method_available(runtime_model, method):
    """Whether `runtime_model` can run `method`: decomposition needs a `decompose` signature
    (a runtime with a `decompose` method whose manifest, when it lists signatures, has it)."""
    if method != "decomposition":
        return method in METHODS
    signatures = getattr(runtime_model, "manifest", {}).get("signatures")
    return callable(getattr(runtime_model, "decompose", None)) and (signatures is None or "decompose" in signatures)


def chosen_methods(method, runtime_model):
    """`method` (a name in `METHODS` or "all") -> (the method names to run, notes). "all" is
    every method the model can run, with a note for each one it cannot."""
    if method != "all":
        return [method], []
    notes = [f"no {name} row: {NO_DECOMPOSE}" for name in METHODS if not method_available(runtime_model, name)]
    return [name for name in METHODS if method_available(runtime_model, name)], notes


def explain_faces(face_a, face_b, runtime_model, notes=(), methods=("xcos",), title=None):
    """Verifies two aligned faces and explains the pair with `methods` (names in `METHODS`);
    returns the dict described in `explain_photos` (`title`: the picture's first line, or
    None). Raises `MethodUnavailableError`."""
    unknown = [method for method in methods if method not in METHODS]
    if unknown or not methods:
        raise ValueError(f"`methods` must be some of {list(METHODS)}. Received: methods={list(methods)}")
    outputs = runtime_model.verify(face_a[None].astype(np.float32), face_b[None].astype(np.float32))
    score = float(np.asarray(outputs["score"]).reshape(-1)[0])
    threshold = runtime_model.threshold
    threshold = None if threshold is None else float(threshold)
    return {
        "score": score,
        "threshold": threshold,
        "decision": decide(score, threshold),
        # verify's own maps, whatever the methods (the one-call API returns them)
        "cos_map": single_map(outputs, "cos_map"),
        "attention_map": single_map(outputs, "attention_map"),
        "methods": {method: METHODS[method](runtime_model, face_a, face_b, outputs) for method in methods},
        "face_a": face_a,
        "face_b": face_b,
        "notes": list(notes),
        "title": title,
    }


def explain_photos(photo_a, photo_b, runtime_model, aligner, methods=("xcos",), max_pixels=image_io.MAX_PIXELS):
    """Aligns two photos, verifies them and returns everything needed to explain the result.

    Args:
        photo_a, photo_b: image paths, or RGB uint8 arrays [H, W, 3]. Aligned 112x112 crops
            are used as they are; other photos go through `aligner`.
        runtime_model: an object with `.verify(image_a, image_b)` -> dict of numpy (score,
            cos_map, attention_map) and `.threshold` (float or None), e.g. `xcos_tf.runtime.load`.
        aligner: `xcos_tf.data.align.FaceAligner` (the CLI's `--choose`, default `"largest"`).
        methods: names in `METHODS`, in the order they are drawn. Defaults to `("xcos",)`.
        max_pixels: int, photo files with more pixels are refused before decoding
            (`image_io.MAX_PIXELS`, 50 megapixels, by default).

    Returns:
        dict: `score` float (the xCos score), `threshold` float or None, `decision` "same" /
        "different" / None, `cos_map` and `attention_map` float32 (H, W) (the xCos maps, for
        any method), `methods` {method: its explanation: `explains`, `explained_score`,
        `contribution_map` float32 (H, W) and its own maps}, `face_a` and `face_b` the aligned
        RGB uint8 faces, `notes` a list of str (several faces found, crop taken as is),
        `title` "a.jpg  vs  b.jpg" (the file names; None unless both photos are files),
        which `explain_picture` puts at the top of the picture.

    Raises:
        `xcos_tf.data.align.ImageError` for an unreadable file, `FaceError` (`NoFaceError`,
        `FaceTooSmallError`) when no usable face is found; both `ValueError`s whose message
        names the photo; `MethodUnavailableError` for a method the model cannot run.
    """
    face_a, note_a = align_photo(photo_a, "photo A", aligner, max_pixels)
    face_b, note_b = align_photo(photo_b, "photo B", aligner, max_pixels)
    notes = [note for note in (note_a, note_b) if note]
    return explain_faces(face_a, face_b, runtime_model, notes, methods, pair_title(photo_a, photo_b))


def pair_title(photo_a, photo_b):
    """'a.jpg  vs  b.jpg' when both are files (the picture's first line), else None."""
    if isinstance(photo_a, (str, os.PathLike)) and isinstance(photo_b, (str, os.PathLike)):
        return f"{os.path.basename(os.fspath(photo_a))}  vs  {os.path.basename(os.fspath(photo_b))}"
    return None


def _method_json(explanation):
    return {key: np.asarray(value, np.float64).round(6).tolist() if np.ndim(value) else value
            for key, value in explanation.items()}


def explanation_json(result):
    """The JSON-ready part of an `explain_photos` result: numbers and maps, no images.

    `score`, `decision`, `threshold` (the xCos verdict) and `notes`; with one method, its
    name as `method` and its explanation's keys beside them; with several, `methods`:
    {method: its explanation}. Maps are (H, W) nested lists.
    """
    verdict = {key: result[key] for key in ("score", "decision", "threshold")}
    verdict["notes"] = list(result["notes"])
    methods = {name: _method_json(explanation) for name, explanation in result["methods"].items()}
    if len(methods) == 1:
        (name, explanation), = methods.items()
        return {**verdict, "method": name, **explanation}
    return {**verdict, "methods": methods}


def define_flags():
    """The command-line flags, defined only when this module runs as the script: the web demo
    imports it and defines its own `--model`, and absl refuses a flag defined twice."""
    return types.SimpleNamespace(
        model=cli.define_model(),
        format=cli.define_format(),
        out=flags.DEFINE_string("out", "xcos_explanation.png", "Where to write the picture (PNG); empty: none."),
        json=flags.DEFINE_bool("json", False, "Print score, decision, threshold and the method's maps as JSON."),
        detector=cli.define_detector(),
        method=flags.DEFINE_enum("method", "xcos", [*METHODS, "all"],
                                 "How to explain the pair; all: one picture row per method the model can run."),
        choose=flags.DEFINE_enum("choose", "largest", list(align.CHOICES), "Which face when a photo has several."),
        max_megapixels=cli.define_max_megapixels(),
    )


def exit_with_error(message):
    """The command-line tools' answer to bad input: one line on stderr, exit code 2."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(EXIT_BAD_INPUT)


def main(argv, args):
    if len(argv) != 3:
        exit_with_error(f"expected two photos: python -m xcos_tf.explain PHOTO_A PHOTO_B --model DIR. "
                        f"Received: {argv[1:]}")
    max_pixels = cli.max_pixels(args.max_megapixels.value)
    # Photos first: a bad photo is reported before the (slow) model load, and aligned crops
    # need no face detector (a fresh clone has none).
    for photo in argv[1:]:
        try:
            image = align.read_image(photo, max_pixels)
        except ValueError as err:  # ImageError
            exit_with_error(str(err))
        if not align.is_aligned_crop(image) and not os.path.isfile(args.detector.value):
            exit_with_error(f"--detector: face detector model not found: {args.detector.value!r} "
                            f"(needed for {photo}, which is not an aligned 112x112 crop)")
    aligner = (align.FaceAligner(args.detector.value, choose=args.choose.value)
               if os.path.isfile(args.detector.value) else None)
    faces, notes = [], []
    for photo, label in zip(argv[1:], ("photo A", "photo B")):
        try:
            face, note = align_photo(photo, label, aligner, max_pixels)
        except ValueError as err:  # ImageError, FaceError
            exit_with_error(str(err))
        faces.append(face)
        notes += [note] if note else []
    try:
        runtime_model = runtime.load(args.model.value, format=args.format.value)
    except (OSError, ValueError) as err:
        exit_with_error(f"--model {args.model.value}: {err}")
    methods, method_notes = chosen_methods(args.method.value, runtime_model)
    try:
        result = explain_faces(faces[0], faces[1], runtime_model, notes + method_notes, methods,
                               title=pair_title(argv[1], argv[2]))
    except MethodUnavailableError as err:
        exit_with_error(f"--method {args.method.value} --model {args.model.value}: {err}")
    except runtime.ModelOutputError as err:  # never print a NaN score
        exit_with_error(f"--model {args.model.value}: {err}")
    for note in result["notes"]:
        print(f"note: {note}", file=sys.stderr)
    if result["threshold"] is None:
        print("note: the model's manifest has no calibrated threshold: printing the score only", file=sys.stderr)
    if args.out.value:
        try:
            save_explanation(args.out.value, faces[0], faces[1], result)
        except OSError as err:
            exit_with_error(f"--out: {err}")
    if args.json.value:
        print(json.dumps(explanation_json(result)))
        return
    line = f"score {result['score']:.4f}"
    if result["decision"] is not None:
        line += f"  {result['decision']}  (threshold {result['threshold']:.4f})"
    print(line)
    for method, explanation in result["methods"].items():
        if method != "xcos":
            print(f"{method}: explains the {explanation['explains']} {explanation['explained_score']:.4f}")
    if args.out.value:
        print(f"picture: {args.out.value}")


if __name__ == "__main__":
    _ARGS = define_flags()
    flags.mark_flag_as_required("model")
    cli.run(lambda argv: main(argv, _ARGS))
