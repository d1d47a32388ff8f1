"""Write gradkit Hessian-vector products of one fixed model, batch and vector, on one flavour.

    python tests/_hvp_worker.py FLAVOUR OUT_DIR

Run once per flavour by tests/test_hvp.py (Keras fixes its backend at import, so each
flavour needs its own process). The model and batch are those of
tests/_cross_backend_worker.py (seeded weights: Conv, BatchNorm, tanh, pooling, Dense with
an L2 regularizer, softmax); the vector comes from a seeded NumPy generator in
`model.trainable_variables` order, so every flavour multiplies the same Hessian by the same
vector.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from _cross_backend_worker import build, data, keras_for


def main(flavour: str, out_dir: str) -> None:
    keras = keras_for(flavour)
    import gradkit as gk

    model = build(keras)
    x, y, sample_weight = data()
    keys = list(gk.gradients(model, x, y))  # the keys in model.trainable_variables order
    rng = np.random.default_rng(11)
    vector = {key: rng.normal(size=tuple(v.shape)).astype("float32")
              for key, v in zip(keys, model.trainable_variables)}
    hidden = {k: v for k, v in vector.items() if k.startswith("hidden/")}
    runs = {
        "compiled_training": dict(y=y, sample_weight=sample_weight, training=True,
                                  vector=vector),
        "compiled_inference": dict(y=y, vector=vector),
        "target": dict(target=1, vector=vector),
        "loss_layers": dict(y=y, loss="mse", layers="hidden", vector=hidden),
    }
    for name, kwargs in runs.items():
        try:
            products = gk.hvp(model, x, **kwargs)
        except gk.InvalidArgumentError as error:  # TensorFlow refuses BatchNorm in training
            with open(os.path.join(out_dir, f"{flavour}-{name}.refused"), "w") as f:
                f.write(str(error))
            continue
        gk.save(os.path.join(out_dir, f"{flavour}-{name}.npz"), products)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
