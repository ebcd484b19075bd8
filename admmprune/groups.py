"""Structured groups: the coupled weights that a structured pruner keeps or removes together.

A *channel group* is one channel (a hidden neuron, a convolution filter) of a
layer's output, with everything that lives or dies with it (Torch-Pruning's
dependency graph, Fang et al., CVPR 2023):

* its *producers*: the kernel slice that computes it (a dense kernel's column,
  a HWIO kernel's output slice), its bias entry, its BatchNorm scale, shift and
  statistics -- and, when channels of several layers are joined by a residual
  add, the producers of every one of them;
* its *consumers*: the matching input slice of every layer that reads it (a
  dense kernel's row; a conv kernel's input channel; after a flatten, the
  rows of a dense layer that read that channel at every spatial position).

A *branch group* is a whole residual branch (``models.Residual.branch``): all
its leaves, removed together for depth pruning.

:func:`derive` finds both for an nnx model automatically by tracing one call
to a jaxpr and following which channel of which layer every array axis
carries (through ReLU, BatchNorm, pooling, flatten, im2col slicing, residual
adds); a user declares :class:`ChannelGroup` and :class:`BranchGroup` by hand
for anything else. The result, a :class:`Structure`, also holds every layer's
MACs as a function of its input and output channel counts (bilinear: MACs of
a conv = h' w' k^2 c_in c_out), for MACs and energy budgets.

Why producers alone define the set: zeroing a group's producers makes its
channel exactly zero downstream (a zero column, zero bias, zero BatchNorm
scale and shift), so the consumer slices then multiply zeros and can be
removed without changing the network's function. The budget sets are
therefore ``{W : producers of every removed group are zero}``, whose
Euclidean projection keeps the groups with the largest producer energy
``||w_g||^2`` (the groups' producers are disjoint), and the hard prune
removes the consumers as well (:meth:`Structure.masks`).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from admmprune._tree import PyTree, leaf_names, named_leaves


class StructureError(ValueError):
    """A model the group derivation cannot follow, or groups that do not fit the params."""


@dataclasses.dataclass(frozen=True)
class Member:
    """One leaf's share of a channel group.

    Attributes:
        leaf: the leaf name (``"fc2/kernel"``).
        axis: the leaf axis along which the channels lie.
        index: the channel of every position along ``axis`` (length
            ``leaf.shape[axis]``); ``None`` when position ``i`` is channel ``i``.
            A dense layer after a flatten of ``(h, w, c)`` reads channel
            ``i % c`` at row ``i``.
        statistic: a measured statistic (BatchNorm's running mean and
            variance), not a weight: sliced and masked with its channel, but
            no part of the channel's score.
    """

    leaf: str
    axis: int
    index: tuple[int, ...] | None = None
    statistic: bool = False

    def positions(self, size: int) -> np.ndarray:
        """The channel of each position along the axis, as an array."""
        return np.arange(size) if self.index is None else np.asarray(self.index)


@dataclasses.dataclass(frozen=True)
class ChannelGroup:
    """The channels of one layer output (or of several joined by residual adds).

    Attributes:
        name: the producing kernels joined by ``+`` (``"conv1/kernel"``).
        size: the number of channels.
        producers: the members that compute the channels (kernel output
            slices, biases, norm parameters and statistics).
        consumers: the members that read them (the next layers' input slices).
    """

    name: str
    size: int
    producers: tuple[Member, ...]
    consumers: tuple[Member, ...] = ()

    @property
    def members(self) -> tuple[Member, ...]:
        return self.producers + self.consumers


@dataclasses.dataclass(frozen=True)
class BranchGroup:
    """A residual branch ``y = x + f(x)``: every leaf of ``f``, removed together.

    Attributes:
        name: the branch module's path (``"block2/branch"``).
        leaves: the names of the leaves under it.
    """

    name: str
    leaves: tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class LayerCost:
    """One dense or convolution layer's MACs per example, bilinear in channel counts.

    ``macs(kept) = unit * rows_in * cols_out`` where ``rows_in`` is the number of
    kept input positions (channels times positions per channel, or the full
    input width when the input group is not prunable) and ``cols_out`` the
    kept output channels.

    Attributes:
        kernel: the kernel leaf.
        macs: the dense MACs per example.
        inputs, outputs: the channel groups on each side (None: not prunable).
        in_positions: the input positions each input channel owns (the
            flatten factor); the full input width when ``inputs`` is None.
        out_width: the output width when ``outputs`` is None.
        branch: the residual branch holding the layer, if any.
    """

    kernel: str
    macs: int
    inputs: str | None
    outputs: str | None
    in_positions: tuple[int, ...]
    out_width: int
    branch: str | None = None

    @property
    def unit(self) -> float:
        return self.macs / (sum(self.in_positions) * self.out_width)


@dataclasses.dataclass(frozen=True)
class Structure:
    """The channel groups, branch groups and layer costs of one network.

    Build it with :func:`derive` (an nnx model) or by hand. Hashable, so
    budgets holding it can be jit-static.
    """

    groups: tuple[ChannelGroup, ...]
    branches: tuple[BranchGroup, ...] = ()
    layers: tuple[LayerCost, ...] = ()

    def group(self, name: str) -> ChannelGroup:
        for g in self.groups:
            if g.name == name:
                return g
        raise StructureError(
            f"no channel group {name!r}; groups are {[g.name for g in self.groups]}."
        )

    @property
    def sizes(self) -> dict[str, int]:
        return {g.name: g.size for g in self.groups}

    @property
    def dense_macs(self) -> int:
        return int(sum(layer.macs for layer in self.layers))

    def check(self, params: PyTree) -> None:
        """Raises :class:`StructureError` unless every member fits ``params``."""
        shapes = {n: np.shape(x) for n, x in named_leaves(params).items()}
        for g in self.groups:
            for m in g.members:
                if m.leaf not in shapes:
                    raise StructureError(
                        f"group {g.name!r} names leaf {m.leaf!r}, which the params do not "
                        f"have; leaves are {sorted(shapes)}."
                    )
                shape = shapes[m.leaf]
                if not -len(shape) <= m.axis < len(shape):
                    raise StructureError(
                        f"group {g.name!r}: {m.leaf} has {len(shape)} axes, not axis {m.axis}."
                    )
                n = shape[m.axis]
                pos = m.positions(n)
                bad = pos.shape != (n,) or pos.min(initial=0) < 0 or pos.max(initial=0) >= g.size
                if bad or (m.index is None and n != g.size):
                    raise StructureError(
                        f"group {g.name!r}: {m.leaf} axis {m.axis} has {n} positions, which "
                        f"do not map onto the group's {g.size} channels."
                    )
        for b in self.branches:
            missing = sorted(set(b.leaves) - set(shapes))
            if missing or not b.leaves:
                raise StructureError(
                    f"branch {b.name!r} names leaves {missing or '(none)'} the params lack."
                )

    # -- masks ---------------------------------------------------------------

    def scores(self, params: PyTree) -> dict[str, jax.Array]:
        """Every group's producer energy per channel, ``||w_g||^2`` (float32).

        The value of keeping channel ``c`` in the projection onto the group set.
        """
        by_name = named_leaves(params)
        out = {}
        for g in self.groups:
            total = jnp.zeros((g.size,), jnp.float32)
            for m in g.producers:
                if not m.statistic:
                    total = total + _per_channel(by_name[m.leaf], m, g.size, jnp.square)
            out[g.name] = total
        return out

    def l1_scores(self, params: PyTree) -> dict[str, jax.Array]:
        """Every group's ``sum |w|`` over its producer *kernels* (Li et al., ICLR 2017)."""
        by_name = named_leaves(params)
        out = {}
        for g in self.groups:
            total = jnp.zeros((g.size,), jnp.float32)
            for m in g.producers:
                if np.ndim(by_name[m.leaf]) >= 2:
                    total = total + _per_channel(by_name[m.leaf], m, g.size, jnp.abs)
            out[g.name] = total
        return out

    def masks(
        self,
        params: PyTree,
        keep: Mapping[str, Any],
        branches: Mapping[str, bool] | None = None,
        *,
        consumers: bool = True,
    ) -> PyTree:
        """Leaf masks for kept channels (and kept branches).

        Args:
            params: the pytree the masks are for.
            keep: group name -> boolean vector of kept channels (groups not
                named are kept whole).
            branches: branch name -> kept (branches not named are kept).
            consumers: also zero the consumer slices (the hard prune and the
                compact network); False masks the producers only (the
                projection's support).
        """
        names = leaf_names(params)
        leaves = jax.tree.leaves(params)
        index = {n: i for i, n in enumerate(names)}
        out = [jnp.ones(np.shape(x), bool) for x in leaves]
        for g in self.groups:
            if g.name not in keep:
                continue
            kept = jnp.asarray(keep[g.name], bool)
            for m in g.producers + (g.consumers if consumers else ()):
                i = index[m.leaf]
                n = np.shape(leaves[i])[m.axis]
                along = kept[m.positions(n)]
                shape = [1] * len(np.shape(leaves[i]))
                shape[m.axis] = n
                out[i] = out[i] & along.reshape(shape)
        for b in self.branches:
            if branches is not None and not branches.get(b.name, True):
                for leaf in b.leaves:
                    out[index[leaf]] = jnp.zeros_like(out[index[leaf]])
        return jax.tree.unflatten(jax.tree.structure(params), out)

    def kept(self, masks: PyTree) -> tuple[dict[str, np.ndarray], dict[str, bool]]:
        """The kept channels and branches that ``masks`` leaves alive.

        A channel is alive while any producer entry of it is; a branch while
        any of its entries is.
        """
        by_name = {n: np.asarray(m) for n, m in named_leaves(masks).items()}
        channels = {}
        for g in self.groups:
            alive = np.zeros(g.size, bool)
            for m in g.producers:
                if not m.statistic:
                    alive |= np.asarray(_per_channel(by_name[m.leaf], m, g.size, np.abs)) > 0
            channels[g.name] = alive
        branches = {b.name: any(bool(by_name[x].any()) for x in b.leaves) for b in self.branches}
        return channels, branches

    # -- MACs ----------------------------------------------------------------

    def macs(
        self, counts: Mapping[str, float], branches: Mapping[str, bool] | None = None
    ) -> float:
        """MACs per example with ``counts[g]`` kept channels per group (uniform positions)."""
        total = 0.0
        for layer in self.layers:
            if layer.branch is not None and not (branches or {}).get(layer.branch, True):
                continue
            total += layer.unit * self._rows(layer, counts) * self._cols(layer, counts)
        return total

    def layer_macs(
        self, counts: Mapping[str, float], branches: Mapping[str, bool] | None = None
    ) -> dict[str, float]:
        """Every kernel's MACs per example at the kept counts of :meth:`macs` (a kernel
        called twice sums its calls; a removed branch's layers count 0)."""
        out: dict[str, float] = {}
        for layer in self.layers:
            kept = layer.branch is None or (branches or {}).get(layer.branch, True)
            value = layer.unit * self._rows(layer, counts) * self._cols(layer, counts)
            out[layer.kernel] = out.get(layer.kernel, 0.0) + (value if kept else 0.0)
        return out

    def macs_of(self, masks: PyTree) -> float:
        """MACs per example of the network ``masks`` leaves (channels and branches)."""
        channels, branches = self.kept(masks)
        total = 0.0
        for layer in self.layers:
            if layer.branch is not None and not branches.get(layer.branch, True):
                continue
            rows = (
                sum(layer.in_positions)
                if layer.inputs is None
                else float(np.asarray(layer.in_positions)[channels[layer.inputs]].sum())
            )
            cols = (
                layer.out_width if layer.outputs is None else float(channels[layer.outputs].sum())
            )
            total += layer.unit * rows * cols
        return total

    def _rows(self, layer: LayerCost, counts: Mapping[str, float]) -> float:
        if layer.inputs is None or layer.inputs not in counts:
            return float(sum(layer.in_positions))
        per = sum(layer.in_positions) / len(layer.in_positions)
        return per * counts[layer.inputs]

    def _cols(self, layer: LayerCost, counts: Mapping[str, float]) -> float:
        if layer.outputs is None or layer.outputs not in counts:
            return float(layer.out_width)
        return float(counts[layer.outputs])

    @property
    def statistics(self) -> set[str]:
        """The leaves that are measured statistics (BatchNorm mean and var), not weights."""
        return {m.leaf for g in self.groups for m in g.producers if m.statistic}

    def describe(self) -> dict[str, Any]:
        return {
            "groups": {g.name: g.size for g in self.groups},
            "branches": [b.name for b in self.branches],
            "dense_macs": self.dense_macs,
        }


def _per_channel(leaf: Any, m: Member, size: int, f: Any) -> Any:
    """``sum f(w)`` over each channel's entries of one member (a segment sum)."""
    xp = np if isinstance(leaf, np.ndarray) else jnp
    x = xp.moveaxis(f(xp.asarray(leaf, xp.float32)), m.axis, 0)
    per_pos = x.reshape(x.shape[0], -1).sum(axis=1)
    if m.index is None:
        return per_pos
    seg = np.asarray(m.index)
    if xp is np:
        return np.bincount(seg, weights=per_pos, minlength=size)
    return jax.ops.segment_sum(per_pos, jnp.asarray(seg), num_segments=size)


# -- derivation from a jaxpr ---------------------------------------------------


@dataclasses.dataclass
class _Node:
    size: int
    producers: list[Member]
    consumers: list[Member]
    fixed: bool = False
    parent: int | None = None
    kernels: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass(frozen=True)
class _Act:
    """An activation: per axis, ``(node, channel map)`` or None."""

    axes: tuple[tuple[int, np.ndarray] | None, ...]


@dataclasses.dataclass(frozen=True)
class _Par:
    """A (view of a) parameter: per axis, the leaf coordinates it holds."""

    axes: tuple[tuple[tuple[int, int, np.ndarray], ...], ...]


_PASS = {
    "neg", "exp", "exp2", "log", "log1p", "expm1", "tanh", "logistic", "sqrt", "rsqrt",
    "cbrt", "abs", "sign", "floor", "ceil", "round", "erf", "erfc", "sin", "cos",
    "integer_pow", "square", "convert_element_type", "copy", "copy_p", "stop_gradient",
    "reduce_precision", "is_finite", "not", "real", "imag",
}  # fmt: skip
_BINARY = {
    "add", "add_any", "sub", "mul", "div", "max", "min", "pow", "atan2", "rem",
    "select_n", "and", "or", "eq", "ne", "lt", "le", "gt", "ge", "nextafter", "clamp",
}  # fmt: skip
_REDUCE = {"reduce_sum", "reduce_max", "reduce_min", "reduce_prod", "argmax", "argmin"}


class _Tracer:
    def __init__(self, names: list[str], shapes: list[tuple[int, ...]]) -> None:
        self.names = names
        self.shapes = shapes
        self.nodes: list[_Node] = []
        self.layers: list[dict[str, Any]] = []
        self.owner: dict[tuple[int, int, str], int] = {}  # (leaf, axis, role) -> its node

    # union-find over nodes
    def find(self, i: int) -> int:
        while self.nodes[i].parent is not None:
            i = self.nodes[i].parent
        return i

    def union(self, a: int, b: int) -> int:
        a, b = self.find(a), self.find(b)
        if a == b:
            return a
        na, nb = self.nodes[a], self.nodes[b]
        if na.size != nb.size:
            raise StructureError(f"a residual add joins {na.size} and {nb.size} channels.")
        nb.parent = a
        na.producers += nb.producers
        na.consumers += nb.consumers
        na.kernels += nb.kernels
        na.fixed = na.fixed or nb.fixed
        return a

    def new_node(self, size: int, fixed: bool = False) -> int:
        self.nodes.append(_Node(size, [], [], fixed))
        return len(self.nodes) - 1

    def fix(self, label: Any) -> None:
        if isinstance(label, _Act):
            for ax in label.axes:
                if ax is not None:
                    self.nodes[self.find(ax[0])].fixed = True

    def attach(self, node: int, chmap: np.ndarray, par: _Par, axis: int, role: str) -> None:
        """Records the leaves of ``par`` along ``axis`` as members of ``node``.

        A leaf axis that produces (or reads) channels of two nodes -- a layer
        called twice, tied weights -- joins them: one slice of the weights
        serves both.
        """
        for leaf, leaf_axis, _ in par.axes[axis]:
            prev = self.owner.setdefault((leaf, leaf_axis, role), node)
            if self.find(prev) != self.find(node):
                node = self.union(prev, node)
        n = self.nodes[self.find(node)]
        for leaf, leaf_axis, coord in par.axes[axis]:
            index = _channel_index(coord, chmap, self.shapes[leaf][leaf_axis])
            if index is None:
                continue
            ident = np.array_equal(index, np.arange(len(index))) and len(index) == n.size
            member = Member(self.names[leaf], leaf_axis, None if ident else tuple(map(int, index)))
            (n.producers if role == "producer" else n.consumers).append(member)

    # -- the interpreter -----------------------------------------------------

    def run(self, jaxpr: Any, labels: list[Any]) -> list[Any]:
        env: dict[Any, Any] = {}

        def read(v: Any) -> Any:
            if type(v).__name__ == "Literal":
                return None
            return env.get(v)

        for v, lab in zip(jaxpr.invars, labels, strict=True):
            env[v] = lab
        for v in jaxpr.constvars:
            env[v] = None
        for eqn in jaxpr.eqns:
            ins = [read(v) for v in eqn.invars]
            outs = self.eqn(eqn, ins)
            for v, lab in zip(eqn.outvars, outs, strict=True):
                env[v] = lab
        return [read(v) for v in jaxpr.outvars]

    def eqn(self, eqn: Any, ins: list[Any]) -> list[Any]:
        name = eqn.primitive.name
        shapes = [tuple(getattr(v.aval, "shape", ())) for v in eqn.invars]
        out_shape = tuple(eqn.outvars[0].aval.shape) if eqn.outvars else ()
        if all(x is None for x in ins):
            return [None] * len(eqn.outvars)
        sub = _subjaxpr(eqn)
        if sub is not None:
            return self.run(sub, ins)
        if name in _PASS:
            return [ins[0]]
        if name in _BINARY:
            return [self.elementwise(ins, shapes, out_shape)]
        if name == "dot_general":
            return [self.dot(eqn, ins, shapes, out_shape)]
        if name == "conv_general_dilated":
            return [self.conv(eqn, ins, shapes, out_shape)]
        if name == "reshape":
            return [self.reshape(ins[0], shapes[0], out_shape)]
        if name == "broadcast_in_dim":
            dims = eqn.params["broadcast_dimensions"]
            return [self.broadcast(ins[0], shapes[0], out_shape, dims)]
        if name == "transpose":
            perm = eqn.params["permutation"]
            return [_map_axes(ins[0], lambda axes: tuple(axes[p] for p in perm))]
        if name == "squeeze":
            dims = {d % len(shapes[0]) for d in eqn.params["dimensions"]}
            return [
                _map_axes(
                    ins[0], lambda axes: tuple(a for i, a in enumerate(axes) if i not in dims)
                )
            ]
        if name == "expand_dims":
            return [self.reshape(ins[0], shapes[0], out_shape)]
        if name == "slice":
            return [self.slice(ins[0], eqn.params)]
        if name == "concatenate":
            return [self.concat(ins, shapes, eqn.params["dimension"])]
        if name in _REDUCE or name.startswith("reduce_window") or name == "cumsum":
            return [self.reduce(eqn, ins[0], shapes[0])]
        if name == "pad":
            return [self.pad(ins[0], eqn.params["padding_config"])]
        # Anything else that touches a traced channel: its channels cannot be pruned.
        for lab in ins:
            self.fix(lab)
        if any(isinstance(x, _Par) for x in ins):
            raise StructureError(
                f"cannot follow parameters through {name!r}; declare the groups by hand "
                "(admmprune.groups.Structure)."
            )
        return [None] * len(eqn.outvars)

    def elementwise(
        self, ins: list[Any], shapes: list[tuple[int, ...]], out_shape: tuple[int, ...]
    ) -> Any:
        acts = [
            (x, s)
            for x, s in zip(ins, shapes, strict=True)
            if isinstance(x, _Act) and len(s) == len(out_shape)
        ]
        pars = [
            (x, s)
            for x, s in zip(ins, shapes, strict=True)
            if isinstance(x, _Par) and len(s) == len(out_shape)
        ]
        if not acts:  # parameters combined with parameters: a derived parameter
            if not pars:
                return None
            axes = []
            for a in range(len(out_shape)):
                srcs: tuple[tuple[int, int, np.ndarray], ...] = ()
                for p, s in pars:
                    if s[a] == out_shape[a]:
                        srcs += p.axes[a]
                axes.append(srcs)
            return _Par(tuple(axes))
        axes_out: list[tuple[int, np.ndarray] | None] = []
        for a in range(len(out_shape)):
            lab = None
            for act, s in acts:
                x = act.axes[a] if s[a] == out_shape[a] else None
                if x is None:
                    continue
                if lab is None:
                    lab = x
                elif not np.array_equal(lab[1], x[1]):
                    raise StructureError(
                        "an elementwise op joins channels in different orders; declare the "
                        "groups by hand."
                    )
                else:
                    lab = (self.union(lab[0], x[0]), lab[1])
            axes_out.append(lab)
            if lab is not None:
                for p, s in pars:
                    if s[a] == out_shape[a]:
                        self.attach(lab[0], lab[1], p, a, "producer")
        return _Act(tuple(axes_out))

    def dot(
        self, eqn: Any, ins: list[Any], shapes: list[tuple[int, ...]], out_shape: tuple[int, ...]
    ) -> Any:
        (lc, rc), (lb, rb) = eqn.params["dimension_numbers"]
        lhs, rhs = ins
        if isinstance(lhs, _Par) and isinstance(rhs, _Act):  # kernel @ x: swap roles
            return self.dot_swapped(eqn, ins, shapes, out_shape)
        if not (isinstance(rhs, _Par) and isinstance(lhs, _Act | type(None))):
            for x in ins:
                self.fix(x)
            return None
        if lhs is None:
            lhs = _Act((None,) * len(shapes[0]))
        return self._layer(lhs, rhs, shapes[0], shapes[1], lc, rc, lb, rb, out_shape, eqn)

    def dot_swapped(
        self, eqn: Any, ins: list[Any], shapes: list[tuple[int, ...]], out_shape: tuple[int, ...]
    ) -> Any:
        for x in ins:
            self.fix(x)
        raise StructureError(
            "a layer computes kernel @ x (parameters on the left of dot_general); declare "
            "the groups by hand."
        )

    def _layer(
        self,
        act: _Act,
        par: _Par,
        ashape: Any,
        pshape: Any,
        ac: Any,
        pc: Any,
        ab: Any,
        pb: Any,
        out_shape: Any,
        eqn: Any,
    ) -> Any:
        if ab or pb:
            self.fix(act)
            return None
        kernel_leaves = {src[0] for axis in par.axes for src in axis}
        kernel = "+".join(sorted(self.names[i] for i in kernel_leaves))
        in_node, in_pos = None, None
        for a, p in zip(ac, pc, strict=True):
            lab = act.axes[a]
            if lab is not None:
                if in_node is not None:
                    raise StructureError(f"{kernel}: contracts two channel axes.")
                in_node = self.find(lab[0])
                self.attach(in_node, lab[1], par, p, "consumer")
                in_pos = np.bincount(lab[1], minlength=self.nodes[in_node].size)
        free_a = [i for i in range(len(ashape)) if i not in ac]
        free_p = [i for i in range(len(pshape)) if i not in pc]
        out_axes: list[Any] = [act.axes[i] for i in free_a]
        out_node = None
        for p in free_p:
            node = self.new_node(pshape[p])
            self.nodes[node].kernels.append(kernel)
            self.attach(node, np.arange(pshape[p]), par, p, "producer")
            out_axes.append((node, np.arange(pshape[p])))
            out_node = node
        macs = int(np.prod(out_shape)) * int(np.prod([ashape[a] for a in ac]))
        self._record(
            kernel,
            macs,
            in_node,
            in_pos,
            int(np.prod([ashape[a] for a in ac])),
            out_node,
            [pshape[p] for p in free_p],
        )
        return _Act(tuple(out_axes))

    def _record(
        self,
        kernel: str,
        macs: int,
        in_node: Any,
        in_pos: Any,
        in_width: int,
        out_node: Any,
        out_dims: list[int],
    ) -> None:
        self.layers.append(
            {
                "kernel": kernel,
                "macs": macs,
                "in_node": in_node,
                "in_positions": tuple(int(x) for x in in_pos)
                if in_pos is not None
                else (in_width,),
                "out_node": out_node,
                "out_width": int(np.prod(out_dims)) if out_dims else 1,
            }
        )

    def conv(
        self, eqn: Any, ins: list[Any], shapes: list[tuple[int, ...]], out_shape: tuple[int, ...]
    ) -> Any:
        lhs, rhs = ins
        if not isinstance(rhs, _Par) or isinstance(lhs, _Par):
            for x in ins:
                self.fix(x)
            return None
        if lhs is None:
            lhs = _Act((None,) * len(shapes[0]))
        if eqn.params["feature_group_count"] != 1 or eqn.params["batch_group_count"] != 1:
            raise StructureError(
                "grouped or depthwise convolutions are not derived automatically; declare "
                "the groups by hand."
            )
        dn = eqn.params["dimension_numbers"]
        _l_b, l_f, *l_sp = dn.lhs_spec
        r_o, r_i, *r_sp = dn.rhs_spec
        _o_b, o_f, *_o_sp = dn.out_spec
        kernel = "+".join(sorted({self.names[s[0]] for axis in rhs.axes for s in axis}))
        in_node, in_pos = None, None
        lab = lhs.axes[l_f]
        if lab is not None:
            in_node = self.find(lab[0])
            self.attach(in_node, lab[1], rhs, r_i, "consumer")
            in_pos = np.bincount(lab[1], minlength=self.nodes[in_node].size) * int(
                np.prod([shapes[1][a] for a in r_sp])
            )
        for a in l_sp:
            if lhs.axes[a] is not None:
                self.fix(lhs)
        cout = shapes[1][r_o]
        node = self.new_node(cout)
        self.nodes[node].kernels.append(kernel)
        self.attach(node, np.arange(cout), rhs, r_o, "producer")
        axes: list[Any] = [None] * len(out_shape)
        axes[o_f] = (node, np.arange(cout))
        k = int(np.prod([shapes[1][a] for a in r_sp]))
        macs = int(np.prod(out_shape)) * k * shapes[0][l_f]
        self._record(kernel, macs, in_node, in_pos, k * shapes[0][l_f], node, [cout])
        return _Act(tuple(axes))

    def reshape(self, x: Any, shape: tuple[int, ...], new: tuple[int, ...]) -> Any:
        if x is None:
            return None
        segments = _segments(shape, new)
        if segments is None:
            return self._unsupported_reshape(x, shape, new)
        out: list[Any] = [None if isinstance(x, _Act) else () for _ in new]
        for ins, outs in segments:
            in_sizes = [shape[i] for i in ins]
            if isinstance(x, _Act):
                labeled = [i for i in ins if x.axes[i] is not None and shape[i] > 1]
                if not labeled:
                    continue
                if len(outs) == 1:
                    if len(labeled) > 1:
                        raise StructureError("a reshape merges two channel axes.")
                    node, chmap = x.axes[labeled[0]]
                    coord = _coords(in_sizes, ins.index(labeled[0]))
                    out[outs[0]] = (node, chmap[coord])
                elif len(ins) == 1:
                    big = [o for o in outs if new[o] > 1]
                    if len(big) == 1:
                        out[big[0]] = x.axes[ins[0]]
                    else:
                        return self._unsupported_reshape(x, shape, new)
                else:
                    return self._unsupported_reshape(x, shape, new)
            else:
                srcs = [(i, s) for i in ins for s in x.axes[i]]
                if not srcs:
                    continue
                if len(outs) == 1:
                    merged = []
                    for i, (leaf, la, coord) in srcs:
                        merged.append((leaf, la, coord[_coords(in_sizes, ins.index(i))]))
                    out[outs[0]] = tuple(merged)
                elif len(ins) == 1:
                    big = [o for o in outs if new[o] > 1]
                    if len(big) == 1:
                        out[big[0]] = x.axes[ins[0]]
                    else:
                        out_sizes = [new[o] for o in outs]
                        for j, o in enumerate(outs):
                            # position p of output axis j is row-major coordinate j of the split
                            flat = _flat_of(out_sizes, j)
                            out[o] = tuple(
                                (leaf, la, coord[flat]) for leaf, la, coord in x.axes[ins[0]]
                            )
                else:
                    raise StructureError("a reshape regroups parameter axes in a way not followed.")
        return _Act(tuple(out)) if isinstance(x, _Act) else _Par(tuple(out))

    def _unsupported_reshape(self, x: Any, shape: Any, new: Any) -> Any:
        if isinstance(x, _Par):
            raise StructureError(f"cannot follow a parameter reshape {shape} -> {new}.")
        self.fix(x)
        return _Act((None,) * len(new))

    def broadcast(self, x: Any, shape: Any, new: Any, dims: Any) -> Any:
        if isinstance(x, _Act):
            axes: list[Any] = [None] * len(new)
            for i, d in enumerate(dims):
                if shape[i] == new[d]:
                    axes[d] = x.axes[i]
            return _Act(tuple(axes))
        paxes: list[Any] = [()] * len(new)
        for i, d in enumerate(dims):
            if shape[i] == new[d]:
                paxes[d] = x.axes[i]
        return _Par(tuple(paxes))

    def slice(self, x: Any, params: Mapping[str, Any]) -> Any:
        starts, limits = params["start_indices"], params["limit_indices"]
        strides = params["strides"] or (1,) * len(starts)
        if isinstance(x, _Act):
            axes = []
            for a, lab in enumerate(x.axes):
                if lab is not None:
                    part = lab[1][starts[a] : limits[a] : strides[a]]
                    if len(part) != len(lab[1]):
                        # A fixed slice of channels reads fixed positions: the compact
                        # network would read other channels there. Not prunable.
                        self.nodes[self.find(lab[0])].fixed = True
                        lab = None
                    else:
                        lab = (lab[0], part)
                axes.append(lab)
            return _Act(tuple(axes))
        return _Par(
            tuple(
                tuple((leaf, la, c[starts[a] : limits[a] : strides[a]]) for leaf, la, c in srcs)
                for a, srcs in enumerate(x.axes)
            )
        )

    def concat(self, ins: list[Any], shapes: list[Any], dim: int) -> Any:
        if any(isinstance(x, _Par) for x in ins):
            raise StructureError("cannot follow a concatenation of parameters.")
        acts = [
            x if x is not None else _Act((None,) * len(s)) for x, s in zip(ins, shapes, strict=True)
        ]
        axes: list[Any] = []
        for a in range(len(shapes[0])):
            labs = [x.axes[a] for x in acts]
            if a == dim:
                if all(lab is None for lab in labs):
                    axes.append(None)
                    continue
                if any(lab is None for lab in labs) or len({self.find(lab[0]) for lab in labs}) > 1:
                    for x in acts:
                        self.fix(x)
                    axes.append(None)
                    continue
                axes.append((labs[0][0], np.concatenate([lab[1] for lab in labs])))
            else:
                lab = next((lab for lab in labs if lab is not None), None)
                for other in labs:
                    if other is not None and lab is not None:
                        lab = (self.union(lab[0], other[0]), lab[1])
                axes.append(lab)
        return _Act(tuple(axes))

    def reduce(self, eqn: Any, x: Any, shape: Any) -> Any:
        if isinstance(x, _Par):
            raise StructureError(f"cannot follow parameters through {eqn.primitive.name}.")
        name = eqn.primitive.name
        if name.startswith("reduce_window"):
            window = eqn.params["window_dimensions"]
            for a, lab in enumerate(x.axes):
                if lab is not None and window[a] != 1:
                    self.fix(x)
            return x
        if name == "cumsum":
            a = eqn.params["axis"]
            if x.axes[a] is not None:
                self.fix(x)
            return x
        axes = set(eqn.params["axes"])
        for a in axes:
            if x.axes[a] is not None:
                self.fix(x)
        return _Act(tuple(lab for a, lab in enumerate(x.axes) if a not in axes))

    def pad(self, x: Any, config: Any) -> Any:
        if isinstance(x, _Par):
            raise StructureError("cannot follow parameters through pad.")
        for (lo, hi, interior), lab in zip(config, x.axes, strict=True):
            if lab is not None and (lo or hi or interior):
                self.fix(x)
                return _Act((None,) * len(x.axes))
        return x


def _subjaxpr(eqn: Any) -> Any:
    for key in ("jaxpr", "call_jaxpr", "fun_jaxpr"):
        sub = eqn.params.get(key)
        if sub is not None:
            return getattr(sub, "jaxpr", sub)
    return None


def _map_axes(x: Any, f: Any) -> Any:
    if x is None:
        return None
    return type(x)(f(x.axes))


def _channel_index(coord: np.ndarray, chmap: np.ndarray, size: int) -> np.ndarray | None:
    """The channel of every coordinate of a leaf axis, if ``coord -> chmap`` is a function."""
    index = np.full(size, -1)
    index[coord] = chmap
    # every position with the same coordinate must carry the same channel
    if not np.array_equal(index[coord], chmap) or (index < 0).any():
        return None
    return index


def _segments(
    shape: tuple[int, ...], new: tuple[int, ...]
) -> list[tuple[list[int], list[int]]] | None:
    """Pairs runs of input and output axes with equal products (a reshape's axis map)."""
    out, i, j = [], 0, 0
    while i < len(shape) or j < len(new):
        ins, outs = [], []
        pi = pj = 1
        if i < len(shape):
            ins.append(i)
            pi = shape[i]
            i += 1
        if j < len(new):
            outs.append(j)
            pj = new[j]
            j += 1
        while pi != pj:
            if pi < pj and i < len(shape):
                ins.append(i)
                pi *= shape[i]
                i += 1
            elif pj < pi and j < len(new):
                outs.append(j)
                pj *= new[j]
                j += 1
            else:
                return None
        # trailing size-1 axes join the current segment
        out.append((ins, outs))
    return out


def _coords(sizes: Sequence[int], axis: int) -> np.ndarray:
    """Coordinate ``axis`` of every row-major position of a block of ``sizes``."""
    stride = int(np.prod(sizes[axis + 1 :]))
    return (np.arange(int(np.prod(sizes))) // stride) % sizes[axis]


def _flat_of(sizes: Sequence[int], axis: int) -> np.ndarray:
    stride = int(np.prod(sizes[axis + 1 :]))
    return np.arange(sizes[axis]) * stride


def derive(
    model: Any,
    input_shape: tuple[int, ...],
    *,
    params: PyTree | None = None,
    apply: Any = None,
) -> Structure:
    """Derives the channel and branch groups of an nnx model, with its layers' MACs.

    Traces one call (``jax.make_jaxpr`` of the model on one example of
    ``input_shape``, batch axis excluded) and follows every array axis that
    carries channels: a dense or conv layer's output axis starts a group;
    elementwise ops with parameters (bias, BatchNorm) add producers;
    contracting a channel axis with a kernel adds consumers; residual adds
    join groups; flatten and im2col slicing map positions to channels. A
    channel axis that ends in the model's output, is reduced over (a softmax
    or layer norm), or passes an op this tracer does not follow is marked
    unprunable (its group is dropped) -- conservative, never wrong.
    ``models.Residual`` submodules give branch groups.

    Args:
        model: an nnx module (in eval mode for BatchNorm statistics to appear).
        input_shape: one example's shape.
        params, apply: the split of ``model`` (default: :func:`admmprune.nnx.split_nnx`).

    Raises:
        StructureError: for a model the tracer cannot follow (say which op);
            declare a :class:`Structure` by hand then.
    """
    from flax import nnx

    from admmprune import models
    from admmprune.nnx import split_nnx

    residual = getattr(models, "Residual", ())

    if params is None or apply is None:
        params, apply = split_nnx(model, train=False)
    names = leaf_names(params)
    leaves = jax.tree.leaves(params)
    shapes = [tuple(np.shape(x)) for x in leaves]
    x = jax.ShapeDtypeStruct((1, *input_shape), jnp.float32)
    try:
        closed = jax.make_jaxpr(apply)(params, x)
    except (TypeError, ValueError) as e:
        from admmprune.layers import input_shape_error

        raise input_shape_error(input_shape, e) from None
    tracer = _Tracer(names, shapes)
    labels: list[Any] = [
        _Par(tuple(((i, a, np.arange(n)),) for a, n in enumerate(s))) for i, s in enumerate(shapes)
    ]
    labels.append(None)
    outs = tracer.run(closed.jaxpr, labels)
    for lab in outs:
        tracer.fix(lab)
    roots = sorted({tracer.find(i) for i in range(len(tracer.nodes))})
    group_names: dict[int, str] = {}
    groups = []
    for r in roots:
        node = tracer.nodes[r]
        if node.fixed or node.size <= 1 or not node.consumers:
            continue
        name = "+".join(dict.fromkeys(node.kernels))
        group_names[r] = name
        groups.append(
            ChannelGroup(
                name,
                node.size,
                tuple(dict.fromkeys(node.producers)),
                tuple(dict.fromkeys(node.consumers)),
            )
        )
    branches = []
    for path, module in nnx.iter_modules(model):
        if residual and isinstance(module, residual):
            prefix = "/".join(map(str, path)) + "/branch/"
            inside = tuple(n for n in names if n.startswith(prefix))
            if inside:
                branches.append(BranchGroup(prefix[:-1], inside))
    layers = []
    for rec in tracer.layers:
        i = None if rec["in_node"] is None else tracer.find(rec["in_node"])
        o = None if rec["out_node"] is None else tracer.find(rec["out_node"])
        gi, go = (
            group_names.get(i) if i is not None else None,
            group_names.get(o) if o is not None else None,
        )
        in_pos = rec["in_positions"] if gi is not None else (sum(rec["in_positions"]),)
        out_width = tracer.nodes[o].size if o is not None else rec["out_width"]
        branch = next(
            (b.name for b in branches if any(k in b.leaves for k in rec["kernel"].split("+"))), None
        )
        layers.append(
            LayerCost(rec["kernel"], rec["macs"], gi, go, tuple(in_pos), out_width, branch)
        )
    stats = set(leaf_names(nnx.to_pure_dict(nnx.state(model, nnx.BatchStat))))
    if stats:
        groups = [
            dataclasses.replace(
                g,
                producers=tuple(
                    dataclasses.replace(m, statistic=m.leaf in stats) for m in g.producers
                ),
            )
            for g in groups
        ]
    structure = Structure(tuple(groups), tuple(branches), tuple(layers))
    structure.check(params)
    return structure


def kept_counts(structure: Structure, masks: PyTree) -> dict[str, int]:
    """Kept channels per group of a masked network."""
    channels, _ = structure.kept(masks)
    return {k: int(v.sum()) for k, v in channels.items()}


__all__ = [
    "BranchGroup",
    "ChannelGroup",
    "LayerCost",
    "Member",
    "Structure",
    "StructureError",
    "derive",
    "kept_counts",
]
