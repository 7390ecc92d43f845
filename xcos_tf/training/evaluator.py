"""Evaluation during training: 10-fold accuracy of the xCos score and of the embedding cosine
on the --eval_pairs, and TensorBoard panels of the cos and attention maps of the first pairs."""
import numpy as np
import tensorflow as tf
from absl import logging

from xcos_tf import metrics, scoring
from xcos_tf import model as xcos_model
from xcos_tf.data import pipeline

NUM_SUMMARY_PAIRS = 4  # pairs whose cos and attention maps TensorBoard shows
EVAL_BATCH = 64


class Evaluator:
    """10-fold accuracy of the xCos score and of the plain embedding cosine on the eval pairs,
    plus TensorBoard images of the cos and attention maps of the first pairs (always the same)."""

    def __init__(self, config):
        dataset = pipeline.eval_pair_dataset(
            list(config.eval_pairs), EVAL_BATCH, image_shape=(config.image_size, config.image_size, 3)
        )
        num_pairs = sum(pipeline.scan_shards(list(config.eval_pairs), "pairs").counts)
        if config.eval_max_pairs and num_pairs > config.eval_max_pairs:
            # Every k-th pair, not the first ones: pair files list folds (and same-person pairs) in blocks.
            stride = -(-num_pairs // config.eval_max_pairs)
            dataset = dataset.unbatch().shard(stride, 0).batch(EVAL_BATCH)
        self.dataset = dataset

    def evaluate(self, trainer, step):
        scorer = scoring.VerifierScorer(xcos_model.build_verifier(trainer))
        results = {"score": [], "cosine": [], "is_same": [], "fold": []}
        panels = None
        for batch in self.dataset:
            outputs = scoring.score_pairs(scorer, batch["image_a"].numpy(), batch["image_b"].numpy(), EVAL_BATCH)
            results["score"].append(outputs["score"])
            results["cosine"].append(outputs["cosine"])
            results["is_same"].append(batch["is_same"].numpy())
            results["fold"].append(batch["fold"].numpy())
            if panels is None:
                panels = map_panels(batch, outputs)
        results = {key: np.concatenate(value) for key, value in results.items()}
        # The shards' own folds (LFW's 10) when they have several, else 10 consecutive folds.
        folds = results["fold"] if len(np.unique(results["fold"])) >= 2 else 10
        xcos = metrics.k_fold_accuracy(results["score"], results["is_same"], folds)
        cosine = metrics.k_fold_accuracy(results["cosine"], results["is_same"], folds)
        tf.summary.scalar("eval/xcos_accuracy", xcos.mean, step=step)
        tf.summary.scalar("eval/cosine_accuracy", cosine.mean, step=step)
        tf.summary.image("eval/pairs_cos_attention", panels, step=step, max_outputs=NUM_SUMMARY_PAIRS)
        logging.info("Step %d: 10-fold accuracy xCos %.4f, embedding cosine %.4f.", step, xcos.mean, cosine.mean)
        return xcos.mean


def map_panels(batch, outputs):
    """One RGB image per pair: face a | face b | cos map | attention map (maps as grey levels).

    cos in [-1, 1] maps to [0, 1]; attention is scaled by its maximum so its pattern shows.
    """
    count = min(NUM_SUMMARY_PAIRS, int(batch["image_a"].shape[0]))
    size = batch["image_a"].shape[1:3]
    cos_map = np.asarray(outputs["cos_map"][:count])
    attention = np.asarray(outputs["attention_map"][:count])
    attention = attention / np.maximum(attention.max(axis=(1, 2), keepdims=True), 1e-12)

    def panel(cell_map):
        return tf.tile(tf.image.resize(cell_map[..., None], size, method="nearest"), (1, 1, 1, 3))

    return tf.concat(
        [batch["image_a"][:count] / 255.0, batch["image_b"][:count] / 255.0, panel((cos_map + 1.0) / 2.0), panel(attention)],
        axis=2,
    )
