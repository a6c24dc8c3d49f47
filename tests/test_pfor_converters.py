"""Forward mode's pfor converters (tf_bilevel/estimators/_pfor*.py) against the ops column by column.

`tf.vectorized_map` over N tangent columns meets ops with one operand per column and the other
the primal's. Each converter is checked against the same op applied to each column separately,
in the same mode (eager, graph, XLA: TF's kernels and XLA break max-pool ties differently), and
its graph against TF's fallbacks (a While loop over the columns, or the shared operand tiled).
"""

import re

import numpy as np
import pytest
import tensorflow as tf

from tf_bilevel.estimators import _pfor

RNG = np.random.default_rng(5)
COLUMNS = 3
MODES = ["eager", "graph", "xla"]


@pytest.fixture(autouse=True, scope="module")
def converters():
    _pfor.install()


def op_types(concrete_function) -> list:
    """The op types of a traced function and of every function it calls (XLA wraps pfor in one)."""
    graph_def = concrete_function.graph.as_graph_def()
    return [node.op for node in graph_def.node] + [
        node.op for function in graph_def.library.function for node in function.node_def
    ]


def vectorized_and_looped(fn, per_column, mode):
    """(vectorized_map(fn), the columns one by one stacked, op types of the vectorized graph)."""
    if mode == "eager":
        looped = tf.stack([fn(per_column[n]) for n in range(COLUMNS)])
        traced = tf.function(lambda: tf.vectorized_map(fn, per_column))
        return tf.vectorized_map(fn, per_column), looped, op_types(traced.get_concrete_function())
    jit = mode == "xla"
    vectorized = tf.function(lambda: tf.vectorized_map(fn, per_column), jit_compile=jit)
    looped = tf.function(lambda: tf.stack([fn(per_column[n]) for n in range(COLUMNS)]), jit_compile=jit)
    return vectorized(), looped(), op_types(vectorized.get_concrete_function())


# -- convolutions: the per-column operand folded into a channel axis ---------------------------------

@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("padding,stride", [("VALID", 1), ("SAME", 2)])
@pytest.mark.parametrize("which", ["conv2d with per-column filters", "input gradient with per-column filters",
                                   "filter gradient with per-column inputs"])
def test_convolutions_with_one_per_column_operand_are_vectorized_without_a_loop(which, padding, stride, mode):
    """pfor's own converters loop over the columns when a convolution's filter (or the filter
    gradient's input) is batched; forward mode installs ones that fold the columns into a channel
    axis: the same values, no While op (XLA:CPU runs convolutions in loops many times slower)."""
    x = tf.constant(RNG.normal(size=(4, 9, 9, 2)), tf.float32)
    kernel = tf.constant(RNG.normal(size=(3, 3, 2, 5)), tf.float32)
    dy = tf.constant(RNG.normal(size=tf.nn.conv2d(x, kernel, stride, padding).shape), tf.float32)
    strides = [1, stride, stride, 1]
    per_column, fn = {
        "conv2d with per-column filters": (
            RNG.normal(size=(COLUMNS, 3, 3, 2, 5)), lambda k: tf.nn.conv2d(x, k, stride, padding)),
        "input gradient with per-column filters": (
            RNG.normal(size=(COLUMNS, 3, 3, 2, 5)), lambda k: tf.nn.conv2d_transpose(dy, k, x.shape, stride, padding)),
        "filter gradient with per-column inputs": (
            RNG.normal(size=(COLUMNS, 4, 9, 9, 2)),
            lambda xd: tf.compat.v1.nn.conv2d_backprop_filter(xd, [3, 3, 2, 5], dy, strides, padding)),
    }[which]
    got, want, types = vectorized_and_looped(fn, tf.constant(per_column, tf.float32), mode)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5, atol=1e-5)
    assert not [t for t in types if "While" in t], types

