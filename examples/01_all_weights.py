"""Case 1: the gradient of every trainable weight, as NumPy arrays.

Keras 2 (gone in Keras 3):
    grads = model.optimizer.get_gradients(model.total_loss, model.trainable_weights)
    fn = K.function(model.inputs + [targets], grads)        # then fn([x, y])
By hand in Keras 3: a GradientTape in a tf.function, jax.grad or torch autograd
(`seed_question.gradient_function`), one recipe per backend.
With gradkit, on any backend:
    grads = gradkit.gradients(model, x, y)   # {"sequential/dense_1/kernel": array, ...}

The loss is the compiled loss (categorical cross-entropy, mean over the batch), training=False.
Run: python examples/01_all_weights.py       (KERAS_BACKEND=jax or torch to switch)
"""

import numpy as np
from seed_question import gradient_function, model_and_data

import gradkit

model, x, y = model_and_data()

grads = gradkit.gradients(model, x, y)
print(gradkit.summary(grads))

by_hand = gradient_function(model, model.trainable_variables)(x, y)
for (name, g), reference in zip(grads.items(), by_hand):
    np.testing.assert_allclose(g, reference, rtol=1e-5, atol=1e-7, err_msg=name)
print(f"\ngradkit and the hand-written recipe agree on all {len(grads)} variables "
      "(relative tolerance 1e-5).")
