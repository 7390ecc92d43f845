"""Export an xCos model to a self-describing deployment folder.

`python -m xcos_tf.export --weights RUN_DIR_OR_KERAS --out DIR [--formats ...]`

DIR holds, for `--name xcos` and every format:

    saved_model/xcos/1/        SavedModel in the TF Serving layout (signatures verify = serving_default,
                               verify_uint8, embed, compare)
    models.config              TF Serving model config (DIR mounted at /models/xcos)
    tf_serving_request.json    a REST :predict request for `verify` on two sample faces
    xcos.tflite                TFLite float32 (signatures verify, embed, compare)
    xcos_fp16.tflite           TFLite with float16 weights
    xcos_int8.tflite           TFLite int8 backbone and grid head, float32 inputs and outputs
    xcos_verify.onnx, xcos_embed.onnx, xcos_compare.onnx   ONNX, one graph per signature
    xcos_decompose.onnx        ONNX decompose (exports with a teacher; also a SavedModel signature)
    xcos_onnx_weights.bin      the ONNX graphs' weights, each tensor once (external data)
    manifest.json              versions, input spec, threshold, files and their sha256
    MODEL_CARD.md              when a model card is given

Every signature returns the score and both maps (or the embedding and grid), with a
dynamic batch. `xcos_tf.runtime.load(DIR, format=...)` runs any of them.

The folder is written into a temporary sibling and renamed into place only when complete:
a failed or killed export never leaves a half folder where a good one stood.

Modules: `deployment` (export_model), `saved_model` (+ TF Serving files), `tflite`, `onnx`,
`manifest` (constants, normalisation read from the model, schema reader), `staging`;
`python -m xcos_tf.export` is `__main__`.
"""
from xcos_tf.export.deployment import CALIBRATION_SIZE, export_model, load_faces, resolve_verifier
from xcos_tf.export.manifest import FORMATS, SIGNATURES, build_manifest, pixel_normalisation, read_manifest
from xcos_tf.export.staging import staged_folder

__all__ = [
    "CALIBRATION_SIZE", "FORMATS", "SIGNATURES", "build_manifest", "export_model", "load_faces",
    "pixel_normalisation", "read_manifest", "resolve_verifier", "staged_folder",
]
