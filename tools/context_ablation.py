r"""Context ablation of the positionwise grid head (issue 13), with no training at all.

The head is the teacher's own linear tail after its body's 7x7 map
(`backbones.read_linear_tail`: each cell a partial embedding), centred per cell on up to
`--centre_faces` training faces and their mirror images, as the trainer does before step 1.
For each `--contexts` value (the head's `context_init`: every cell also sees `context x`
the whole face's centred embedding) and each attention (uniform; the norm-product prior of
`XCosLayer(attention_prior=True)` with its learned part at its zero init), it measures on each
`--pairs` set:

- the 10-fold accuracy of the xCos score (the shards' folds, `xcos_tf.metrics`), beside the
  teacher's cosine accuracy from the teacher embeddings stored in the same pair records;
- spread: the mean over pairs of the std of the cos_map over its cells (a large context
  makes every cell the whole face, so the map says nothing: spread -> 0);
- dark band: a dark band (pixel rows 40..61 set to 20) pasted over both eyes of face B of
  same-person pairs (up to `--band_pairs`, evenly spread); the share of those pairs whose
  lowest-cos cell lies in the cell rows the band covers at least half (rows 2..3 of 7:
  chance 14/49).

The body maps of the pair faces are computed once per run (each distinct face once, float16
in memory) with the teacher's body imported by `backbones.from_onnx`. The centring takes the
training faces' maps from the trainer's feature caches (`--cache_backbone_features`) when
there are complete ones of exactly the --train_shards files and this body (`--feature_cache`,
or found in SHARDS_ROOT/feature_cache/), else runs the body on them: on a busy 2-core CPU the
body does about 20-35 faces per second, so the caches save minutes.

    python -m tools.context_ablation --teacher=../shared/models/teacher_mobilefacenet.onnx \
        --train_shards='shards/default/train/*.tfrecord' \
        --pairs='shards/default/holdout_pairs/*.tfrecord,shards/default/lfw_pairs/*.tfrecord' \
        --contexts=0,0.05,0.1,0.2,0.5,1 --centre_faces=5000
"""
import hashlib
import os
import platform
import sys
import time

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from tools import machine  # noqa: E402
from xcos_tf import cli  # noqa: E402

cli.quiet_startup(__name__)  # before TensorFlow is imported

import numpy as np  # noqa: E402
from absl import flags  # noqa: E402

BAND_ROWS = (40, 62)  # pixel rows 40..61 of the 112x112 face: both eyes (ArcFace template, eyes at y ~ 51.6)
BAND_LEVEL = 20  # dark, like evaluate's sunglasses
ATTENTIONS = {"uniform": dict(attention="uniform"), "prior": dict(attention="learned", attention_prior=True)}
BATCH_SIZE = 64


def define_flags():
    flags.DEFINE_string("teacher", None, "The face model (ONNX) whose body and linear tail make the head.")
    flags.DEFINE_list("train_shards", [], "Glob patterns of the training face shards (the centring faces).")
    flags.DEFINE_list("feature_cache", [], "Feature cache folders of those shards (--cache_backbone_features). "
                      "Empty: the complete caches in SHARDS_ROOT/feature_cache/ (beside the shards' folder) whose "
                      "sources are exactly the --train_shards files and whose maps are this body's, else the body "
                      "is run on the training faces.")
    flags.DEFINE_list("pairs", None, "Pair shard globs; each is one evaluation set (e.g. validation pairs, LFW pairs).")
    flags.DEFINE_list("contexts", ["0", "0.05", "0.1", "0.2", "0.5", "1"], "Context weights to compare.")
    flags.DEFINE_integer("centre_faces", 5000, "Centre each cell on at most this many training faces (and mirrors).",
                         lower_bound=1)
    flags.DEFINE_integer("band_pairs", 1000, "Dark band on at most this many same-person pairs of each set, evenly "
                         "spread (0: all).", lower_bound=0)
    flags.DEFINE_integer("max_pairs", None, "At most this many pairs of each set, evenly spread over the folds.",
                         lower_bound=20)
    flags.mark_flags_as_required(["teacher", "pairs"])


