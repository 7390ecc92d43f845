"""Web demo: drop two photos, see the xCos score, the decision and the picture of why.

`python -m xcos_tf.demo --model DIR [--port 7860] [--host 127.0.0.1] [--format saved_model]
[--max_upload_mb 10] [--max_megapixels 50]`

A Gradio page (install with `pip install "xcos_tf[demo]"`). Each photo is detected and aligned
with YuNet (the largest face; aligned 112x112 crops are used as they are), verified by the
exported model, and explained with `xcos_tf.explain_picture.render_explanation`.

What the page accepts and where things go:
- Uploads: JPEG, PNG, WebP or BMP, at most `--max_upload_mb` (10 MB) and `--max_megapixels` (50:
  a small file can hold a huge image; its header is read first, nothing is decoded). A wrong
  type, a corrupt or truncated file, a photo without a face, or a too large file gives a message
  on the page. Faces are searched for on a copy of at most 640 px on the longer side (YuNet
  misses faces that fill a large photo) and aligned from the full-resolution photo.
- Files: Gradio's upload cache and the rendered pictures live in one `tempfile.mkdtemp` folder,
  deleted when the server stops (Ctrl-C or SIGTERM). The demo writes nothing else (the
  libraries keep their usual per-user caches, e.g. Matplotlib's font list).
- Network: served on loopback by default; no share link, no analytics, no server-side rendering.
"""
import importlib.util
import os
import shutil
import signal
import tempfile
import types

import cv2
from absl import flags

from xcos_tf import cli, explain, explain_picture, runtime  # runtime imports a format's engine only in load()
from xcos_tf.data import align, image_io

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_UPLOAD_MB = 10
MB = 2**20  # Gradio's "mb" in `max_file_size`: its own size message then says the same number
TITLE = "xCos: explainable face verification"

class UploadError(ValueError):
    """An uploaded photo that the demo refuses: wrong type, too large, unreadable, or no face."""


def read_upload(path, name, max_bytes, max_pixels=image_io.MAX_PIXELS):
    """Reads one uploaded photo as RGB uint8 [H, W, 3]; `UploadError` names `name` and the problem.

    Args:
        path: str, where the upload was stored.
        name: str, how the page calls it, e.g. "photo A (holiday.jpg)".
        max_bytes: int, the file size limit.
        max_pixels: int, the image size limit (width x height, from the header).
    """
    suffix = os.path.splitext(path)[1].lower()
    if suffix not in IMAGE_SUFFIXES:
        raise UploadError(
            f"{name}: file type {suffix or '(none)'} is not accepted; use one of {', '.join(IMAGE_SUFFIXES)}"
        )
    size = os.path.getsize(path)
    if size > max_bytes:
        raise UploadError(f"{name}: {size / MB:.1f} MB is larger than the {max_bytes / MB:g} MB limit")
    with open(path, "rb") as f:
        data = f.read()
    try:  # the header is checked by content (type, pixel count) before anything is decoded
        return image_io.decode_image(data, name=name, max_pixels=max_pixels)
    except image_io.ImageError as err:
        raise UploadError(str(err)) from None


def summary_markdown(result):
    """The verdict line and any notes (several faces found, crop used as is) as Markdown."""
    score, threshold = result["score"], result["threshold"]
    if result["decision"] is None:
        headline = (f"### Score {score:.3f}\n"
                    "The model has no calibrated threshold, so no same/different decision.")
    else:
        verdict = "Same person" if result["decision"] == "same" else "Different people"
        headline = f"### {verdict}: score {score:.3f} (threshold {threshold:.3f})"
    return "\n".join([headline] + [f"- {note}" for note in result["notes"]])


