"""`python -m xcos_tf.gallery enroll|search`: build a gallery index, search it.

    python -m xcos_tf.gallery enroll --model exported/default --images FOLDER --out INDEX
    python -m xcos_tf.gallery search PHOTO_OR_FOLDER --gallery INDEX --top 5 [--json] [--out hits.png]

Both take `--max_megapixels` (50): a larger photo is refused from its header, before decoding.

`enroll` reads an ImageFolder of people (`FOLDER/person/photo.jpg`); photos without a face, or
over the pixel limit, are listed as rejects (in INDEX/rejects.json), never fatal; running it
again adds only new photos.
`search` prints, per probe, the best `--top` people (their best photo, the xCos score); `--json`
prints one object `{probe: [{"identity", "photo", "score", "cos_map", "attention_map"}, ...]}`.
A probe folder is searched photo by photo; a probe without a face is a note there (an error for
a single photo). Bad input: one line on stderr, exit code 2.
"""
import json
import os
import sys
import types

from absl import flags

from xcos_tf import cli, explain
from xcos_tf.gallery import enroll as enroll_lib, index as index_lib, search as search_lib

COMMANDS = ("enroll", "search")
# The flags defined below belong to the program (`python -m xcos_tf.gallery`, its __main__):
# absl lists them in its --helpshort.
flags.disclaim_key_flags()


def define_flags():
    return types.SimpleNamespace(
        model=cli.define_model("enroll: exported model folder. search: default: the gallery's."),
        format=cli.define_format(),
        images=flags.DEFINE_string("images", None, "enroll: ImageFolder of people, FOLDER/person/photo.jpg."),
        out=flags.DEFINE_string("out", None, "enroll: the index folder to write. search: a PNG of the hits."),
        gallery=flags.DEFINE_string("gallery", None, "search: the index folder made by enroll."),
        top=flags.DEFINE_integer("top", 5, "search: people per probe.", lower_bound=1),
        json=flags.DEFINE_bool("json", False, "search: print the hits as one JSON object."),
        shortlist=flags.DEFINE_integer("shortlist", search_lib.SHORTLIST,
                                       "search: faces FAISS hands to the xCos re-ranking.", lower_bound=1),
        detector=cli.define_detector(),
        progress=flags.DEFINE_bool("progress", True, "enroll: show progress on stderr."),
        max_megapixels=cli.define_max_megapixels(),
    )


def _load_model(model_dir, args):
    from xcos_tf import api

    try:
        return api.load(model_dir, format=args.format.value, detector=args.detector.value,
                        max_megapixels=args.max_megapixels.value)
    except (OSError, ValueError) as err:
        explain.exit_with_error(f"--model {model_dir}: {err}")


def run_enroll(argv, args):
    if len(argv) != 2:
        explain.exit_with_error(f"enroll takes no positional arguments. Received: {argv[2:]}")
    for name in ("model", "images", "out"):
        if not getattr(args, name).value:
            explain.exit_with_error(f"enroll needs --{name}")
    try:
        enroll_lib.scan_people(args.images.value)  # a wrong folder is reported before the model load
    except OSError as err:
        explain.exit_with_error(f"--images: {err}")
    model = _load_model(args.model.value, args)
    try:
        summary = enroll_lib.enroll(model, args.model.value, args.images.value, args.out.value,
                                    progress=args.progress.value)
    except (OSError, ValueError) as err:
        explain.exit_with_error(str(err))
    for reject in summary["rejects"]:
        print(f"reject: {reject['reason']}", file=sys.stderr)
    print(f"enrolled {summary['added']} new faces into {args.out.value} ({summary['entries']} in all); "
          f"{summary['rejected']} rejects (listed in {os.path.join(args.out.value, index_lib.REJECTS)}); "
          f"{summary['skipped']} photos were already in the index")


def _search_probes(gallery, probes, top, single):
    """{probe: hits} and [(probe, aligned face, hits)] for the picture; notes for faceless probes."""
    found, drawn = {}, []
    for probe in probes:
        try:
            embedded = gallery.model.embed(probe)
        except ValueError as err:  # ImageError, FaceError: they name the photo
            if single:
                explain.exit_with_error(str(err))
            print(f"note: skipped: {err}", file=sys.stderr)
            continue
        hits = gallery.search_grid(embedded["grid"], top=top)
        found[probe] = hits
        drawn.append((os.path.basename(probe), embedded["face"], hits))
    return found, drawn


def run_search(argv, args):
    from xcos_tf.gallery import picture

    if len(argv) != 3:
        explain.exit_with_error(f"search takes one PHOTO_OR_FOLDER. Received: {argv[2:]}")
    if not args.gallery.value:
        explain.exit_with_error("search needs --gallery INDEX")
    if not os.path.exists(argv[2]):
        explain.exit_with_error(f"{argv[2]}: no such photo or folder")
    probes = search_lib.probe_paths(argv[2], enroll_lib.IMAGE_SUFFIXES)
    if not probes:
        explain.exit_with_error(f"{argv[2]}: no photos in this folder")
    try:
        data = index_lib.open_index(args.gallery.value)
    except ValueError as err:
        explain.exit_with_error(f"--gallery: {err}")
    model = _load_model(args.model.value or data.model_dir, args)
    try:
        gallery = search_lib.Gallery.open(args.gallery.value, model=model, shortlist=args.shortlist.value)
    except ValueError as err:
        explain.exit_with_error(f"--gallery: {err}")
    found, drawn = _search_probes(gallery, probes, args.top.value, single=not os.path.isdir(argv[2]))
    if args.out.value:
        try:
            picture.save_search_picture(args.out.value, picture.with_faces(model, drawn), threshold=model.threshold)
        except (OSError, ValueError) as err:
            explain.exit_with_error(f"--out: {err}")
    if args.json.value:
        print(json.dumps({probe: search_lib.hits_json(hits) for probe, hits in found.items()}))
    else:
        for probe, hits in found.items():
            print(probe)
            for rank, hit in enumerate(hits, 1):
                print(f"  {rank}. {hit['identity']}  {hit['score']:.4f}  {hit['photo']}")
    if args.out.value:
        print(f"picture: {args.out.value}", file=sys.stderr if args.json.value else sys.stdout)


def main(argv, args):
    if len(argv) < 2 or argv[1] not in COMMANDS:
        explain.exit_with_error(f"expected a command, one of {', '.join(COMMANDS)}: "
                                "python -m xcos_tf.gallery enroll|search ... Received: "
                                f"{argv[1] if len(argv) > 1 else 'none'}")
    cli.max_pixels(args.max_megapixels.value)  # checked before anything is read
    (run_enroll if argv[1] == "enroll" else run_search)(argv, args)


def run():
    args = define_flags()
    cli.run(lambda argv: main(argv, args))
