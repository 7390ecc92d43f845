"""The web demo's search tab: drop a photo, see the best gallery people, each hit with its maps.

`python -m xcos_tf.demo --model DIR --gallery INDEX` adds it; `xcos_tf.demo` calls `search_tab`
inside its page and hands over its own upload reader (type, size and pixel checks), so this
module does not import the demo.
"""
import os

from xcos_tf.gallery import picture

TOP = 5


def search_upload(upload, gallery, read_photo, top=TOP):
    """One uploaded probe -> (Markdown list of hits, picture RGB uint8).

    Args:
        upload: Gradio's file payload (dict with `path` and `orig_name`) or None.
        gallery: `xcos_tf.gallery.Gallery`.
        read_photo: callable(path, name) -> RGB uint8 image; raises `ValueError` with a message for the page.
        top: people to show.

    Raises `ValueError` with a message for the page (no photo, unreadable, no face).
    """
    if not upload:
        raise ValueError("no photo: drop or upload a photo to search the gallery with")
    name = f"probe ({upload.get('orig_name') or os.path.basename(upload['path'])})"
    photo = read_photo(upload["path"], name)
    embedded = gallery.model.embed(photo)
    hits = gallery.search_grid(embedded["grid"], top=top)
    if not hits:
        raise ValueError("the gallery is empty")
    threshold = gallery.model.threshold
    lines = [f"### Best {len(hits)} of {len(gallery)} enrolled faces"]
    for rank, hit in enumerate(hits, 1):
        verdict = "" if threshold is None else (" (same)" if hit["score"] >= threshold else " (different)")
        lines.append(f"{rank}. **{hit['identity']}**: {hit['score']:.3f}{verdict}, {os.path.basename(hit['photo'])}")
    lines += [f"- {note}" for note in embedded["notes"]]
    drawn = picture.with_faces(gallery.model, [(name, embedded["face"], hits)])
    return "\n".join(lines), picture.render_search(drawn, threshold)


def search_tab(gallery, read_photo, error):
    """Adds the tab to the Gradio page being built. `error(message)` -> the exception Gradio shows."""
    import gradio as gr

    def on_search(upload):
        try:
            return search_upload(upload, gallery, read_photo)
        except ValueError as err:
            raise error(str(err)) from None

    with gr.Tab("Search the gallery"):
        gr.Markdown(f"Drop a photo: the {TOP} most alike of {len(gallery)} enrolled faces (one per person), "
                    "each with its cos map and attention map.")
        probe = gr.Image(label="Probe photo", type="filepath", sources=["upload", "clipboard"], height=300,
                         elem_id="probe")
        button = gr.Button("Search", variant="primary", elem_id="search")
        hits = gr.Markdown(elem_id="hits")
        drawn = gr.Image(label="Hits and why", format="png", interactive=False, elem_id="hits_picture")
        button.click(on_search, inputs=[probe], outputs=[hits, drawn], preprocess=False)
        probe.change(lambda: ("", None), outputs=[hits, drawn])
