"""The second-order steps every adapter shares: Hessian-vector and Gauss-Newton products,
compiled and cached like the first-order steps of `_steps`, through the adapter's primitives
(``p.hvp``: a Jacobian-vector product of the gradient or a double backward; ``p.linearize``:
the forward pass linearized at the weights)."""

from __future__ import annotations

from gradkit._backends._steps import compiled, data_of, host, unscaled
from gradkit._data import leaves, map_structure


def run_hvp(adapter, request, vectors: list) -> tuple:
    """(loss, Hessian-vector products) as NumPy, compiled and cached (see `gradient_fn`)."""
    def build(scaled):
        p, (objective_of, chosen_of) = adapter.p, adapter.objective(request, scaled)

        def fn(values, data, scale, tangents):
            loss, products = p.hvp(objective_of(values, data, scale))(chosen_of(values),
                                                                      tangents)
            return loss, unscaled(p, products, scale, scaled)

        return p.compile(fn, request.model)

    scale = adapter.scale_of(request.model)
    run = compiled(request, scale, "hvp", build)
    return host(adapter.p, *run(data_of(request.batch, request.seed), scale, list(vectors)))


def run_ggn(adapter, request, vectors: list) -> tuple:
    """(loss, Gauss-Newton products Jᵀ H_L J v) as NumPy, compiled and cached: J the Jacobian
    of the model's outputs, H_L the Hessian of the loss with respect to them (forward-pass
    losses such as regularizers are constants there, so they add nothing). One forward pass
    linearized (J v and the pullback Jᵀ), one Hessian-vector product of the loss alone."""
    def build(scaled):
        p = adapter.p
        forward_of, loss_of, chosen_of = adapter.output_objective(request, scaled)

        def fn(values, data, scale, tangents):
            forward, structure = forward_of(values, data), []

            def flat(chosen):
                y_pred, losses = forward(chosen)
                structure[:] = [map_structure(lambda _: 0, y_pred)]
                return leaves(y_pred), losses

            outputs, jvps, losses, pullback = p.linearize(flat)(chosen_of(values), tangents)
            objective = loss_of(values, data, scale, losses)

            def loss(perturb, outputs):
                feed = iter(outputs)
                return objective(map_structure(lambda _: next(feed), structure[0]))

            value, curvature = p.hvp(loss)(outputs, jvps)
            products = pullback([o * 0 if c is None else c for o, c in zip(outputs, curvature)])
            return value, unscaled(p, products, scale, scaled)

        return p.compile(fn, request.model)

    scale = adapter.scale_of(request.model)
    run = compiled(request, scale, "ggn", build)
    return host(adapter.p, *run(data_of(request.batch, request.seed), scale, list(vectors)))
