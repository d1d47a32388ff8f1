"""`gradkit demo`: the main job end to end on a built-in default, with nothing to download.

It generates seeded 16x16 grey images of four pattern classes with NumPy (horizontal
stripes, vertical stripes, diagonal stripes, a centred square), trains a small convolutional
classifier on them for two epochs, computes the gradients of the compiled loss on one batch
with `gradkit.gradients`, prints the per-variable table and writes the gradients with
`gradkit.save`. Keras is imported inside the functions, on the backend already chosen.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any, TextIO

import numpy as np

from gradkit._errors import GradkitFileError, received

CLASSES = ("horizontal", "vertical", "diagonal", "square")
SIZE = 16
DEFAULT_OUT = "gradkit-demo.npz"
MODEL_NAME = "demo_cnn"


def make_images(n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` noisy 16x16x1 float32 images and their int labels (0..3), from `seed`."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, len(CLASSES), size=n)
    rows, cols = np.mgrid[0:SIZE, 0:SIZE]
    images = np.empty((n, SIZE, SIZE), np.float32)
    for i, label in enumerate(labels):
        period = int(rng.integers(3, 6))
        phase = int(rng.integers(0, period))
        if label == 0:
            pattern = (rows + phase) % period == 0
        elif label == 1:
            pattern = (cols + phase) % period == 0
        elif label == 2:
            pattern = (rows + cols + phase) % period == 0
        else:
            half = int(rng.integers(3, 7))
            centre = SIZE // 2 + int(rng.integers(-2, 3))
            inside = (abs(rows - centre) <= half) & (abs(cols - centre) <= half)
            pattern = inside & ~((abs(rows - centre) < half) & (abs(cols - centre) < half))
        images[i] = pattern + 0.3 * rng.standard_normal((SIZE, SIZE))
    return images[..., None], labels.astype(np.int32)


def build_model(keras: Any) -> Any:
    """A small convolutional classifier, compiled with sparse categorical cross-entropy.

    Initializers are seeded, so no global seed is needed (keras.utils.set_random_seed would
    import TensorFlow on every backend, which costs seconds).
    """
    layers = keras.layers

    def seeded(n: int) -> Any:
        return keras.initializers.GlorotUniform(seed=n)

    model = keras.Sequential([
        keras.Input((SIZE, SIZE, 1), name="image"),
        layers.Conv2D(8, 3, activation="relu", kernel_initializer=seeded(1), name="conv1"),
        layers.MaxPooling2D(2, name="pool1"),
        layers.Conv2D(16, 3, activation="relu", kernel_initializer=seeded(2), name="conv2"),
        layers.GlobalAveragePooling2D(name="pool2"),
        layers.Dense(len(CLASSES), activation="softmax", kernel_initializer=seeded(3),
                     name="classes"),
    ], name=MODEL_NAME)
    model.compile(optimizer=keras.optimizers.Adam(0.01),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


def run(out: str | None = None, stream: TextIO | None = None) -> Path:
    """Train the demo model briefly, compute and print its gradients, write them; the path."""
    path = output_path(out)
    import keras

    from gradkit._gradients import gradients
    from gradkit._io import save
    from gradkit._table import summary

    stream = stream or sys.stdout
    x, y = make_images(768, seed=0)
    model = build_model(keras)
    print(f"gradkit demo: Keras {keras.__version__} on the {keras.backend.backend()} backend",
          file=stream)
    print(f"data:  {len(x)} synthetic {SIZE}x{SIZE} images of {len(CLASSES)} classes "
          f"({', '.join(CLASSES)}), generated in memory (seed 0)", file=stream)
    history = model.fit(x[:512], y[:512], epochs=2, batch_size=32,
                        shuffle=False, verbose=0)  # the images come in random order
    _, accuracy = model.evaluate(x[512:], y[512:], verbose=0)
    print(f"model: {model.name}, {model.count_params()} parameters; trained 2 epochs "
          f"(loss {history.history['loss'][-1]:.3f}), held-out accuracy {accuracy:.2f}",
          file=stream)
    grads = gradients(model, x[512:576], y[512:576])
    print("\ngradients of the compiled loss (sparse categorical cross-entropy, mean over a "
          "batch of 64 held-out images), training=False:\n", file=stream)
    print(summary(grads), file=stream)
    written = save(path, grads)
    print(f"\nwrote {len(grads)} gradient arrays to {written.resolve()}  "
          "(read them with gradkit.load(path))", file=stream)
    return written


def output_path(out: str | None) -> Path:
    """The path to write; the default must not replace a file gradkit did not write."""
    if out is not None:
        return Path(out)
    path = Path.cwd() / DEFAULT_OUT
    if path.exists() and not _is_demo_output(path):
        raise GradkitFileError(
            f"{str(path)!r} already exists and is not a gradkit demo output, so the demo will "
            "not replace it. Move it away or pass -o OTHER.npz. " + received(out=None)
        )
    return path


def _is_demo_output(path: Path) -> bool:
    import zipfile

    try:
        data = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile):
        return False
    if not hasattr(data, "files"):  # a .npy array, not an .npz archive
        return False
    with data:
        keys = list(data.files)
    return bool(keys) and all(k.startswith(MODEL_NAME + "/") for k in keys)
