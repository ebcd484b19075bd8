"""The accelerator energy model against hand-computed figures for Caffe LeNet-5."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from admmprune.energy import AcceleratorEnergy, LayerShape, layer_shapes
from admmprune.models import LeNet5, init_model


@pytest.fixture(scope="module")
def lenet5_model():
    return AcceleratorEnergy(layer_shapes(LeNet5(nnx.Rngs(0)), (28, 28, 1)))


def test_layer_shapes_are_read_off_the_model(lenet5_model):
    names = [(s.name, s.kind, s.in_hw, s.out_hw) for s in lenet5_model.layers]
    assert names == [
        ("conv1/kernel", "conv", (28, 28), (24, 24)),
        ("conv2/kernel", "conv", (12, 12), (8, 8)),
        ("fc1/kernel", "dense", (1, 1), (1, 1)),
        ("fc2/kernel", "dense", (1, 1), (1, 1)),
    ]
    assert [s.weights for s in lenet5_model.layers] == [500, 25_000, 400_000, 5_000]


def test_per_weight_costs_by_hand(lenet5_model):
    conv1, conv2, fc1, _ = lenet5_model.costs()
    assert fc1.c1 == fc1.c2 == 210  # e_MAC + e_mem + e_cache + e_rf
    # conv2: h'w' = 64, ceil(64/12) = 6: compute 3*64 = 192; b1 = 200 + 36 + 64; b2 = 6*206 + 64
    assert conv2.c1 == 192 + 300 and conv2.c2 == 192 + 1300 and conv2.kink == 4096
    assert conv2.c2 / fc1.c1 == pytest.approx(7.1, abs=0.05)  # "about 7x an fc weight"
    # conv1: h'w' = 576: 3*576 + 200 + 48*6 + 576
    assert conv1.c1 == 1728 + 1064
    # fc1 floor: 800 * (ceil(500/14)*6 + 500) + 200*800 + 200*500
    assert fc1.floor == 800 * (36 * 6 + 500) + 200 * 800 + 200 * 500


def test_floor_and_shares_match_the_issue(lenet5_model):
    params, _ = init_model("lenet5")
    dense = lenet5_model.dense()
    assert lenet5_model.energy(params) == pytest.approx(dense)
    assert lenet5_model.floor() / dense == pytest.approx(0.059, abs=0.005)  # "about 6%"
    share = lenet5_model.per_layer(params)["fc1/kernel"] / dense
    assert share == pytest.approx(2 / 3, abs=0.02)  # "about two thirds"
    zero = jax.tree.map(lambda a: np.zeros_like(a) if a.ndim > 1 else a, params)
    assert lenet5_model.energy(zero) == pytest.approx(lenet5_model.floor())


def test_energy_is_monotone_with_the_kink():
    layer = LayerShape("c/kernel", "conv", 20, 50, kernel=(5, 5), in_hw=(12, 12), out_hw=(8, 8))
    cost = AcceleratorEnergy((layer,)).cost(layer)
    e = [cost.energy(n) for n in (0, 4095, 4096, 4097, 25_000)]
    assert e == sorted(e)
    assert e[3] - e[2] == pytest.approx(cost.c2) and e[2] - e[1] == pytest.approx(cost.c1)
