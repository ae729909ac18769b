"""Structured pruning: each kind of dependency group on real graphs (Flatten into Gemm on the
digits CNN, residual Add on the ResNet-style graph, depthwise Conv on the MobileNetV2-style one,
Concat), declined groups with their reasons, and the pruned models run in onnxruntime."""

import dataclasses

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from models import build_graphs
from onnxcomp import model as model_io
from onnxcomp import runtime
from onnxcomp.data import open_data
from onnxcomp.prune.api import PruneOptions, prune
from onnxcomp.prune.structured import build_groups


def _run(model, feed):
    return runtime.create_session(model).run(None, feed)[0]


def _by_producer(report):
    return {g["group"]: g for g in report["groups"]}


def _check(model):
    onnx.checker.check_model(ir.to_proto(model), full_check=True)


def test_digits_cnn_30_percent_fewer_macs_within_one_point(models_dir):
    model, report = prune(
        model_io.load(models_dir / "digits_cnn.onnx"),
        PruneOptions(structured=True, sparsity=0.2, samples=128),
        data=models_dir / "digits_calib.npz", eval_data=models_dir / "digits_test.npz",
    )  # fmt: skip
    _check(model)
    assert report["after"]["macs"] <= 0.7 * report["before"]["macs"]
    assert report["after"]["parameters"] < report["before"]["parameters"]
    assert report["check"]["drop"] <= 0.01
    groups = _by_producer(report)
    flatten = [g for g in groups.values() if "flatten into Gemm" in g["kind"]]
    assert flatten and flatten[0]["removed"] > 0
    # the last Gemm feeds the output: declined, and the report says why
    assert "graph output 'logits'" in groups["/head/head.4/Gemm"]["skipped"]
    # tensors really shrink
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert conv.inputs[1].const_value.shape[0] < 32


def _graph_model(name, **kwargs):
    proto = getattr(build_graphs, name)(**kwargs)
    return ir.from_proto(proto), build_graphs.example_feed(proto, batch=4)


def _calib(tmp_path, proto_model, samples=32):
    proto = ir.to_proto(proto_model)
    path = tmp_path / "calib.npz"
    np.savez(path, **build_graphs.example_feed(proto, batch=samples, seed=1))
    return path


def test_resnet_residual_groups_cut_both_branches(tmp_path):
    model, feed = _graph_model("resnet", widths=(16, 32), blocks=2, image_size=16)
    dense = _run(model, feed)
    calib = _calib(tmp_path, model)
    pruned, report = prune(model, PruneOptions(structured=True, sparsity=0.5, samples=32), data=calib)
    _check(pruned)
    residual = [g for g in report["groups"] if "residual" in g["kind"]]
    assert residual and all(g["removed"] > 0 for g in residual)
    # a residual stream group cuts every Conv writing into it (stem + block outputs + shortcut)
    assert max(len(g["producers"]) for g in residual) >= 3
    out = _run(pruned, feed)
    assert out.shape == dense.shape
    assert report["after"]["macs"] < 0.5 * report["before"]["macs"]
    cos = np.sum(out * dense) / np.linalg.norm(out) / np.linalg.norm(dense)
    assert cos > 0.9


def test_mobilenetv2_depthwise_groups_update_the_group_count(tmp_path):
    model, feed = _graph_model("mobilenetv2", width=0.5, image_size=32, last_channels=128)
    dense = _run(model, feed)
    pruned, report = prune(model, PruneOptions(structured=True, sparsity=0.4, samples=16), data=_calib(tmp_path, model))
    _check(pruned)
    assert any("depthwise" in g["kind"] and g["removed"] > 0 for g in report["groups"])
    for node in pruned.graph:
        if node.op_type == "Conv" and node.attributes.get_int("group", 1) > 1:
            assert node.attributes.get_int("group") == node.inputs[1].const_value.shape[0]
    assert _run(pruned, feed).shape == dense.shape


