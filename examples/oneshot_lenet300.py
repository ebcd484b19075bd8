"""Prune a trained LeNet-300-100 to 10% of its weights in one shot, no retraining.

Run:  python examples/oneshot_lenet300.py [--keep 0.10] [--method exact_obs]   (fetches MNIST once)

Steps: train the dense network (20 epochs), then exact OBS (OBC) layer by
layer on 4,096 calibration images, each layer's inputs passing through the
already-pruned layers, with the per-layer counts chosen from the layers' OBS
loss curves under the one global budget. Prints the test error before and
after and each layer's kept fraction and reconstruction error.
"""

from __future__ import annotations

import argparse

import jax
import optax
from flax import nnx

import admmprune
from admmprune.data import load_mnist
from admmprune.models import LeNet300, accuracy, cross_entropy_loss, split_nnx


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", type=float, default=0.10, help="fraction of weights kept")
    p.add_argument("--method", default="exact_obs", help="exact_obs, fast_obs, refit, global_obs")
    p.add_argument("--dense-epochs", type=int, default=20)
    args = p.parse_args()

    mnist = load_mnist(download=True)
    data = (mnist.train.x, mnist.train.y)
    model = LeNet300(nnx.Rngs(0))
    params, apply = split_nnx(model)
    loss_fn = cross_entropy_loss(apply)
    params, _ = admmprune.train(
        params,
        loss_fn,
        data,
        optimizer=optax.adam(1e-3),
        epochs=args.dense_epochs,
        key=jax.random.key(0),
    )
    print(f"dense: {1 - accuracy(apply, params, mnist.test.x, mnist.test.y):.2%} test error")

    solver = admmprune.OneShotPrune(
        budget=admmprune.ParamBudget(keep=args.keep),  # or an EnergyBudget
        model=model,  # its layers give each Hessian's inputs
        method=args.method,
        allocation="obs",  # per-layer counts from OBS loss curves
        calibration_examples=4096,
    )
    result = solver.run(params, loss_fn, data, key=jax.random.key(1))
    error = 1 - accuracy(apply, result.params, mnist.test.x, mnist.test.y)
    print(f"one-shot {args.method} at {result.kept_fraction:.1%} kept: {error:.2%} test error")
    for layer in result.history[0].get("layers", []):
        if "name" in layer:
            print(
                f"  {layer['name']:12s} kept {layer['kept'] / layer['size']:6.2%}  "
                f"relative reconstruction error {layer['relative_error']:.4f}"
            )


if __name__ == "__main__":
    main()
