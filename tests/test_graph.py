"""graph: queries and the editor on small ONNX-text graphs, checked in onnxruntime where they edit."""

from __future__ import annotations

import numpy as np
import onnx_ir as ir

from onnxcomp import graph, runtime

TEXT = """<ir_version: 8, opset_import: ["" : 17]>
g (float[2, 3] x) => (float[2, 3] y, float[2, 3] r) {
    c = Constant<value = float[3] {1.0, 2.0, 3.0}>()
    k = Constant<value_float = 0.5>()
    a = Add(x, c)
    m = Mul(a, k)
    r = Relu(m)
    y = Neg(r)
}"""


def _node(model: ir.Model, output: str) -> ir.Node:
    return next(n for n in model.graph if n.outputs[0].name == output)


def _run(model: ir.Model, x: np.ndarray) -> dict[str, np.ndarray]:
    return runtime.run(runtime.create_session(model), {"x": x})


def test_queries_follow_values():
    model = ir.from_onnx_text(TEXT)
    add, mul = _node(model, "a"), _node(model, "m")
    np.testing.assert_array_equal(graph.const_or_node(add.inputs[1]), [1.0, 2.0, 3.0])
    assert graph.const(add.inputs[1]) is None  # a Constant node is not lifted yet
    assert float(graph.const_or_node(mul.inputs[1])) == 0.5
    assert (
        graph.producer(mul.inputs[0], "Add") is add and graph.producer(mul.inputs[0], "Sub") is None
    )
    assert graph.only_use(add.outputs[0]) is mul
    assert graph.only_use(_node(model, "r").outputs[0]) is None  # r is a graph output too
    assert graph.other_input(add, add.inputs[0]) is add.inputs[1]
    assert graph.rank(model.graph.inputs[0]) == 2 and graph.dims(model.graph.inputs[0]) == [2, 3]


def test_editor_names_initializers_and_rewiring_keep_the_outputs():
    model = ir.from_onnx_text(TEXT)
    x = np.arange(6, dtype=np.float32).reshape(2, 3) - 2
    before = _run(model, x)
    names = graph.NameSource(model)
    assert names("a") == "a_1" and names("a") == "a_2" and names("fresh") == "fresh"
    g = model.graph
    relu = _node(model, "r")
    # r = Relu(m) replaced by Relu(m·2)·0.5: same values; the graph output keeps its name.
    two = graph.add_initializer(g, "two", np.array(2.0, np.float32), names)
    half = graph.add_initializer(g, "half", np.array(0.5, np.float32), names)
    scaled = ir.node("Mul", [relu.inputs[0], two], name=names("scaled"))
    again = ir.node("Relu", [scaled.outputs[0]], name=names("relu2"))
    back = ir.node("Mul", [again.outputs[0], half], name=names("back"))
    g.insert_after(relu, [scaled, again, back])
    graph.replace_uses(relu.outputs[0], back.outputs[0])
    g.remove(relu, safe=True)
    assert [v.name for v in g.outputs] == ["y", "r"]
    after = _run(model, x)
    for name in ("y", "r"):
        np.testing.assert_allclose(after[name], before[name])
    unused = graph.add_initializer(g, "two", np.array(3.0, np.float32))
    assert unused.name == "two_1"
    assert graph.drop_unused_initializers(g, [unused, two]) == 1 and "two_1" not in g.initializers


def test_strip_inferred_shapes_keeps_outputs_and_annotated_values():
    model = ir.from_onnx_text(TEXT)
    from onnxcomp import model as model_io

    model_io.normalize(model)
    assert _node(model, "m").outputs[0].shape is not None
    changed = graph.strip_inferred_shapes(model, keep={"a"})
    assert changed >= 1  # m (a is kept by name; r and y are graph outputs)
    assert (
        _node(model, "m").outputs[0].shape is None
        and _node(model, "a").outputs[0].shape is not None
    )
    assert all(v.shape is not None for v in model.graph.outputs)
