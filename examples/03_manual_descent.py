"""Case 3: a manual gradient-descent loop that changes the NumPy gradients before using them.

The gradients come back as a plain dict of NumPy arrays, so any NumPy code can modify them
(here: clipping to a global L2 norm of 1) before `variable.assign` applies them. The loop is
run twice from the same starting weights, once with gradkit and once with the hand-written
recipe; both must end at the same weights, with the loss going down at every step.

The loss is the compiled loss (categorical cross-entropy, mean over the batch), training=False.
Run: python examples/03_manual_descent.py       (KERAS_BACKEND=jax or torch to switch)
"""

import numpy as np
from seed_question import gradient_function, model_and_data  # sets KERAS_BACKEND first

import gradkit
import keras

LEARNING_RATE = 0.5  # the question used 0.001, which barely moves the loss in 5 steps
STEPS = 5  # the epochs of the question's loop


def to_numpy(variable):
    return np.array(keras.ops.convert_to_numpy(variable.value))


def clip_by_global_norm(arrays, max_norm=1.0):
    norm = np.sqrt(sum(float(np.sum(a * a)) for a in arrays))
    return [a * min(1.0, max_norm / norm) for a in arrays]


def descend(model, x, y, start, get_gradients):
    """Run the loop from the `start` weights; return the loss after each step and the
    final weights. `get_gradients()` gives one NumPy array per trainable variable."""
    variables = model.trainable_variables
    for v, value in zip(variables, start):
        v.assign(value)
    losses = []
    for _ in range(STEPS):
        grads = clip_by_global_norm(get_gradients())
        for v, g in zip(variables, grads):
            v.assign(to_numpy(v) - LEARNING_RATE * g)
        losses.append(float(model.evaluate(x, y, verbose=0)))
    return losses, [to_numpy(v) for v in variables]


def main():
    model, x, y = model_and_data()
    variables = model.trainable_variables
    start = [to_numpy(v) for v in variables]
    initial_loss = float(model.evaluate(x, y, verbose=0))

    def with_gradkit():
        grads = gradkit.gradients(model, x, y)  # {variable path: array}
        return [grads[v.path] for v in variables]

    by_hand = gradient_function(model, variables)
    losses, weights = descend(model, x, y, start, with_gradkit)
    reference_losses, reference_weights = descend(model, x, y, start, lambda: by_hand(x, y))

    print(f"loss: {initial_loss:.4f} -> " + " -> ".join(f"{loss:.4f}" for loss in losses))
    assert all(b < a for a, b in zip([initial_loss] + losses, losses)), "loss must decrease"
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-4)
    for v, w, reference in zip(variables, weights, reference_weights):
        np.testing.assert_allclose(w, reference, rtol=1e-4, atol=1e-6, err_msg=v.path)
    print(f"after {STEPS} clipped steps, the weights reached with gradkit and with the "
          "hand-written recipe agree (relative tolerance 1e-4).")


if __name__ == "__main__":
    main()