def versions():
    import keras
    import onnx
    import tensorflow as tf

    return f"python {platform.python_version()}, tensorflow {tf.__version__}, keras {keras.__version__}, " \
           f"numpy {np.__version__}, onnx {onnx.__version__}"


def _log(message):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def distinct_faces(faces):
    """(the distinct faces, index of each face among them): pair shards repeat faces across pairs."""
    digests = [hashlib.sha1(np.ascontiguousarray(face).tobytes()).digest() for face in faces]
    first = {}
    inverse = np.array([first.setdefault(digest, len(first)) for digest in digests])
    keep = np.zeros(len(first), int)
    keep[inverse] = np.arange(len(faces))
    return faces[keep], inverse


def compiled_body(body):
    """`(images, training=False) -> maps`: the body as one traced graph (twice the faces per
    second of eager calls on this 2-core CPU), for any batch size."""
    import tensorflow as tf

    @tf.function(input_signature=[tf.TensorSpec((None, *body.input_shape[1:]), tf.float32)])
    def run(images):
        return body(images, training=False)

    return lambda images, training=False: run(images)


def body_maps(body, faces, batch_size=BATCH_SIZE):
    """float16 [N, H, W, C] body maps of uint8 faces, in batches (`body` from `compiled_body`)."""
    return np.concatenate([np.asarray(body(np.asarray(faces[start:start + batch_size], np.float32)), np.float16)
                           for start in range(0, len(faces), batch_size)])


def load_pair_maps(body, pattern, max_pairs, band_pairs):
    """One evaluation set: its pairs (`evaluate.PairSet`), the body map of each face (index
    `face_of[j]` for face j), the same-person pairs under the band (up to `band_pairs`, evenly
    spread; 0: all) and the maps of their face B under it."""
    from xcos_tf import evaluate

    pairs = evaluate.load_pair_shards(pattern, max_pairs)
    faces, face_of = distinct_faces(pairs.faces)
    same = np.flatnonzero(pairs.is_same)
    banded_pairs = same[evaluate.spread_subset(len(same), band_pairs or None)]
    banded = pairs.faces[pairs.index_b[banded_pairs]].copy()
    banded[:, BAND_ROWS[0]:BAND_ROWS[1]] = BAND_LEVEL
    _log(f"{pattern}: {len(pairs)} pairs, {len(faces)} distinct faces + {len(banded)} banded faces B: body maps")
    return pairs, body_maps(body, faces), face_of, banded_pairs, body_maps(body, banded)


def find_feature_caches(train_files, body):
    """The trainer's complete feature caches in SHARDS_ROOT/feature_cache/ (beside the folders of
    `train_files`) that together hold exactly those files' maps under `body`; None if there are none."""
    from xcos_tf.data import features

    wanted = {os.path.realpath(path) for path in train_files}
    roots = sorted({os.path.join(os.path.dirname(os.path.dirname(path)), "feature_cache") for path in wanted})
    caches, covered = [], set()
    for cache in sorted(os.path.join(root, name) for root in roots if os.path.isdir(root) for name in os.listdir(root)):
        try:
            sources = set(features.check_cache(cache, body, kind="faces")["source_files"])
        except (OSError, ValueError, KeyError):
            continue  # not a cache, incomplete, or of other weights
        if sources <= wanted and not sources & covered:
            caches.append(cache)
            covered |= sources
    return caches if caches and covered == wanted else None


def band_coverage(cells, size):
    """The share of each cell that the dark band covers, [rows, cols] (`occlusion.cell_coverage`)."""
    from xcos_tf.occlusion import cell_coverage

    mask = np.zeros((size, size), bool)
    mask[BAND_ROWS[0]:BAND_ROWS[1]] = True
    return cell_coverage(mask, cells)