def compare_uploads(upload_a, upload_b, runtime_model, aligner, max_bytes, method="xcos",
                    max_pixels=image_io.MAX_PIXELS):
    """Explains one pair of uploads -> (summary Markdown, picture RGB uint8).

    `upload_a`, `upload_b` are Gradio file payloads (dicts with `path` and `orig_name`) or None;
    `method` is one of `method_choices(runtime_model)`; `max_bytes` and `max_pixels` are
    `read_upload`'s limits. Raises `UploadError` with a message for the page.
    """
    names, faces, notes = [], [], []
    for label, upload in (("photo A", upload_a), ("photo B", upload_b)):
        if not upload:
            raise UploadError(f"{label} is missing: drop or upload a photo in both boxes")
        # The cached path keeps the uploaded file's name; the page names files as the user does.
        name = f"{label} ({upload.get('orig_name') or os.path.basename(upload['path'])})"
        try:
            photo = read_upload(upload["path"], name, max_bytes, max_pixels)
            face, note = explain.align_photo(photo, name, aligner)
        except align.FaceError as err:
            raise UploadError(f"{err}: use a photo where a face is clearly visible") from None
        names.append(name)
        faces.append(face)
        notes += [note] if note else []
    methods, method_notes = explain.chosen_methods(method, runtime_model)
    result = explain.explain_faces(faces[0], faces[1], runtime_model, notes + method_notes, methods)
    picture = explain_picture.render_explanation(faces[0], faces[1], result, title="  vs  ".join(names))
    return summary_markdown(result), picture


def method_choices(runtime_model):
    """The explanation methods the page offers: those the model can run, and "all"."""
    return [method for method in explain.METHODS if explain.method_available(runtime_model, method)] + ["all"]


def build_demo(runtime_model, aligner, max_bytes=MAX_UPLOAD_MB * MB, model_label="", gallery=None,
               max_pixels=image_io.MAX_PIXELS):
    """The Gradio page (a `gr.Blocks`, not launched). Import gradio only after GRADIO_TEMP_DIR is set.

    `gallery`: an `xcos_tf.gallery.Gallery`, searched in a tab of its own (`--gallery INDEX`);
    `max_bytes` and `max_pixels`: the uploads' limits (`read_upload`)."""
    import gradio as gr

    def on_compare(upload_a, upload_b, method):
        try:
            return compare_uploads(upload_a, upload_b, runtime_model, aligner, max_bytes, method, max_pixels)
        except (UploadError, runtime.ModelOutputError) as err:
            # A user's mistake (or a broken model, named as such), not a crash: no traceback in
            # the log. 20 s on screen, so that the message of an earlier try does not linger.
            raise gr.Error(str(err), duration=20, print_exception=False) from None

    with gr.Blocks(title=TITLE, analytics_enabled=False) as demo:
        gr.Markdown(
            f"# {TITLE}\nDrop or upload two photos. The score says how alike the two faces are; "
            "the picture shows which parts match (cos map) and which parts counted (attention)."
        )
        with gr.Row():
            photo_inputs = [
                gr.Image(label=f"Photo {side}", type="filepath", sources=["upload", "clipboard"],
                         height=300, elem_id=f"photo_{side.lower()}")
                for side in "AB"
            ]
        method = gr.Radio(method_choices(runtime_model), value="xcos", label="Explanation method",
                          info="xcos: the model's cos x attention; decomposition: the exact split of the teacher's "
                               "cosine; gradcam: Grad-CAM baseline; all: one row each", elem_id="method")
        compare = gr.Button("Compare", variant="primary", elem_id="compare")
        summary = gr.Markdown(elem_id="summary")
        picture = gr.Image(label="Why: the explanation", format="png", interactive=False,
                           buttons=["download", "fullscreen"], elem_id="explanation")
        gr.Markdown(
            f"Accepted: {', '.join(s[1:].upper() for s in IMAGE_SUFFIXES)} up to {max_bytes / MB:g} MB "
            f"and {max_pixels / 1e6:g} megapixels. Uploads stay in a temporary folder deleted when the "
            f"server stops. {model_label}"
        )
        # preprocess=False: our own reader gives the page a clear message for a corrupt file,
        # where Gradio's PIL preprocessing would fail with a generic error. Gradio still checks
        # that the paths are its own uploads. concurrency_limit=1 (the default) matters: the
        # OpenCV detector is not thread-safe.
        compare.click(on_compare, inputs=[*photo_inputs, method], outputs=[summary, picture], preprocess=False)
        for photo in photo_inputs:  # a stale result must not look like the answer for new photos
            photo.change(lambda: ("", None), outputs=[summary, picture])
        if gallery is not None:
            from xcos_tf.gallery import demo_tab

            demo_tab.search_tab(gallery, lambda path, name: read_upload(path, name, max_bytes, max_pixels),
                                lambda message: gr.Error(message, duration=20, print_exception=False))
    return demo


