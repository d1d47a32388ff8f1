"""Case 2: only the weights of one named layer.

By hand, `tape.gradient(loss, [layer.trainable_variables])` returns a nested list and the
names have to be paired with the arrays by position. With gradkit the layer is named and the
result is keyed by variable path:
    grads = gradkit.gradients(model, x, y, layers="dense_1")
`layers=` also takes globs ("dense_*"), nested paths ("encoder/dense") and Layer objects.

The loss is the compiled loss (categorical cross-entropy, mean over the batch), training=False.
Run: python examples/02_one_layer.py       (KERAS_BACKEND=jax or torch to switch)
"""

import numpy as np
from seed_question import gradient_function, model_and_data

import gradkit

model, x, y = model_and_data()

grads = gradkit.gradients(model, x, y, layers="dense_1")
print(gradkit.summary(grads))

layer = model.get_layer("dense_1")
by_hand = gradient_function(model, layer.trainable_variables)(x, y)
assert list(grads) == [v.path for v in layer.trainable_variables]
for (name, g), reference in zip(grads.items(), by_hand):
    np.testing.assert_allclose(g, reference, rtol=1e-5, atol=1e-7, err_msg=name)
print(f"\ngradkit and the hand-written recipe agree on the {len(grads)} variables of "
      "layer 'dense_1' (relative tolerance 1e-5).")
