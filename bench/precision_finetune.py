"""Fine-tune the MiniLM classifier under one precision policy and report test accuracy.

Usage: python -m bench.precision_finetune --precision mixed_bfloat16 --job-dir runs/minilm_tweets

Reads the tokenized splits that the main job wrote, trains a fresh classifier on the first
``--train`` examples for one epoch and prints a JSON line with the precision, the wall
time and the test accuracy.
"""

import argparse
import json
import time

import numpy as np


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--precision", default="mixed_bfloat16",
                        help="float32, mixed_float16 or mixed_bfloat16")
    parser.add_argument("--job-dir", default="runs/minilm_tweets",
                        help="main job output folder with data/*.npz")
    parser.add_argument("--train", type=int, default=2000, help="training examples")
    parser.add_argument("--epochs", type=int, default=1, help="training epochs")
    args = parser.parse_args(argv)

    import tfcompress as tfc
    from tfcompress._keras import tf
    from tfcompress.evaluate import evaluate_keras
    from tfcompress.job import load_split

    train, train_labels = load_split(args.job_dir, "train")
    test, test_labels = load_split(args.job_dir, "test")
    train = {k: v[:args.train] for k, v in train.items()}
    train_labels = train_labels[:args.train]
    dataset = tf.data.Dataset.from_tensor_slices((train, train_labels)).shuffle(
        len(train_labels), seed=0).batch(32)

    model = tfc.bert.classifier(tfc.bert.load_minilm(), num_classes=3, pooling="mean")
    started = time.time()
    tfc.train.fine_tune(model, dataset, epochs=args.epochs, precision=args.precision,
                        verbose=2)
    seconds = time.time() - started
    evaluation = evaluate_keras(model, test, labels=test_labels)
    print(json.dumps({"precision": args.precision, "train_examples": int(len(train_labels)),
                      "epochs": args.epochs, "train_seconds": round(seconds, 1),
                      "test_examples": int(len(test_labels)),
                      "test_accuracy": float(evaluation.accuracy),
                      "test_macro_f1": float(evaluation.macro_f1),
                      "label_distribution": np.bincount(test_labels).tolist()}))


if __name__ == "__main__":
    main()