def _model_label(runtime_model, model_dir, model_format):
    threshold = runtime_model.threshold
    calibrated = "no calibrated threshold" if threshold is None else f"threshold {threshold:.3f}"
    return f"Model: `{model_dir}` ({model_format}, {calibrated})."


def define_flags():
    """The command-line flags, defined only when this module runs as the script (as in explain,
    export and evaluate): importing the module registers nothing."""
    return types.SimpleNamespace(
        model=cli.define_model(),
        format=cli.define_format("Which of the exported formats serves the page."),
        detector=cli.define_detector(),
        host=flags.DEFINE_string(
            "host", "127.0.0.1", "Address to listen on (0.0.0.0 exposes the page to the network)."
        ),
        port=flags.DEFINE_integer("port", 7860, "Port to listen on.", lower_bound=1, upper_bound=65535),
        gallery=flags.DEFINE_string("gallery", None, "A gallery index (`python -m xcos_tf.gallery enroll`): "
                                    "adds a tab that searches it."),
        max_upload_mb=flags.DEFINE_integer(
            "max_upload_mb", MAX_UPLOAD_MB, "Largest accepted photo, in MB.", lower_bound=1
        ),
        max_megapixels=cli.define_max_megapixels(),
    )


def _fail(flags_given, problem):
    raise cli.UserError(f"{flags_given}: {problem}")


def main(argv, args):
    del argv
    max_pixels = cli.max_pixels(args.max_megapixels.value)
    upload_dir = tempfile.mkdtemp(prefix="xcos_demo_")
    # Set before gradio is imported: some of its modules read these at import time.
    os.environ["GRADIO_TEMP_DIR"] = upload_dir
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    # SIGTERM (kill, a test's finaliser, systemd) stops the server like Ctrl-C, so the folder goes.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        if importlib.util.find_spec("gradio") is None:  # imported later, by build_demo
            raise cli.UserError('xcos_tf.demo needs Gradio: pip install "xcos_tf[demo]"')
        try:
            aligner = align.FaceAligner(args.detector.value, choose="largest")  # cheap: checked first
        except (OSError, ValueError, cv2.error) as err:  # cv2.error: not an ONNX file OpenCV can parse
            _fail("--detector", str(err).strip())
        try:
            runtime_model = runtime.load(args.model.value, format=args.format.value)
        except (OSError, ValueError) as err:
            _fail(f"--model {args.model.value} --format {args.format.value}", err)
        gallery = None
        if args.gallery.value:
            from xcos_tf import api, gallery as gallery_lib

            try:
                gallery = gallery_lib.Gallery.open(args.gallery.value,
                                                   model=api.FaceModel(runtime_model, args.detector.value,
                                                                       args.max_megapixels.value))
            except (OSError, ValueError) as err:
                _fail(f"--gallery {args.gallery.value}", err)
        demo = build_demo(
            runtime_model, aligner, max_bytes=args.max_upload_mb.value * MB,
            model_label=_model_label(runtime_model, args.model.value, args.format.value), gallery=gallery,
            max_pixels=max_pixels,
        )
        try:
            demo.launch(
                server_name=args.host.value, server_port=args.port.value, share=False,
                max_file_size=args.max_upload_mb.value * MB, ssr_mode=False, mcp_server=False,
                show_error=False, inbrowser=False,
            )
        except OSError as err:  # port taken, address not local
            _fail(f"--host {args.host.value} --port {args.port.value}", f"cannot serve: {err}")
    except KeyboardInterrupt:
        pass
    finally:
        shutil.rmtree(upload_dir, ignore_errors=True)


if __name__ == "__main__":
    _ARGS = define_flags()
    flags.mark_flag_as_required("model")
    cli.run(lambda argv: main(argv, _ARGS))
