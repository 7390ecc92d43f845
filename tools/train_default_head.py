"""Trains the default model's xCos head on cached features of the frozen teacher body.

The interim training path of `exported/default` (see its MODEL_CARD.md), until `xcos_tf.train`
takes `--cache_backbone_features`: the teacher's body is imported from ONNX and frozen, its
7x7x512 maps of every training face and of its mirror image are read from feature caches
(`xcos_tf.data.features.write_feature_shards`), and only the grid head and the attention are
trained (MSE of the xCos score to the teacher cosine; --ce > 0 adds the CosFace loss), on
batches from `features.feature_pair_dataset`. Every --eval_every steps it reports 10-fold
accuracy on the held-out validation pairs' cached maps and keeps the best as best.keras.

    python -m tools.train_default_head --name=e2_adamw3e-3_cosine --steps=1500 --eval_every=500 \
        --utk=false --opt=adamw --lr=3e-3 --att_lr=3e-3 --schedule=cosine

Folders under --data_dir (default /work/cache/default_data): features_train, features_utkface,
features_holdout_pairs, optionally features_lfw_pairs (reported only, never used to choose);
the run goes to DATA_DIR/runs/NAME (best.keras, result.json).
"""
import json, os, sys, time
import numpy as np, tensorflow as tf, keras
from absl import app, flags
from xcos_tf import backbones, metrics, model as xcos_model
from xcos_tf.data import features
F = flags.FLAGS
flags.DEFINE_string("data_dir", "/work/cache/default_data", "Folder of the feature caches and runs.")
flags.DEFINE_string("name", None, "")
flags.DEFINE_integer("steps", 4000, "")
flags.DEFINE_integer("batch", 256, "")
flags.DEFINE_float("lr", 0.1, "")
flags.DEFINE_string("opt", "sgd", "")
flags.DEFINE_float("att_lr", 1e-3, "")
flags.DEFINE_string("schedule", "constant", "")
flags.DEFINE_float("wd", 0.0, "")
flags.DEFINE_integer("grid", 32, "")
flags.DEFINE_float("ce", 0.0, "")
flags.DEFINE_float("same", 0.5, "")
flags.DEFINE_bool("utk", True, "")
flags.DEFINE_bool("flip", True, "")
flags.DEFINE_integer("eval_every", 500, "")
flags.DEFINE_integer("seed", 0, "")

def main(argv):
    D = F.data_dir
    keras.utils.set_random_seed(F.seed)
    out = f"{D}/runs/{F.name}"; os.makedirs(out, exist_ok=True)
    backbone = backbones.from_onnx("/work/shared/models/teacher_mobilefacenet.onnx", input_shape=(112, 112, 3))
    backbone.trainable = False
    caches = [f"{D}/features_train"] + ([f"{D}/features_utkface"] if F.utk else [])
    num_classes = features.check_cache(caches[0])["num_classes"]
    trainer = xcos_model.build_trainer(backbone, num_classes, grid_channels=F.grid, ce_weight=F.ce, xcos_weight=1.0)
    def lr(base):
        if F.schedule == "cosine":
            return keras.optimizers.schedules.CosineDecay(base, F.steps, alpha=0.01)
        return base
    wd = F.wd or None
    opt = keras.optimizers.SGD(lr(F.lr), momentum=0.9, weight_decay=wd) if F.opt == "sgd" else keras.optimizers.AdamW(lr(F.lr), weight_decay=F.wd)
    trainer.compile(optimizer=opt, attention_optimizer=keras.optimizers.Adam(lr(F.att_lr)))
    data = features.feature_pair_dataset(caches, F.batch, same_fraction=F.same, flip=F.flip, seed=F.seed)
    val = features.eval_feature_pairs(f"{D}/features_holdout_pairs")
    lfw = features.eval_feature_pairs(f"{D}/features_lfw_pairs") if os.path.exists(f"{D}/features_lfw_pairs/manifest.json") else None

    @tf.function
    def step(batch):
        with tf.GradientTape(persistent=True) as tape:
            outputs = trainer(batch, training=True)
            terms = trainer.compute_loss_terms(batch, outputs)
        trainer.apply_loss_gradients(tape, terms["loss"])
        return terms

    @tf.function
    def scores(map_a, map_b):
        ga = trainer.grid_head(map_a, training=False); gb = trainer.grid_head(map_b, training=False)
        s = trainer.xcos(ga, gb, training=False)["score"]
        fa = tf.math.l2_normalize(tf.reshape(ga, (tf.shape(ga)[0], -1)), -1)
        fb = tf.math.l2_normalize(tf.reshape(gb, (tf.shape(gb)[0], -1)), -1)
        return s, tf.reduce_sum(fa * fb, -1)

    def evaluate(pairs):
        s, c = [], []
        for i in range(0, len(pairs["is_same"]), 500):
            a, b = scores(pairs["map_a"][i:i+500], pairs["map_b"][i:i+500]); s.append(a.numpy()); c.append(b.numpy())
        s, c = np.concatenate(s), np.concatenate(c)
        r = {"xcos": metrics.k_fold_accuracy(s, pairs["is_same"], pairs["fold"]).mean,
             "cosine": metrics.k_fold_accuracy(c, pairs["is_same"], pairs["fold"]).mean,
             "mse_teacher": float(np.mean((s - pairs["teacher_cos"]) ** 2)),
             "tar@far1e-3": metrics.tar_at_far(s, pairs["is_same"], 1e-3).tar}
        return r

    history = []; best = -1; t0 = time.time(); it = iter(data); loss_acc = []
    for i in range(1, F.steps + 1):
        terms = step(next(it)); loss_acc.append(float(terms["xcos_loss"]))
        if i % F.eval_every == 0 or i == F.steps:
            r = {"step": i, "train_mse": float(np.mean(loss_acc)), "val": evaluate(val), "seconds": time.time() - t0}
            loss_acc = []
            if lfw is not None: r["lfw"] = evaluate(lfw)
            history.append(r); print(json.dumps(r), flush=True)
            if r["val"]["xcos"] > best:
                best = r["val"]["xcos"]; trainer.save(f"{out}/best.keras")
    teacher = {"val": metrics.k_fold_accuracy(val["teacher_cos"], val["is_same"], val["fold"]).mean}
    if lfw is not None: teacher["lfw"] = metrics.k_fold_accuracy(lfw["teacher_cos"], lfw["is_same"], lfw["fold"]).mean
    json.dump({"flags": {k: F[k].value for k in ["steps","batch","lr","opt","att_lr","schedule","wd","grid","ce","same","utk","flip","seed"]},
               "history": history, "teacher": teacher}, open(f"{out}/result.json", "w"), indent=1)
    print("teacher", teacher)
app.run(main)