class LayerComparer:
    """An `XCosLayer` with the scorers' `compare` interface (`scoring.compare_grids` batches it)."""

    def __init__(self, xcos):
        self.xcos = xcos

    def compare(self, grid_a, grid_b):
        return self.xcos(grid_a, grid_b, training=False)


def make_heads(tail, centre_batches, contexts):
    """{context: PositionwiseGridHead}: the tail's cells, centred once on `centre_batches`
    (the centre does not depend on the context), with each context weight."""
    from xcos_tf import layers

    _, in_channels, width = tail.cell_weights.shape
    map_shape = (None, *tail.grid_shape, in_channels)
    heads = {}
    for context in contexts:
        head = layers.PositionwiseGridHead(width, context_init=context)
        head.build(map_shape)
        head.set_kernel(tail.cell_weights, tail.bias)
        heads[context] = head
    first = heads[contexts[0]]
    first.adapt(centre_batches)
    for head in heads.values():
        head.centre.assign(first.centre)
    return heads


def make_comparers(grid_shape):
    from xcos_tf import layers

    comparers = {}
    for name, kwargs in ATTENTIONS.items():
        xcos = layers.XCosLayer(**kwargs)
        xcos.build((None, *grid_shape))  # with the prior, the learned logits start (and stay) at zero
        comparers[name] = LayerComparer(xcos)
    return comparers


def grids_of(head, maps, batch_size=256):
    return np.concatenate([np.asarray(head(np.asarray(maps[start:start + batch_size], np.float32)))
                           for start in range(0, len(maps), batch_size)])


def ablate(heads, comparers, pair_set):
    """Rows {context, accuracy: {attention: ...}, teacher, spread, band, band_chance} of one set."""
    from xcos_tf import metrics, scoring
    from xcos_tf.faithfulness import localisation

    pairs, maps, face_of, banded_pairs, banded_maps = pair_set
    folds = pairs.folds if len(np.unique(pairs.folds)) >= 2 else 10
    index_a, index_b = face_of[pairs.index_a], face_of[pairs.index_b]
    teacher = None
    if pairs.teacher_cos is not None:
        teacher = metrics.k_fold_accuracy(pairs.teacher_cos, pairs.is_same, folds).mean
    rows = []
    for context, head in heads.items():
        grids = grids_of(head, maps)
        row = {"context": context, "teacher": teacher, "accuracy": {}}
        for name, comparer in comparers.items():
            outputs = scoring.compare_grids(comparer, grids[index_a], grids[index_b])
            row["accuracy"][name] = metrics.k_fold_accuracy(outputs["score"], pairs.is_same, folds).mean
        cos_maps = outputs["cos_map"]  # the same for every attention
        row["spread"] = float(cos_maps.reshape(len(cos_maps), -1).std(axis=1).mean())
        banded = scoring.compare_grids(comparer, grids[index_a[banded_pairs]], grids_of(head, banded_maps))["cos_map"]
        coverage = np.broadcast_to(band_coverage(banded.shape[1:], pairs.faces.shape[1]), banded.shape)
        band = localisation(banded, coverage)
        row["band"], row["band_chance"] = band["localisation"], band["localisation_chance"]
        row["band_pairs"] = len(banded_pairs)
        rows.append(row)
    return rows


def set_name(pattern):
    """The table's name of a pair set: its folder (`shards/default/lfw_pairs/*.tfrecord` -> lfw_pairs)."""
    return os.path.basename(os.path.normpath(pattern if os.path.isdir(pattern) else os.path.dirname(pattern) or pattern))