def _concat_model(fixed_reshape: bool = False) -> ir.Model:
    rng = np.random.default_rng(0)
    batch = 2 if fixed_reshape else "n"

    def init(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    inits = [init("wa", 16, 3, 3, 3), init("ba", 16), init("wb", 16, 3, 3, 3), init("bb", 16),
             init("wc", 32, 32, 3, 3), init("bc", 32), init("wf", 10, 32 * 16 if fixed_reshape else 32)]
    nodes = [
        helper.make_node("Conv", ["x", "wa", "ba"], ["a0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["a0"], ["a"]),
        helper.make_node("Conv", ["x", "wb", "bb"], ["b0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["b0"], ["b"]),
        helper.make_node("Concat", ["a", "b"], ["c"], axis=1),
        helper.make_node("Conv", ["c", "wc", "bc"], ["d0"], pads=[1, 1, 1, 1]),
        helper.make_node("Relu", ["d0"], ["d"]),
    ]
    if fixed_reshape:
        inits.append(numpy_helper.from_array(np.array([-1, 32 * 16], np.int64), "shape"))
        nodes += [helper.make_node("MaxPool", ["d"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
                  helper.make_node("Reshape", ["p", "shape"], ["f"])]
    else:
        nodes += [helper.make_node("GlobalAveragePool", ["d"], ["p"]), helper.make_node("Flatten", ["p"], ["f"])]
    nodes.append(helper.make_node("Gemm", ["f", "wf"], ["y"], transB=1))
    graph = helper.make_graph(
        nodes, "concat", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [batch, 10])], inits,
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    model = ir.from_proto(proto)
    model_io.normalize(model)
    return model


def test_concat_groups_cut_at_their_offsets(tmp_path):
    model = _concat_model()
    kinds = [g.kinds for g in build_groups(model)]
    assert sum("concat" in k for k in kinds) == 2
    feed = {"x": np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)}
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(2).standard_normal((64, 3, 8, 8)).astype(np.float32))
    dense = _run(model, feed)
    pruned, report = prune(model, PruneOptions(structured=True, sparsity=0.5), data=tmp_path / "calib.npz")
    _check(pruned)
    concat = [g for g in report["groups"] if "concat" in g["kind"]]
    assert len(concat) == 2 and all(g["removed"] == 8 for g in concat)
    consumer = [n for n in pruned.graph if n.op_type == "Conv"][-1]
    assert consumer.inputs[1].const_value.shape[1] == 16  # 8 + 8 channels kept of 32
    assert _run(pruned, feed).shape == dense.shape


def test_a_group_that_cannot_be_cut_is_declined_with_its_reason():
    model = _concat_model(fixed_reshape=True)
    groups = build_groups(model)
    declined = [g for g in groups if g.declined]
    assert any("Reshape target fixes the channel count" in g.declined for g in declined)
    pruned, report = prune(model, PruneOptions(structured=True, sparsity=0.5, optimize=False))
    _check(pruned)
    reasons = [g.get("skipped", "") for g in report["groups"]]
    assert any("Reshape" in r for r in reasons)
    # the groups before the Concat are still cut
    assert any(g["removed"] > 0 for g in report["groups"])
    feed = {"x": np.ones((2, 3, 8, 8), np.float32)}
    assert _run(pruned, feed).shape == (2, 10)



def test_structured_max_drop_spares_groups(models_dir):
    model, report = prune(
        model_io.load(models_dir / "digits_cnn.onnx"),
        PruneOptions(structured=True, sparsity=0.8, samples=64, reconstruct=False, max_drop=0.02),
        data=models_dir / "digits_calib.npz", eval_data=models_dir / "digits_test.npz",
    )  # fmt: skip
    assert report["check"]["drop"] <= 0.02
    assert report.get("spared")
    assert report["check"]["verdict"]["passed"]
    assert report["check"]["rounds"][0]["spared"] == []  # bisection starts from everything pruned


@pytest.mark.parametrize("importance", ["l1", "activation"])
def test_importance_choices(models_dir, importance):
    model, report = prune(
        model_io.load(models_dir / "digits_cnn.onnx"),
        PruneOptions(structured=True, sparsity=0.25, importance=importance, samples=64),
        data=models_dir / "digits_calib.npz", eval_data=models_dir / "digits_test.npz",
    )  # fmt: skip
    assert report["check"]["drop"] <= 0.02


def test_random_inputs_without_data():
    model = _concat_model()
    source = open_data(None, model_io.input_specs(model), samples=8, shapes={"x": [1, 3, 8, 8]})
    pruned, report = prune(model, PruneOptions(structured=True, sparsity=0.25, shapes={"x": [1, 3, 8, 8]}))
    assert report["reconstruct"] is False
    assert source.num_samples == 8
    _check(pruned)


def _c2f_model(slice_half: bool = False) -> ir.Model:
    """A YOLOv8 C2f block as PyTorch exports it: a 1x1 Conv, SiLU as Sigmoid*Mul, Split into two
    halves (sizes as a shared constant input), a residual bottleneck on the second half, Concat of
    both halves and the bottleneck, a 1x1 Conv; or (``slice_half``) a Slice taking half of a
    Conv's channels."""
    rng = np.random.default_rng(0)

    def init(name, *shape):
        return numpy_helper.from_array((rng.standard_normal(shape) * 0.3).astype(np.float32), name)

    def silu(x, y):
        return [helper.make_node("Sigmoid", [x], [y + "_s"]), helper.make_node("Mul", [x, y + "_s"], [y])]

    inits = [init("w1", 32, 3, 1, 1), init("b1", 32), init("wm1", 16, 16, 3, 3), init("bm1", 16),
             init("wm2", 16, 16, 3, 3), init("bm2", 16), init("w2", 32, 48, 1, 1), init("b2", 32), init("wf", 10, 32),
             numpy_helper.from_array(np.array([16, 16], np.int64), "halves")]
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"]), *silu("c1", "a1")]
    if slice_half:
        inits[6] = init("w2", 32, 16, 1, 1)
        inits += [numpy_helper.from_array(np.array([v], np.int64), n) for n, v in (("s0", 0), ("s1", 16), ("ax", 1))]
        nodes += [helper.make_node("Slice", ["a1", "s0", "s1", "ax"], ["cat"])]
    else:
        nodes += [
            helper.make_node("Split", ["a1", "halves"], ["h0", "h1"], axis=1),
            helper.make_node("Conv", ["h1", "wm1", "bm1"], ["m1"], pads=[1, 1, 1, 1]), *silu("m1", "m1a"),
            helper.make_node("Conv", ["m1a", "wm2", "bm2"], ["m2"], pads=[1, 1, 1, 1]), *silu("m2", "m2a"),
            helper.make_node("Add", ["h1", "m2a"], ["r"]),
            helper.make_node("Concat", ["h0", "h1", "r"], ["cat"], axis=1),
        ]  # fmt: skip
    nodes += [helper.make_node("Conv", ["cat", "w2", "b2"], ["c2"]), *silu("c2", "a2"),
              helper.make_node("GlobalAveragePool", ["a2"], ["p"]), helper.make_node("Flatten", ["p"], ["f"]),
              helper.make_node("Gemm", ["f", "wf"], ["y"], transB=1)]  # fmt: skip
    graph = helper.make_graph(
        nodes, "c2f", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 10])], inits,
    )  # fmt: skip
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    onnx.checker.check_model(proto, full_check=True)
    model = ir.from_proto(proto)
    model_io.normalize(model)
    return model


def test_split_groups_cut_each_half_and_resize_the_split(tmp_path):
    model = _c2f_model()
    groups = {g.name: g for g in build_groups(model)}
    # the first Conv's channels part at the Split: one group per half, both live; the second
    # half's group holds the bottleneck's output Conv (residual) and sits twice in the Concat
    assert not groups["Conv->c1[0:16]"].declined and not groups["Conv->c1[16:32]"].declined
    second = groups["Conv->c1[16:32]"]
    assert {"split", "residual", "concat"} <= second.kinds and len(second.producers) == 2
    feed = {"x": np.random.default_rng(1).standard_normal((4, 3, 8, 8)).astype(np.float32)}
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(2).standard_normal((64, 3, 8, 8)).astype(np.float32))
    dense = _run(model, feed)
    pruned, report = prune(model, PruneOptions(structured=True, sparsity=0.5), data=tmp_path / "calib.npz")
    _check(pruned)
    removed = {g["group"]: g["removed"] for g in report["groups"]}
    assert removed["Conv->c1[0:16]"] == 8 and removed["Conv->c1[16:32]"] == 8
    split = next(n for n in pruned.graph if n.op_type == "Split")
    assert split.inputs[1].const_value.numpy().tolist() == [8, 8]
    consumer = next(n for n in pruned.graph if n.op_type == "Conv" and n.outputs[0].name == "c2")
    assert consumer.inputs[1].const_value.shape[1] == 24  # 8 + 8 + 8 of 48
    out = _run(pruned, feed)
    assert out.shape == dense.shape
    cos = np.sum(out * dense) / np.linalg.norm(out) / np.linalg.norm(dense)
    assert cos > 0.9


