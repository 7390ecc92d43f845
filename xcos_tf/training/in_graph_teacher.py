"""--teacher: a frozen teacher run in the training graph, giving teacher_cos of each pair
(instead of the embeddings precomputed in the shards by `xcos_tf.teacher`)."""
import keras
import tensorflow as tf

from xcos_tf.training.config import ConfigError
from xcos_tf.training.factory import load_model_file


def load_teacher(path):
    """A frozen in-graph teacher: SavedModel folder or `.keras` model, RGB 0..255 faces -> embedding."""
    if path.endswith(".keras"):
        teacher = load_model_file("teacher", path)
    else:
        try:
            teacher = keras.layers.TFSMLayer(path, call_endpoint="serving_default")
        except (OSError, ValueError) as error:
            raise ConfigError("teacher", f"cannot load the SavedModel {path!r}: {str(error).splitlines()[0]}") from None
    teacher.trainable = False
    return teacher


def teacher_cosine(teacher, image_a, image_b):
    """Cosine of the teacher's embeddings of each pair; no gradient flows into the teacher."""
    embedding = teacher(tf.concat([image_a, image_b], 0), training=False)
    if isinstance(embedding, dict):
        (embedding,) = embedding.values()
    embedding = tf.reshape(tf.cast(embedding, tf.float32), (tf.shape(embedding)[0], -1))
    embedding_a, embedding_b = tf.split(tf.math.l2_normalize(embedding, axis=-1), 2, axis=0)
    return tf.stop_gradient(tf.reduce_sum(embedding_a * embedding_b, axis=-1))
