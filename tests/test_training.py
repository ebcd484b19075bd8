"""Jitted epochs: data-parallel over a mesh gives the one-device result (forced host devices)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np

from admmprune.training import place_on_mesh

SCRIPT = textwrap.dedent(
    """
    import json, sys
    import jax, jax.numpy as jnp, numpy as np, optax
    from admmprune import ADMM, Finetune, GeometricRho, ParamBudget
    from admmprune.models import cross_entropy_loss, init_model
    from admmprune.data import synthetic_classification

    assert len(jax.devices()) == 4, jax.devices()
    params, apply = init_model("lenet300", seed=0)
    d = synthetic_classification(1024, image=True, classes=10, seed=0)
    data = (jnp.asarray(d.x), jnp.asarray(d.y))
    out = {}
    for name, mesh in (("one", None), ("four", jax.make_mesh((4,), ("batch",)))):
        solver = ADMM(
            ParamBudget(keep=0.05), optax.adam(1e-3), rho=GeometricRho(1e-3, 1.5),
            iterations=3, finetune=Finetune(epochs=1), batch_size=64, mesh=mesh,
        )
        res = solver.run(params, cross_entropy_loss(apply), data, key=jax.random.key(0))
        out[name] = {
            "params": {k: np.asarray(v["kernel"]).tolist() for k, v in res.params.items()},
            "losses": [r["loss"] for r in res.history if "loss" in r],
            "shards": len(res.params["fc1"]["kernel"].sharding.device_set),
        }
    try:
        ADMM(ParamBudget(keep=0.05), optax.adam(1e-3), batch_size=30, mesh=mesh)
    except ValueError as e:
        out["refused"] = str(e)
    json.dump(out, sys.stdout)
    """
)


def test_the_w_step_data_parallel_on_four_devices_matches_one_device(tmp_path):
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=4"}
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = json.loads(done.stdout)
    assert out["one"]["shards"] == 1 and out["four"]["shards"] == 4  # it really ran on four
    assert "batch_size=30 does not split over the mesh's 4 devices" in out["refused"]
    np.testing.assert_allclose(out["four"]["losses"], out["one"]["losses"], rtol=1e-4)
    for name, kernel in out["one"]["params"].items():
        a, b = np.asarray(kernel), np.asarray(out["four"]["params"][name])
        assert np.array_equal(a != 0, b != 0), name  # the same support
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5, err_msg=name)


def test_one_device_mesh_places_the_data_and_splits_nothing():
    mesh = jax.make_mesh((1,), ("batch",))
    data = (jnp.zeros((8, 3)), jnp.zeros(8, int))
    placed, replicated, sharding = place_on_mesh(mesh, data, {"w": jnp.ones(2)}, 4)
    assert sharding.spec == jax.sharding.PartitionSpec("batch")
    assert placed[0].shape == (8, 3) and replicated["w"].shape == (2,)