def test_a_slice_taking_part_of_a_group_is_declined_with_its_reason():
    groups = build_groups(_c2f_model(slice_half=True))
    first = next(g for g in groups if g.name == "Conv->c1")
    assert "the Slice takes only some of these channels" in first.declined


def test_sparsity_of_macs_removes_that_share_of_the_macs(tmp_path):
    model = _c2f_model()
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(2).standard_normal((32, 3, 8, 8)).astype(np.float32))
    options = PruneOptions(structured=True, sparsity=0.05, sparsity_of="macs", importance="activation")
    pruned, report = prune(model, options, data=tmp_path / "calib.npz")
    _check(pruned)
    assert report["scope"] == "global" and report["sparsity_of"] == "macs"
    assert report["after"]["macs"] <= 0.95 * report["before"]["macs"]
    # asked for more than the 20 % cap per group allows: less is cut, and the report says so
    _, report = prune(_c2f_model(), dataclasses.replace(options, sparsity=0.5), data=tmp_path / "calib.npz")
    assert "of the MACs removed, not 50%" in report["notes"][0]


def test_allocate_by_sensitivity_spends_the_macs_where_the_outputs_change_least(models_dir):
    """--allocate sensitivity: each group is cut alone on the calibration data, its output loss
    measured (in the report), and the MAC budget shared so that the summed loss is least."""
    options = PruneOptions(structured=True, sparsity=0.3, sparsity_of="macs", allocate="sensitivity", samples=64)
    model, report = prune(
        model_io.load(models_dir / "digits_cnn.onnx"), options,
        data=models_dir / "digits_calib.npz", eval_data=models_dir / "digits_test.npz",
    )  # fmt: skip
    _check(model)
    assert report["after"]["macs"] <= 0.71 * report["before"]["macs"]
    assert report["check"]["drop"] <= 0.01
    live = [g for g in report["groups"] if not g.get("skipped")]
    for g in live:
        cuts = [n for n, _ in g["sensitivity"]]
        assert g["sensitivity"][0] == [0, 0.0] and cuts == sorted(cuts)
        assert g["removed"] <= cuts[-1]  # never past the largest cut measured
    # the budget is not shared evenly: the groups lose different fractions of their channels
    assert len({round(g["removed"] / g["channels"], 2) for g in live}) > 1


def test_allocate_sensitivity_needs_a_mac_budget_and_data(models_dir):
    from onnxcomp.errors import OnnxcompError

    with pytest.raises(OnnxcompError, match="--sparsity-of macs"):
        PruneOptions(structured=True, allocate="sensitivity").check()
    with pytest.raises(OnnxcompError, match="needs --data"):
        prune(model_io.load(models_dir / "digits_cnn.onnx"),
              PruneOptions(structured=True, sparsity=0.2, sparsity_of="macs", allocate="sensitivity"))  # fmt: skip
