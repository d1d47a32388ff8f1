"""Case 4: differentially private training (DP-SGD) with `gradkit.clipped_gradients`.

Each step takes a batch, clips every example's gradient to L2 norm C, adds Gaussian noise of
standard deviation σC to the sum and divides by the batch size (`clipped_gradients`), then
takes one SGD step with it (`gradkit.apply`). The first check is the hand-written recipe:
each example's gradient from its own backward pass (a batch of one), clipped by hand and
averaged, must equal `clipped_gradients(noise_multiplier=0)`. Then the model trains with
noise, and its accuracy must rise well above chance.

If the `dp-accounting` package is installed, the privacy spent (ε at δ = 1e-5, RDP
accountant, each batch treated as Poisson-sampled: the usual approximation) is printed;
gradkit itself does no accounting.
Run: python examples/04_dp_sgd.py       (KERAS_BACKEND=jax or torch to switch)
"""

import numpy as np
from seed_question import gradient_function, model_and_data  # sets KERAS_BACKEND first

import gradkit
import keras

CLIP = 1.0  # C: the bound on each example's gradient norm
NOISE = 1.1  # σ: the noise multiplier
BATCH, STEPS, LEARNING_RATE = 32, 60, 0.5


def clipped_by_hand(by_hand, x, y):
    """The hand-written recipe: one backward pass per example, clipped, averaged."""
    rows = [by_hand(x[i:i + 1], y[i:i + 1]) for i in range(len(x))]
    scales = [min(1.0, CLIP / np.sqrt(sum(float(np.sum(g * g)) for g in row))) for row in rows]
    return [sum(s * row[j] for s, row in zip(scales, rows)) / len(x)
            for j in range(len(rows[0]))]


def dataset(size, seed=1):
    """Labels of a fixed random linear teacher: learnable, so accuracy can rise."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(size, 10)).astype("float32")
    teacher = rng.normal(size=(10, 5))
    y = np.eye(5, dtype="float32")[np.argmax(x @ teacher, axis=1)]
    return x, y


def main():
    model, x, y = model_and_data()
    reference = clipped_by_hand(gradient_function(model, model.trainable_variables), x, y)
    noiseless = gradkit.clipped_gradients(model, x, y, l2_norm_clip=CLIP)
    for (key, g), expected in zip(noiseless.items(), reference):
        np.testing.assert_allclose(g, expected, rtol=1e-4, atol=1e-6, err_msg=key)
    print("clipped_gradients(noise_multiplier=0) agrees with the hand-written recipe "
          f"(per-example backward passes, clipped to {CLIP}) on all {len(reference)} variables.")

    x_train, y_train = dataset(2048)
    chance = 1 / y_train.shape[1]
    optimizer = keras.optimizers.SGD(LEARNING_RATE)
    rng = np.random.default_rng(0)
    for step in range(STEPS):
        index = rng.choice(len(x_train), BATCH, replace=False)
        grads = gradkit.clipped_gradients(model, x_train[index], y_train[index],
                                          l2_norm_clip=CLIP, noise_multiplier=NOISE, seed=step)
        gradkit.apply(model, grads, optimizer=optimizer)
    accuracy = float(np.mean(np.argmax(model.predict(x_train, verbose=0), axis=1)
                             == np.argmax(y_train, axis=1)))
    print(f"after {STEPS} DP-SGD steps (C={CLIP}, sigma={NOISE}, batch {BATCH}): "
          f"accuracy {accuracy:.2f} (chance {chance:.2f})")
    assert accuracy > chance + 0.2, "DP-SGD must learn the teacher above chance"
    print(_privacy_spent(BATCH / len(x_train), STEPS))


def _privacy_spent(sampling_rate, steps, delta=1e-5):
    try:
        from dp_accounting import dp_event, rdp
    except ImportError:
        return "install dp-accounting to report the privacy spent (epsilon)"
    accountant = rdp.RdpAccountant()
    event = dp_event.PoissonSampledDpEvent(sampling_rate, dp_event.GaussianDpEvent(NOISE))
    accountant.compose(event, steps)
    return f"privacy spent: epsilon = {accountant.get_epsilon(delta):.2f} at delta = {delta:g}"


if __name__ == "__main__":
    main()
