"""Train "your" classifier: a scikit-learn MLP on the training part of an image folder, saved as
plain NumPy weights (mlp.npz beside this file) that classifier.py serves.

    python train_mlp.py data/digits-png

The training images are the ones `defense train --data DIR` will use: the same reader
(`deepzero_oracle.common.datasets.load_data`), the same seeded 80/20 split.
"""

import sys
from pathlib import Path

import numpy as np
from sklearn.neural_network import MLPClassifier

from deepzero_oracle.common.datasets import load_data


def main(folder: str) -> None:
    data = load_data(folder)
    flat = lambda x: x.reshape(len(x), -1).numpy()  # noqa: E731 -- [N, C, H, W] -> [N, C*H*W]
    mlp = MLPClassifier(hidden_layer_sizes=(64,), max_iter=500, random_state=0)
    mlp.fit(flat(data.x_train), data.y_train.numpy())
    accuracy = mlp.score(flat(data.x_test), data.y_test.numpy())
    out = Path(__file__).with_name("mlp.npz")
    np.savez(out, w1=mlp.coefs_[0], b1=mlp.intercepts_[0], w2=mlp.coefs_[1], b2=mlp.intercepts_[1],
             classes=np.asarray(mlp.classes_))
    print(f"clean test accuracy {accuracy:.3f}; wrote {out}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "data/digits-png")
