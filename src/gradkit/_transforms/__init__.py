"""The implementation of `gradkit.transforms` (read that module's docstring).

`_base`: the contract, `chain` and the checks every transform shares; `_ops`: the array
functions they are written over (NumPy, or the framework's inside a compiled step);
`_clipping`, `_scaling` (scale, per layer, masks), `_noise` and `_finite`: the transforms
themselves; `_wrap`: an optimizer that runs a transform inside `fit`'s step.
"""
