"""Fine-tune a tiny classifier with checkpoints and write its final weights to an .npz.

Usage: python resume_worker.py CHECKPOINT_DIR OUTPUT_NPZ SECONDS_PER_STEP
"""

import sys
import time

import numpy as np

from tfcompress._keras import keras, tf
from tfcompress.bert import BertConfig, build_encoder, classifier
from tfcompress.train import fine_tune


class _Slow(keras.callbacks.Callback):
    """Sleep after each step so the test can kill the process mid-epoch."""

    def __init__(self, seconds):
        super().__init__()
        self.seconds = seconds

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(self.seconds)


def main(checkpoint_dir, output, seconds):
    keras.utils.set_random_seed(0)
    config = BertConfig(vocab_size=100, hidden_size=32, num_layers=2, num_heads=4,
                        intermediate_size=64, max_position_embeddings=64, dropout_rate=0.0,
                        attention_dropout_rate=0.0)
    model = classifier(build_encoder(config), 3, dropout=0.0)
    rng = np.random.default_rng(0)
    x = {"input_word_ids": rng.integers(1, 100, (48, 16)).astype(np.int32),
         "input_mask": np.ones((48, 16), np.int32),
         "input_type_ids": np.zeros((48, 16), np.int32)}
    y = (x["input_word_ids"][:, 0] % 3).astype(np.int32)
    data = (tf.data.Dataset.from_tensor_slices((x, y))
            .shuffle(48, seed=3).batch(4))  # 12 steps per epoch, reshuffled each epoch
    fine_tune(model, data, epochs=2, learning_rate=1e-3, checkpoint_dir=checkpoint_dir,
              checkpoint_every=5, callbacks=[_Slow(seconds)], verbose=0)
    np.savez(output, *model.get_weights())


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2], float(sys.argv[3]))
