"""Jacobian-vector products of a traced graph (forward mode, graph only).

``jvp(sources, tangent_sets, targets)`` walks the ops of the current graph
that lie on a path from ``sources`` to ``targets``, in topological order,
and builds for each op the tangent of its outputs from the tangents of its
inputs:

    ṫ(y) = Σᵢ ∂y/∂xᵢ · ṫ(xᵢ)        for y = op(x₁, …, xₙ),

one set of tangents per direction, all from one primal graph (the forward
pass already built: nothing is evaluated twice). The tangents' ops may be
built in a graph nested in the primal one (a conditional's branch, which
then computes them only when taken): the walk follows the tensors that
graph captures back to the primal ones. Common ops have
hand-written rules: ops linear in some inputs (reshapes, slices, sums,
additions) apply themselves to the tangents; bilinear ops (products,
matrix products, convolutions) take f(ẋ, w) + f(x, ẇ); elementwise
functions multiply by their derivative. Any other op differentiates its
registered gradient function once more (the transposed vector-Jacobian
product, as ``tf.autodiff.ForwardAccumulator`` does for every op), so
every op with a second-order gradient is supported, loops included (a
recurrent layer's TensorLists carry tangents like float tensors).

``tf.autodiff.ForwardAccumulator`` would trace that transposed gradient
as one function per op and shape and re-evaluate the primal per
direction; here the common ops cost one or two ops per direction, which
is cheaper to trace and to run. Eager code has no graph to walk: there
the curvature products use ``ForwardAccumulator`` (``curvature``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence

import tensorflow as tf

Tangent = Optional[tf.Tensor]

# Ops whose outputs are linear in the inputs at these positions (the other
# inputs configure them: shapes, axes, indices, permutations). None: all.
_LINEAR_INPUTS = {
    "Identity": (0,), "Snapshot": (0,), "Cast": (0,), "Reshape": (0,), "Transpose": (0,),
    "ExpandDims": (0,), "Squeeze": (0,), "StridedSlice": (0,), "Slice": (0,), "GatherV2": (0,),
    "Pad": (0,), "MirrorPad": (0,), "Tile": (0,), "BroadcastTo": (0,), "Sum": (0,), "Mean": (0,),
    "Neg": (0,), "AddV2": (0, 1), "Add": (0, 1), "Sub": (0, 1), "BiasAdd": (0, 1), "AddN": None,
    "Pack": None, "Unpack": (0,), "SplitV": (0,), "Split": (1,), "AvgPool": (0,), "AvgPool3D": (0,),
    "SelectV2": (1, 2), "Select": (1, 2), "ReverseV2": (0,), "Roll": (0,), "Cumsum": (0,),
    "DepthToSpace": (0,), "SpaceToDepth": (0,), "MatrixBandPart": (0,), "ConcatV2": "all but last",
}

# Ops bilinear in the inputs at these two positions: ẏ = f(ẋ, w) + f(x, ẇ).
_BILINEAR_INPUTS = {
    "Mul": (0, 1), "MatMul": (0, 1), "BatchMatMul": (0, 1), "BatchMatMulV2": (0, 1),
    "BatchMatMulV3": (0, 1), "Conv2D": (0, 1), "Conv3D": (0, 1), "DepthwiseConv2dNative": (0, 1),
    "Conv2DBackpropInput": (1, 2), "Conv3DBackpropInputV2": (1, 2),
}

# Elementwise functions y = f(x): ẏ = f'(x) ẋ, from x, y and ẋ.
_SQRT_2_OVER_PI = 2.0 / math.sqrt(math.pi)
_ELEMENTWISE = {
    "Relu": lambda x, y, t: tf.raw_ops.ReluGrad(gradients=t, features=x),
    "Relu6": lambda x, y, t: tf.raw_ops.Relu6Grad(gradients=t, features=x),
    "Elu": lambda x, y, t: tf.raw_ops.EluGrad(gradients=t, outputs=y),
    "Selu": lambda x, y, t: tf.raw_ops.SeluGrad(gradients=t, outputs=y),
    "Softplus": lambda x, y, t: tf.raw_ops.SoftplusGrad(gradients=t, features=x),
    "Sigmoid": lambda x, y, t: tf.raw_ops.SigmoidGrad(y=y, dy=t),
    "Tanh": lambda x, y, t: tf.raw_ops.TanhGrad(y=y, dy=t),
    "Rsqrt": lambda x, y, t: tf.raw_ops.RsqrtGrad(y=y, dy=t),
    "Sqrt": lambda x, y, t: tf.raw_ops.SqrtGrad(y=y, dy=t),
    "Reciprocal": lambda x, y, t: tf.raw_ops.ReciprocalGrad(y=y, dy=t),
    "Inv": lambda x, y, t: tf.raw_ops.ReciprocalGrad(y=y, dy=t),
    "Exp": lambda x, y, t: y * t,
    "Log": lambda x, y, t: t / x,
    "Log1p": lambda x, y, t: t / (1 + x),
    "Square": lambda x, y, t: 2 * x * t,
    "Abs": lambda x, y, t: tf.sign(x) * t,
    "Erf": lambda x, y, t: tf.constant(_SQRT_2_OVER_PI, x.dtype) * tf.exp(-tf.square(x)) * t,
    "Erfc": lambda x, y, t: -tf.constant(_SQRT_2_OVER_PI, x.dtype) * tf.exp(-tf.square(x)) * t,
    "Sin": lambda x, y, t: tf.cos(x) * t,
    "Cos": lambda x, y, t: -tf.sin(x) * t,
    "Softmax": lambda x, y, t: y * (t - tf.reduce_sum(y * t, -1, keepdims=True)),
    "LogSoftmax": lambda x, y, t: t - tf.reduce_sum(tf.exp(y) * t, -1, keepdims=True),
}

# Ops whose outputs do not change with their inputs (or are not differentiated).
_CONSTANT = {"StopGradient", "ZerosLike", "OnesLike", "Shape", "ShapeN", "Size", "Rank",
             "Floor", "Ceil", "Round", "Sign"}


def jvp(sources: Sequence[tf.Tensor], tangent_sets: Sequence[Sequence[Tangent]],
        targets: Sequence[tf.Tensor]) -> list[list[tf.Tensor]]:
    """The tangents of ``targets`` for each set of source tangents.

    Args:
      sources: tensors of the primal graph (the current one, or one the
        current graph is nested in, e.g. a conditional's branch; not
        captured copies), or resource handles of variables in it: every
        read of a handle (``ReadVariableOp``, ``ResourceGather``) has its
        tangent. The tangents' ops are built in the current graph.
      tangent_sets: K lists, each one tangent per source (its shape, or None
        for zero).
      targets: tensors computed from ``sources`` in the primal graph.

    Returns:
      K lists, one tangent per target (zeros where a target does not depend
      on the sources), each with its target's shape and dtype.
    """
    resolve = _capture_resolver(sources)
    tangents = {}
    for i, source in enumerate(sources):
        dtype = None if source.dtype == tf.resource else source.dtype
        vectors = [None if ts[i] is None else tf.cast(ts[i], dtype or ts[i].dtype)
                   for ts in tangent_sets]
        if any(v is not None for v in vectors):
            tangents[source.ref()] = vectors
    for op in _ops_between(sources, targets, resolve):
        inputs = [tangents.get(resolve(x).ref()) for x in op.inputs]
        if all(t is None for t in inputs):
            continue
        # Taken first: differentiating some ops (While) adds outputs to them.
        outputs = list(op.outputs)
        input_sets = [[None if t is None else t[k] for t in inputs]
                      for k in range(len(tangent_sets))]
        per_direction = _op_tangent_sets(op, outputs, input_sets)
        for index, output in enumerate(outputs):
            vectors = [outs[index] for outs in per_direction]
            if any(v is not None for v in vectors):
                tangents[output.ref()] = vectors
    return [
        [_or_zeros(tangents[resolve(t).ref()][k] if resolve(t).ref() in tangents else None, t)
         for t in targets]
        for k in range(len(tangent_sets))
    ]


def draws_random_numbers(targets: Sequence[tf.Tensor]) -> bool:
    """Whether any op the targets depend on draws random numbers (dropout,
    noise layers): another evaluation of the same graph would differ."""
    visited, stack = set(), [t.op for t in targets]
    while stack:
        op = stack.pop()
        if op in visited:
            continue
        if any(word in op.type for word in ("Random", "Multinomial", "TruncatedNormal")):
            return True
        visited.add(op)
        stack.extend(x.op for x in op.inputs)
    return False


def _capture_resolver(sources):
    """x -> the tensor of an outer graph that x captures, through every
    graph the current one is nested in (a conditional's branch captures the
    primal tensors it reads), else x itself; sources stay as they are."""
    outer = {}
    graph = tf.compat.v1.get_default_graph()
    while graph is not None:
        for external, internal in getattr(graph, "captures", ()):
            if tf.is_symbolic_tensor(external):
                outer[internal.ref()] = external
        graph = getattr(graph, "outer_graph", None)
    source_refs = {s.ref() for s in sources}

    def resolve(x):
        while x.ref() not in source_refs and x.ref() in outer:
            x = outer[x.ref()]
        return x

    return resolve


def _ops_between(sources, targets, resolve) -> list[tf.Operation]:
    """The ops on a path from a source to a target, in topological order:
    a depth-first post-order over the targets' ancestors (through captured
    tensors: ``resolve``), keeping the ops with an input that is a source
    or the output of a kept op."""
    source_refs = {s.ref() for s in sources}
    kept, visited, order = set(), set(), []
    stack = [(resolve(t).op, False) for t in targets]
    while stack:
        op, expanded = stack.pop()
        inputs = [resolve(x) for x in op.inputs]
        if expanded:
            if any(x.ref() in source_refs or x.op in kept for x in inputs):
                kept.add(op)
                order.append(op)
            continue
        if op in visited:
            continue
        visited.add(op)
        stack.append((op, True))
        stack.extend((x.op, False) for x in inputs if x.op not in visited)
    return order


def _is_differentiable(tensor) -> bool:
    """Floating or complex, or a variant (a TensorList of a loop's values)."""
    return tensor.dtype.is_floating or tensor.dtype.is_complex or tensor.dtype == tf.variant


def _op_tangent_sets(op, outputs, tangent_sets):
    """The tangents of ``outputs`` (None: zero) for each direction's input
    tangents: a hand-written rule where one applies, else the generic rule
    for all directions at once (one gradient graph)."""
    results = [_op_tangents(op, outputs, tangents) for tangents in tangent_sets]
    generic = [k for k, r in enumerate(results) if r is None]
    if generic:
        computed = _transposed_gradient(op, outputs, [tangent_sets[k] for k in generic])
        for k, tangents in zip(generic, computed):
            results[k] = tangents
    return results


def _op_tangents(op: tf.Operation, outputs, tangents: list[Tangent]) -> Optional[list[Tangent]]:
    """The tangents of ``outputs`` (None: zero) for one direction by a
    hand-written rule, or None if no rule applies."""
    if all(t is None for t in tangents) or op.type in _CONSTANT:
        return [None] * len(outputs)
    if op.type == "Identity" and outputs[0].dtype == tf.resource:  # a handle passed on
        return [tangents[0]]
    if not any(_is_differentiable(y) for y in outputs):
        return [None] * len(outputs)
    if op.type == "ReadVariableOp":  # the tangent of a variable (a source handle)
        return [tf.cast(tangents[0], op.outputs[0].dtype)]
    if op.type == "ResourceGather":
        return [tf.gather(tf.cast(tangents[0], op.outputs[0].dtype), op.inputs[1],
                          batch_dims=op.get_attr("batch_dims"))]
    if op.type in _LINEAR_INPUTS:
        linear = _linear_positions(op)
        if all(tangents[i] is None for i in range(len(tangents)) if i not in linear):
            return _linear(op, tangents, linear)
    elif op.type in _BILINEAR_INPUTS:
        return [_bilinear(op, tangents, *_BILINEAR_INPUTS[op.type])]
    elif op.type == "Einsum":
        return [_einsum(op, tangents)]
    elif op.type in _ELEMENTWISE and len(op.inputs) == 1:
        x, y = op.inputs[0], op.outputs[0]
        return [_ELEMENTWISE[op.type](x, y, tangents[0])]
    elif op.type in ("RealDiv", "Div"):
        return [_divide(op, tangents)]
    elif op.type == "MaxPool" and op.get_attr("padding") in (b"SAME", b"VALID"):
        return [_max_pool(op, tangents[0])]
    elif op.type == "SquaredDifference":
        a, b = op.inputs
        difference = _or_zeros(tangents[0], a) - _or_zeros(tangents[1], b)
        return [2 * (a - b) * difference]
    return None


def _linear_positions(op):
    spec = _LINEAR_INPUTS[op.type]
    if spec is None:
        return tuple(range(len(op.inputs)))
    if spec == "all but last":
        return tuple(range(len(op.inputs) - 1))
    return spec


def _or_zeros(tangent, like):
    return tf.zeros_like(like) if tangent is None else tangent


def _linear(op, tangents, linear):
    """ẏ = f(ẋ) with the configuration inputs unchanged. An addition with
    one tangent broadcast to the output passes it on without adding zeros."""
    if op.type in ("AddV2", "Add", "BiasAdd") and sum(tangents[i] is not None for i in linear) == 1:
        tangent = next(t for t in tangents if t is not None)
        if tangent.shape == op.outputs[0].shape and tangent.shape.is_fully_defined():
            return [tangent]
    inputs = [
        (_or_zeros(tangents[i], x) if i in linear else x) for i, x in enumerate(op.inputs)
    ]
    return _recreate(op, inputs)


def _bilinear(op, tangents, i, j):
    terms = []
    for position in (i, j):
        if tangents[position] is not None:
            inputs = list(op.inputs)
            inputs[position] = tangents[position]
            terms.append(_recreate(op, inputs)[0])
    return terms[0] if len(terms) == 1 else terms[0] + terms[1]


def _einsum(op, tangents):
    """ẏ = Σᵢ einsum(x₁, …, ẋᵢ, …, xₙ)."""
    equation = op.get_attr("equation").decode()
    terms = []
    for position, tangent in enumerate(tangents):
        if tangent is not None:
            inputs = list(op.inputs)
            inputs[position] = tangent
            terms.append(tf.einsum(equation, *inputs))
    return tf.add_n(terms)


def _divide(op, tangents):
    """y = a / b: ẏ = (ȧ − y ḃ) / b."""
    (a, b), y = op.inputs, op.outputs[0]
    numerator = _or_zeros(tangents[0], a) if tangents[1] is None else (
        _or_zeros(tangents[0], a) - y * tangents[1])
    return numerator / b


def _max_pool(op, tangent):
    """y = max_pool(x): ẏ takes ẋ at each window's maximum, TensorFlow's
    MaxPoolGradGrad(x, y, ẋ) (what the generic rule builds, without the
    graph around it); in float32 for 16-bit x, which XLA on CPU has no
    kernel of it for. Where y has x's shape ('SAME' at stride 1, or along
    dimensions of size 1), TensorFlow's CPU kernel may write its output into
    ẋ's buffer before reading it (all zeros): there x and ẋ are padded first
    (k − 1 in all along each dimension, 'SAME''s padding there), x with its
    dtype's lowest value, so that 'VALID' windows over them are x's 'SAME'
    ones."""
    x, y = op.inputs[0], op.outputs[0]
    dtype = tf.float32 if x.dtype in (tf.float16, tf.bfloat16) else x.dtype
    x, tangent = tf.cast(x, dtype), tf.cast(tangent, dtype)
    ksize, strides = op.get_attr("ksize"), op.get_attr("strides")
    padding = op.get_attr("padding")
    same_shape = all(s == 1 for s in strides) or (
        x.shape.is_fully_defined() and x.shape == y.shape)
    if same_shape:
        if all(k == 1 for k in ksize):
            return tf.cast(tangent, y.dtype)
        if padding == b"SAME":
            pads = [[(k - 1) // 2, k - 1 - (k - 1) // 2] for k in ksize]
            x = tf.pad(x, pads, constant_values=dtype.min)
            tangent = tf.pad(tangent, pads)
            padding = b"VALID"
    tangent = tf.raw_ops.MaxPoolGradGrad(
        orig_input=x, orig_output=tf.cast(y, dtype), grad=tangent, ksize=ksize, strides=strides,
        padding=padding, data_format=op.get_attr("data_format"))
    return tf.cast(tangent, y.dtype)


def _transposed_gradient(op, outputs, tangent_sets):
    """The generic rule: with the op's registered gradient g(u) = Jᵀu,
    linear in u, ẏ = J ẋ = ∂(g(u) · ẋ)/∂u; g is built once for all
    directions."""
    distinct = {}  # an input used at several positions: one gradient, one tangent
    for position, x in enumerate(op.inputs):
        if any(ts[position] is not None for ts in tangent_sets):
            distinct.setdefault(x.ref(), (x, position))
    sources = [x for x, _ in distinct.values()]
    differentiable = [y for y in outputs if _is_differentiable(y)]
    upstream = [tf.zeros_like(y) for y in differentiable]
    # The op's own partial derivatives: no path from one input through
    # another (y = op(x, f(x)) has ∂y/∂x ≠ dy/dx), so every input is held.
    grads = tf.gradients(differentiable, sources, grad_ys=upstream, stop_gradients=list(op.inputs),
                         unconnected_gradients=tf.UnconnectedGradients.ZERO)
    results = []
    for tangents in tangent_sets:
        source_tangents = [tf.cast(_or_zeros(tangents[position], x), g.dtype)
                           for g, (x, position) in zip(grads, distinct.values())]
        output_tangents = tf.gradients(grads, upstream, grad_ys=source_tangents,
                                       unconnected_gradients=tf.UnconnectedGradients.ZERO)
        by_output = dict(zip((y.ref() for y in differentiable), output_tangents))
        results.append([by_output.get(y.ref()) for y in outputs])
    return results


def _recreate(op: tf.Operation, inputs: list[tf.Tensor]) -> list[tf.Tensor]:
    """A new op of ``op``'s type and attributes on ``inputs`` (its outputs),
    in the current graph; the attributes TensorFlow keeps for itself
    (names starting with ``_``, e.g. colocation) are not copied."""
    attrs = {k: v for k, v in op.node_def.attr.items() if not k.startswith("_")}
    new = tf.compat.v1.get_default_graph().create_op(
        op.type, inputs, [y.dtype for y in op.outputs], attrs=attrs
    )
    return list(new.outputs)
