"""The implementation of `gradkit.transforms` (read that module's docstring); pure NumPy.

`_base`: the contract, `chain` and the checks every transform shares; `_clipping`,
`_scaling` (scale, per layer, masks), `_noise` and `_finite`: the transforms themselves.
"""
