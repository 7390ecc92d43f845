"""1:N gallery search with an explanation per hit (`python -m xcos_tf.gallery enroll|search`).

`index` stores the enrolled faces, `enroll` adds an ImageFolder of people, `search` ranks them
(FAISS shortlist, xCos re-ranking: `Gallery`), `picture` draws the hits, `cli` is the command line.
"""
from xcos_tf.gallery.search import Gallery  # noqa: F401 (the package's API: xcos_tf.gallery.Gallery)
