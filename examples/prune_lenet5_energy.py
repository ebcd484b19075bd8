"""Prune LeNet-5 (Caffe form) on MNIST to 12% of its dense energy with ADMM.

Run:  python examples/prune_lenet5_energy.py [--fraction 0.12]   (fetches MNIST once)

Steps: build the accelerator energy model (Yang, Zhu & Liu, ICLR 2019) from
the network's layer shapes, train the dense network (or load it with --dense
FILE), divide the energy budget among the layers by their OBS loss curves
(``obs_allocation``; ``--allocation knapsack`` skips this and makes the
Z-step the greedy knapsack projection onto the whole energy budget), run
ADMM, retrain with the mask fixed, and print the energy per layer.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import admmprune
from admmprune.data import load_mnist
from admmprune.models import LeNet5, accuracy, cross_entropy_loss, init_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--fraction", type=float, default=0.12, help="energy budget / dense energy")
    p.add_argument("--dense-epochs", type=int, default=20)
    p.add_argument("--admm-iterations", type=int, default=15)
    p.add_argument("--retrain-epochs", type=int, default=5)
    p.add_argument("--dense", type=Path, help="load/save the dense params here (.npz)")
    p.add_argument("--allocation", choices=("obs", "knapsack"), default="obs")
    args = p.parse_args()

    mnist = load_mnist(download=True)
    train_data = (jnp.asarray(mnist.train.x), jnp.asarray(mnist.train.y))
    test = (jnp.asarray(mnist.test.x), jnp.asarray(mnist.test.y))
    params, apply = init_model("lenet5", seed=0)
    loss_fn = cross_entropy_loss(apply)

    # The energy model reads the layer shapes off the network itself.
    model = admmprune.AcceleratorEnergy(admmprune.layer_shapes(LeNet5(nnx.Rngs(0)), (28, 28, 1)))
    print(f"floor {model.floor() / model.dense():.2%} of dense energy")
    budget = admmprune.EnergyBudget(model, fraction=args.fraction)  # BudgetError below the floor

    if args.dense is not None and args.dense.exists():
        params = admmprune.load_params(args.dense, params)
    else:
        params, _ = admmprune.train(
            params,
            loss_fn,
            train_data,
            optimizer=optax.adam(1e-3),
            epochs=args.dense_epochs,
            key=jax.random.key(0),
        )
        if args.dense is not None:
            admmprune.save_params(args.dense, params)
    print(f"dense test accuracy {accuracy(apply, params, *test):.2%}")

    def show(record):
        if record["phase"] == "admm":
            gap = record.get("projection_gap")  # the knapsack's certified gap, if it ran
            print(
                f"iteration {record['iteration']:>2}: energy {record['energy_fraction']:.2%}"
                + ("" if gap is None else f", projection gap <= {gap:.1e}"),
                flush=True,
            )

    # Per-layer counts from OBS loss curves on 4096 calibration images, priced in energy.
    if args.allocation == "obs":  # per-layer counts from OBS loss curves, once, before ADMM
        calibration = train_data[0][:4096]
        budget = admmprune.obs_allocation(budget, LeNet5(nnx.Rngs(0)), calibration)(params)
    solver = admmprune.ADMM(
        budget=budget,
        optimizer=optax.adam(1e-3),
        rho=admmprune.GeometricRho(1e-4, growth=1.3),
        iterations=args.admm_iterations,
        finetune=admmprune.Finetune(epochs=args.retrain_epochs),
    )
    result = solver.run(params, loss_fn, train_data, key=jax.random.key(1), callback=show)
    print(result.summary())
    report = model.breakdown(result.params)
    for name, layer in report["per_layer"].items():
        print(f"{name:<14} energy {layer['pruned'] / report['dense']:.2%} of dense")
    print(
        f"energy {report['fraction']:.2%} of dense (budget {args.fraction:.0%}); "
        f"test accuracy {accuracy(apply, result.params, *test):.2%}"
    )


if __name__ == "__main__":
    main()
