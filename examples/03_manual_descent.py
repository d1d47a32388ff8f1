"""Case 3: a manual gradient-descent loop that changes the gradients before applying them.

With gradkit the gradients are a plain dict of NumPy arrays: `gradkit.transforms` clips them
to a global L2 norm of 1 and `gradkit.apply` takes one step with them through an optimizer
(here SGD with learning rate 0.5, whose step is exactly ``w - 0.5 * g``). The reference is the
hand-written recipe: its own gradients, clipped by hand, applied with `variable.assign`. Both
loops start from the same weights and must end at the same weights, the loss going down at
every step.

The loss is the compiled loss (categorical cross-entropy, mean over the batch), training=False.
Run: python examples/03_manual_descent.py       (KERAS_BACKEND=jax or torch to switch)
"""

import numpy as np
from seed_question import gradient_function, model_and_data  # sets KERAS_BACKEND first

import gradkit
import keras
from gradkit import transforms

LEARNING_RATE = 0.5  # the question used 0.001, which barely moves the loss in 5 steps
STEPS = 5  # the epochs of the question's loop


def to_numpy(variable):
    return np.array(keras.ops.convert_to_numpy(variable.value))


def clip_by_global_norm(arrays, max_norm=1.0):
    norm = np.sqrt(sum(float(np.sum(a * a)) for a in arrays))
    return [a * min(1.0, max_norm / norm) for a in arrays]


def descend(model, x, y, start, take_step):
    """Run the loop from the `start` weights, calling `take_step()` once per step; return the
    loss after each step and the final weights."""
    variables = model.trainable_variables
    for v, value in zip(variables, start):
        v.assign(value)
    losses = []
    for _ in range(STEPS):
        take_step()
        losses.append(float(model.evaluate(x, y, verbose=0)))
    return losses, [to_numpy(v) for v in variables]


def main():
    model, x, y = model_and_data()
    variables = model.trainable_variables
    start = [to_numpy(v) for v in variables]
    initial_loss = float(model.evaluate(x, y, verbose=0))

    clip = transforms.clip_by_global_norm(1.0)
    sgd = keras.optimizers.SGD(learning_rate=LEARNING_RATE)

    def with_gradkit():
        grads = gradkit.gradients(model, x, y)  # {variable path: array}
        clipped, _ = clip.update(grads, clip.init(grads))
        gradkit.apply(model, clipped, optimizer=sgd)  # w <- w - LEARNING_RATE * g

    by_hand = gradient_function(model, variables)

    def with_the_hand_written_recipe():
        for v, g in zip(variables, clip_by_global_norm(by_hand(x, y))):
            v.assign(to_numpy(v) - LEARNING_RATE * g)

    losses, weights = descend(model, x, y, start, with_gradkit)
    reference_losses, reference_weights = descend(model, x, y, start,
                                                  with_the_hand_written_recipe)

    print(f"loss: {initial_loss:.4f} -> " + " -> ".join(f"{loss:.4f}" for loss in losses))
    assert all(b < a for a, b in zip([initial_loss] + losses, losses)), "loss must decrease"
    np.testing.assert_allclose(losses, reference_losses, rtol=1e-4)
    for v, w, reference in zip(variables, weights, reference_weights):
        np.testing.assert_allclose(w, reference, rtol=1e-4, atol=1e-6, err_msg=v.path)
    print(f"after {STEPS} clipped steps, the weights reached with gradkit (transforms and "
          "apply) and with the hand-written recipe agree (relative tolerance 1e-4).")


if __name__ == "__main__":
    main()