@pytest.mark.parametrize("padding,stride", [("VALID", 1), ("SAME", 2), ([[0, 0], [1, 2], [0, 1], [0, 0]], 2)])
def test_filter_gradient_under_xla_is_a_canonical_convolution(padding, stride):
    """Under XLA inside a while loop (the inner-step loop) the filter gradient with per-column inputs
    is a convolution in XLA:CPU's canonical layout (NHWC input, HWIO filter), which XLA:CPU runs with
    Eigen also inside a loop; TF's op lowers to a batch-as-feature convolution that XLA:CPU only
    canonicalizes outside loops (inside: a naive loop nest, measured ~300x slower), so outside a loop
    TF's op is kept."""
    x = tf.constant(RNG.normal(size=(4, 9, 9, 2)), tf.float32)
    dy = tf.constant(RNG.normal(size=tf.nn.conv2d(x, tf.zeros([3, 3, 2, 5]), stride, padding).shape), tf.float32)
    per_column = tf.constant(RNG.normal(size=(COLUMNS, 4, 9, 9, 2)), tf.float32)
    strides = [1, stride, stride, 1]
    fn = lambda xd: tf.compat.v1.nn.conv2d_backprop_filter(xd, [3, 3, 2, 5], dy, strides, padding)  # noqa: E731
    def in_a_loop():
        zeros = tf.zeros([COLUMNS, 3, 3, 2, 5])
        return tf.while_loop(lambda i, _: i < 1, lambda i, _: (i + 1, tf.vectorized_map(fn, per_column)),
                             (tf.constant(0), zeros), maximum_iterations=1)[1]

    vectorized = tf.function(in_a_loop, jit_compile=True, autograph=False)
    outside = tf.function(lambda: tf.vectorized_map(fn, per_column), jit_compile=True, autograph=False)
    looped = tf.function(lambda: tf.stack([fn(per_column[n]) for n in range(COLUMNS)]), jit_compile=True)
    np.testing.assert_allclose(vectorized().numpy(), looped().numpy(), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(outside().numpy(), looped().numpy(), rtol=1e-5, atol=1e-5)
    labels = re.findall(r"dim_labels=([^,\s]+)", vectorized.experimental_get_compiler_ir()(stage="hlo"))
    assert labels == ["b01f_01io->b01f"], labels
    labels = re.findall(r"dim_labels=([^,\s]+)", outside.experimental_get_compiler_ir()(stage="hlo"))
    assert labels == ["f01b_i01o->01bf"], labels


# -- max pooling's backward ops: a mask of the primal's shape, computed once -------------------------

POOLINGS = [  # (height, width, window = stride, padding): remainders, SAME padding on both sides
    (8, 8, 2, "VALID"), (9, 7, 2, "VALID"), (9, 7, 2, "SAME"), (10, 11, 3, "SAME"), (5, 5, 4, "SAME"),
]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("height,width,window,padding", POOLINGS)
@pytest.mark.parametrize("op", ["MaxPoolGrad", "MaxPoolGradGrad"])
def test_max_pool_gradients_with_per_column_values_equal_the_op_per_column(op, height, width, window, padding, mode):
    """ReLU outputs (many tied zeros in a window) pooled; the routed values per column. Equal
    bit for bit to the op column by column (ties broken as the op breaks them), and the shared
    input is not tiled N times (TF's converter)."""
    x = tf.constant(np.maximum(RNG.normal(size=(3, height, width, 4)), 0), tf.float32)
    y = tf.nn.max_pool2d(x, window, window, padding)
    attrs = dict(ksize=[1, window, window, 1], strides=[1, window, window, 1], padding=padding)
    routed_shape = y.shape if op == "MaxPoolGrad" else x.shape
    per_column = tf.constant(RNG.normal(size=(COLUMNS, *routed_shape)), tf.float32)
    raw = getattr(tf.raw_ops, op)
    got, want, types = vectorized_and_looped(lambda g: raw(orig_input=x, orig_output=y, grad=g, **attrs), per_column, mode)
    assert got.shape == want.shape
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert "Tile" not in types and not [t for t in types if "While" in t], types


@pytest.mark.parametrize("op", ["MaxPoolGrad", "MaxPoolGradGrad"])
def test_max_pool_gradients_with_overlapping_windows_fall_back_to_tf(op):
    """3×3 windows with stride 2 overlap: TF's own converter (the input tiled), the same values."""
    x = tf.constant(RNG.normal(size=(2, 9, 9, 3)), tf.float32)
    y = tf.nn.max_pool2d(x, 3, 2, "VALID")
    attrs = dict(ksize=[1, 3, 3, 1], strides=[1, 2, 2, 1], padding="VALID")
    per_column = tf.constant(RNG.normal(size=(COLUMNS, *(y.shape if op == "MaxPoolGrad" else x.shape))), tf.float32)
    raw = getattr(tf.raw_ops, op)
    got, want, types = vectorized_and_looped(lambda g: raw(orig_input=x, orig_output=y, grad=g, **attrs), per_column, "graph")
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert "Tile" in types


def test_max_pool_gradients_pass_non_finite_values_as_the_op_does():
    """Selected, not multiplied by a 0/1 mask: an inf or nan in an unselected position stays out."""
    x = tf.constant(RNG.normal(size=(2, 6, 6, 3)), tf.float32)
    y = tf.nn.max_pool2d(x, 2, 2, "VALID")
    attrs = dict(ksize=[1, 2, 2, 1], strides=[1, 2, 2, 1], padding="VALID")
    for op, shape in [("MaxPoolGrad", y.shape), ("MaxPoolGradGrad", x.shape)]:
        values = RNG.normal(size=(COLUMNS, *shape))
        values[0, 0, 0, 0, 0], values[1, 1, 2, 2, 1] = np.inf, np.nan
        raw = getattr(tf.raw_ops, op)
        got, want, _ = vectorized_and_looped(lambda g: raw(orig_input=x, orig_output=y, grad=g, **attrs),
                                             tf.constant(values, tf.float32), "graph")
        np.testing.assert_array_equal(got.numpy(), want.numpy())


# -- ReLU's gradient: a mask of the primal's features, computed once ---------------------------------

@pytest.mark.parametrize("mode", MODES)
def test_relu_gradient_with_per_column_gradients_equals_the_op_per_column(mode):
    features = RNG.normal(size=(4, 5, 6))
    features[0, 0, :3] = 0.0  # ReLU's kink: ReluGrad passes nothing at 0
    features = tf.constant(features, tf.float32)
    grads = RNG.normal(size=(COLUMNS, 4, 5, 6))
    grads[1, 2, 3, 4] = np.inf
    got, want, types = vectorized_and_looped(
        lambda g: tf.raw_ops.ReluGrad(gradients=g, features=features), tf.constant(grads, tf.float32), mode)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    assert "Tile" not in types, types


# -- grouped convolutions: TF's converters outside forward mode, refused inside ----------------------

GROUPED = {  # 4 input channels, a kernel with 2 (2 groups); (the op of one column, per-column operand shape)
    "conv2d with per-column inputs": (lambda x, k, dy, a: tf.nn.conv2d(a, k, 1, "VALID"), "x"),
    "conv2d with per-column filters": (lambda x, k, dy, a: tf.nn.conv2d(x, a, 1, "VALID"), "k"),
    "input gradient with per-column gradients": (
        lambda x, k, dy, a: tf.nn.conv2d_transpose(a, k, x.shape, 1, "VALID"), "dy"),
    "input gradient with per-column filters": (
        lambda x, k, dy, a: tf.nn.conv2d_transpose(dy, a, x.shape, 1, "VALID"), "k"),
    "filter gradient with per-column inputs": (
        lambda x, k, dy, a: tf.compat.v1.nn.conv2d_backprop_filter(a, k.shape, dy, [1, 1, 1, 1], "VALID"), "x"),
    "filter gradient with per-column gradients": (
        lambda x, k, dy, a: tf.compat.v1.nn.conv2d_backprop_filter(x, k.shape, a, [1, 1, 1, 1], "VALID"), "dy"),
}
# TF 2.21's own converter for this one folds the columns into the output channels, which mixes the
# groups: its values are not the op's per column (measured: max |difference| ~20 on these inputs).
TF_GETS_WRONG = {"filter gradient with per-column gradients"}


def _grouped_case(which):
    """(the op of one column, [COLUMNS, ...] per-column operand) for a grouped convolution."""
    x = tf.constant(RNG.normal(size=(2, 6, 6, 4)), tf.float32)
    k = tf.constant(RNG.normal(size=(3, 3, 2, 6)), tf.float32)
    dy = tf.constant(RNG.normal(size=(2, 4, 4, 6)), tf.float32)
    op, operand = GROUPED[which]
    shape = {"x": x, "k": k, "dy": dy}[operand].shape
    return (lambda a: op(x, k, dy, a)), tf.constant(RNG.normal(size=(COLUMNS, *shape)), tf.float32)


@pytest.mark.parametrize("mode", ["eager", "xla"])
@pytest.mark.parametrize("which", sorted(GROUPED))
def test_a_grouped_convolution_outside_forward_mode_gets_tfs_own_converter(which, mode, monkeypatch):
    """The converters are process-wide: a user's own vectorized_map over a grouped convolution, outside
    forward mode, is vectorized as TF alone would (the folding assumes one group), not refused."""
    fn, per_column = _grouped_case(which)
    got, looped, _ = vectorized_and_looped(fn, per_column, mode)
    from tensorflow.python.ops.parallel_for import pfor

    for op in ("Conv2D", "Conv2DBackpropInput", "Conv2DBackpropFilter"):
        monkeypatch.setitem(pfor._pfor_converter_registry, op, _pfor.TF_CONVERTERS[op])
    tf_alone, _, _ = vectorized_and_looped(fn, per_column, mode)
    np.testing.assert_allclose(got.numpy(), tf_alone.numpy(), rtol=1e-6, atol=1e-6)
    if which not in TF_GETS_WRONG:
        np.testing.assert_allclose(got.numpy(), looped.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", sorted(GROUPED))
def test_a_grouped_convolution_inside_forward_mode_is_refused_by_name(which):
    from tf_bilevel.estimators import _pfor_conv

    fn, per_column = _grouped_case(which)
    with _pfor_conv.forward_mode():
        with pytest.raises(ValueError, match=r"forward mode .* grouped convolutions .*groups=2.*estimator='reverse'"):
            tf.vectorized_map(fn, per_column)
    tf.vectorized_map(fn, per_column)  # the block left: TF's converter again


# -- shapes not fully static: a tf.function input_signature with the batch (or the channels) unknown ---

def _traced(fn, per_column_spec, *specs):
    """fn(per_column, *operands) -> vectorized_map over the columns, as a graph function of those specs."""
    return tf.function(lambda a, *operands: tf.vectorized_map(lambda col: fn(col, *operands), a),
                       input_signature=[per_column_spec, *specs], autograph=False)


UNKNOWN_BATCH = {  # (op of one column, its per-column operand's spec, the others' specs): x [B, 9, 9, 2], k [3, 3, 2, 5]
    "conv2d with per-column filters": (
        lambda k, x, dy: tf.nn.conv2d(x, k, 1, "VALID"), [COLUMNS, 3, 3, 2, 5]),
    "input gradient with per-column filters": (
        lambda k, x, dy: tf.nn.conv2d_transpose(dy, k, tf.shape(x), 1, "VALID"), [COLUMNS, 3, 3, 2, 5]),
    "filter gradient with per-column inputs": (
        lambda xd, x, dy: tf.compat.v1.nn.conv2d_backprop_filter(xd, [3, 3, 2, 5], dy, [1, 1, 1, 1], "VALID"),
        [COLUMNS, None, 9, 9, 2]),
}


@pytest.mark.parametrize("which", sorted(UNKNOWN_BATCH))
def test_an_unknown_batch_still_folds_inside_forward_mode(which):
    """The channel counts are read from the static entries of a shape operand (tf.shape(x) with the
    batch unknown): still one group, folded (no While), the op's values column by column."""
    from tf_bilevel.estimators import _pfor_conv

    fn, per_column_shape = UNKNOWN_BATCH[which]
    specs = [tf.TensorSpec([None, 9, 9, 2]), tf.TensorSpec([None, 7, 7, 5])]
    vectorized = _traced(fn, tf.TensorSpec(per_column_shape), *specs)
    x = tf.constant(RNG.normal(size=(4, 9, 9, 2)), tf.float32)
    dy = tf.constant(RNG.normal(size=(4, 7, 7, 5)), tf.float32)
    per_column = tf.constant(RNG.normal(size=[COLUMNS] + [4 if d is None else d for d in per_column_shape[1:]]),
                             tf.float32)
    with _pfor_conv.forward_mode():
        concrete = vectorized.get_concrete_function()
    assert not [t for t in op_types(concrete) if "While" in t]
    want = tf.stack([fn(per_column[n], x, dy) for n in range(COLUMNS)])
    np.testing.assert_allclose(concrete(per_column, x, dy).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("which", ["input gradient with per-column filters", "filter gradient with per-column gradients"])
def test_a_grouped_convolution_with_an_unknown_batch_is_refused_inside_forward_mode(which):
    """The input gradient's channels come from tf.shape(x): with the batch unknown they are still
    read (4 input channels, the kernel's 2), not taken for one group and folded (wrong values)."""
    from tf_bilevel.estimators import _pfor_conv

    fn = {"input gradient with per-column filters": lambda k, x, dy: tf.nn.conv2d_transpose(dy, k, tf.shape(x), 1, "VALID"),
          "filter gradient with per-column gradients": lambda d, x, dy: tf.compat.v1.nn.conv2d_backprop_filter(
              x, [3, 3, 2, 6], d, [1, 1, 1, 1], "VALID")}[which]
    per_column = [COLUMNS, 3, 3, 2, 6] if "filters" in which else [COLUMNS, None, 4, 4, 6]
    vectorized = _traced(fn, tf.TensorSpec(per_column), tf.TensorSpec([None, 6, 6, 4]), tf.TensorSpec([None, 4, 4, 6]))
    with _pfor_conv.forward_mode(), pytest.raises(ValueError, match=r"grouped convolutions .*groups=2.*estimator='reverse'"):
        vectorized.get_concrete_function()


def test_unknown_channels_go_to_tfs_converter_and_are_refused_inside_forward_mode_where_tf_is_wrong():
    """Channels not static (input_signature [None, 6, 6, None]): a group count cannot be told.
    Outside forward mode TF's converter (the op's values); inside it the case TF gets wrong for a
    grouped convolution (the filter gradient with per-column output gradients) is refused, naming
    static channel dimensions and reverse mode; the other cases still go to TF's converter."""
    from tf_bilevel.estimators import _pfor_conv

    x_spec, dy_spec = tf.TensorSpec([None, 6, 6, None]), tf.TensorSpec([None, 4, 4, 6])
    wrong_case = _traced(lambda d, x, dy: tf.compat.v1.nn.conv2d_backprop_filter(x, [3, 3, 2, 6], d, [1, 1, 1, 1], "VALID"),
                         tf.TensorSpec([COLUMNS, None, 4, 4, 6]), x_spec, dy_spec)
    with _pfor_conv.forward_mode(), pytest.raises(ValueError, match=r"static batch size.*drop_remainder=True.*static channel dimension.*input_signature.*"
                                                                      r"estimator='reverse'"):
        wrong_case.get_concrete_function()

    per_column_inputs = lambda xd, x, dy: tf.compat.v1.nn.conv2d_backprop_filter(  # noqa: E731
        xd, [3, 3, 4, 6], dy, [1, 1, 1, 1], "VALID")
    vectorized = _traced(per_column_inputs, tf.TensorSpec([COLUMNS, None, 6, 6, None]), x_spec, dy_spec)
    with _pfor_conv.forward_mode():
        concrete = vectorized.get_concrete_function()
    assert [t for t in op_types(concrete) if "While" in t]  # TF's converter, not the folding
    x = tf.constant(RNG.normal(size=(2, 6, 6, 4)), tf.float32)
    dy = tf.constant(RNG.normal(size=(2, 4, 4, 6)), tf.float32)
    per_column = tf.constant(RNG.normal(size=(COLUMNS, 2, 6, 6, 4)), tf.float32)
    want = tf.stack([per_column_inputs(per_column[n], x, dy) for n in range(COLUMNS)])
    np.testing.assert_allclose(concrete(per_column, x, dy).numpy(), want.numpy(), rtol=1e-5, atol=1e-5)


def test_a_grouped_nchw_convolution_is_refused_inside_forward_mode():
    """NCHW goes to TF's converter, which mixes the groups of the filter gradient as in NHWC: the
    channels are read from axis 1 and the grouped convolution refused (traced only: no CPU kernel)."""
    from tf_bilevel.estimators import _pfor_conv

    fn = lambda d, x, dy: tf.compat.v1.nn.conv2d_backprop_filter(  # noqa: E731
        x, [3, 3, 2, 6], d, [1, 1, 1, 1], "VALID", data_format="NCHW")
    vectorized = _traced(fn, tf.TensorSpec([COLUMNS, None, 6, 4, 4]), tf.TensorSpec([None, 4, 6, 6]),
                         tf.TensorSpec([None, 6, 4, 4]))
    with _pfor_conv.forward_mode(), pytest.raises(ValueError, match=r"grouped convolutions .*groups=2"):
        vectorized.get_concrete_function()