def format_table(results):
    """results: [(set name, number of pairs, rows)] -> the printed table."""
    header = (f"{'pairs':20} {'n':>6} {'context':>8} " + " ".join(f"{name:>9}" for name in ATTENTIONS)
              + f" {'teacher':>9} {'spread':>8} {'dark band':>10}")
    lines = [header, "-" * len(header)]
    for name, count, rows in results:
        for row in rows:
            teacher = "-" if row["teacher"] is None else f"{100 * row['teacher']:8.2f}%"
            lines.append(
                f"{name[:20]:20} {count:6d} {row['context']:8g} "
                + " ".join(f"{100 * row['accuracy'][a]:8.2f}%" for a in ATTENTIONS)
                + f" {teacher:>9} {row['spread']:8.4f} {100 * row['band']:9.2f}%"
            )
    chance = results[0][2][0]["band_chance"] if results and results[0][2] else float("nan")
    band_pairs = ", ".join(f"{name} {rows[0]['band_pairs']}" for name, _, rows in results if rows)
    lines.append(f"accuracy: 10-fold (the shards' folds); attention uniform / prior = norm-product prior, learned part "
                 f"at zero init; spread: mean per-pair std of the cos_map over cells; dark band: rows "
                 f"{BAND_ROWS[0]}..{BAND_ROWS[1] - 1} = {BAND_LEVEL} on face B of same-person pairs ({band_pairs}), share "
                 f"whose lowest-cos cell is under it (chance {100 * chance:.2f}%)")
    return "\n".join(lines)


def main(argv):
    if len(argv) > 1:
        raise cli.UserError(f"unexpected arguments: {' '.join(argv[1:])}")
    FLAGS = flags.FLAGS
    try:
        contexts = [float(value) for value in FLAGS.contexts]
    except ValueError:
        raise cli.UserError(f"--contexts must be numbers. Received: {','.join(FLAGS.contexts)}") from None
    if not contexts or not all(np.isfinite(contexts)):
        raise cli.UserError(f"--contexts must be finite numbers. Received: {','.join(FLAGS.contexts)}")
    if not FLAGS.train_shards and not FLAGS.feature_cache:
        raise cli.UserError("--train_shards (or --feature_cache) is required: the centring faces")
    start = time.time()
    from xcos_tf import backbones
    from xcos_tf.data import features, pipeline
    from xcos_tf.training import config as train_config, inputs

    try:
        body = backbones.from_onnx(FLAGS.teacher)
        tail = backbones.read_linear_tail(FLAGS.teacher, input_shape=tuple(body.input_shape[1:]))
    except (OSError, ValueError) as error:
        raise cli.UserError(f"--teacher {FLAGS.teacher}: {error}") from None
    centring = train_config.TrainConfig(model_dir="", train_shards=tuple(FLAGS.train_shards),
                                        centre_faces=FLAGS.centre_faces, image_size=int(body.input_shape[1]))
    try:
        for cache in FLAGS.feature_cache:
            features.check_cache(cache, body, kind="faces")
        caches = FLAGS.feature_cache or find_feature_caches(pipeline.list_shards(FLAGS.train_shards), body)
        run_body = compiled_body(body)
        pair_sets = [(pattern, load_pair_maps(run_body, pattern, FLAGS.max_pairs, FLAGS.band_pairs))
                     for pattern in FLAGS.pairs]
        _log(f"centring on up to {FLAGS.centre_faces} training faces and their mirror images "
             f"({'cached maps of ' + ', '.join(caches) if caches else 'body maps'})")
        heads = make_heads(tail, inputs.centring_maps(centring, run_body, caches), contexts)
    except (OSError, ValueError) as error:
        raise cli.UserError(str(error).splitlines()[0]) from None
    comparers = make_comparers(tuple(heads[contexts[0]].compute_output_shape((None, *tail.grid_shape, 1))[1:]))
    results = []
    for pattern, pair_set in pair_sets:
        _log(f"scoring {pattern}")
        results.append((set_name(pattern), len(pair_set[0]), ablate(heads, comparers, pair_set)))
    print(f"machine: {machine.describe()}")
    print(f"versions: {versions()}")
    print(f"pairs: {', '.join(FLAGS.pairs)}")
    print(f"teacher: {FLAGS.teacher}; centred on up to {FLAGS.centre_faces} faces of {','.join(FLAGS.train_shards)}"
          + (f" (maps from {','.join(caches)})" if caches else ""))
    print(format_table(results))
    print(f"took {time.time() - start:.0f} s")


if __name__ == "__main__":
    define_flags()
    cli.run(main)
