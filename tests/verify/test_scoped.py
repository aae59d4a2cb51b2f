"""``verify.scoped``: the float graph of a quantized torch.onnx file, rebuilt from its names. It
maps only what every name accounts for, both ways; anything else is None (the proof then exports
the reference again), never a guess."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import helper, numpy_helper
from torch import nn

from loraexport.verify.scoped import scoped_float_graph


class _Model(nn.Module):
    def __init__(self, second: bool = False):
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(32, 16, bias=False)
        self.norm = nn.Parameter(torch.rand(16))
        self.other = nn.Linear(16, 8, bias=False) if second else None


class _Graph(nn.Module):  # as a family's GraphSpec wraps the model
    def __init__(self, model):
        super().__init__()
        self.model = model


def _nbits(scope: str, weight: str, k: int = 32, n: int = 16) -> onnx.NodeProto:
    return helper.make_node(
        "MatMulNBits", ["x", f"{weight}_Q4", f"{weight}_scales"], [f"{scope}_out"],
        name=f"{scope}/MatMul_Q4", domain="com.microsoft", K=k, N=n, bits=4, block_size=16,
    )  # fmt: skip


def _proto(nodes, extra=()) -> onnx.ModelProto:
    inits = [numpy_helper.from_array(np.zeros((16, 2, 8), np.uint8), "W_Q4"),
             numpy_helper.from_array(np.ones(32, np.float32), "W_scales"),
             numpy_helper.from_array(np.ones(16, np.float32), "model.norm"), *extra]  # fmt: skip
    mul = helper.make_node("Mul", ["/model/lin_out", "model.norm"], ["y"], name="/model/Mul")
    graph = helper.make_graph(
        [*nodes, mul], "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [1, 32])],
        [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1, 16])], inits,
    )  # fmt: skip
    return helper.make_model(graph)


def test_each_node_gets_the_weight_its_scope_names():
    model = _Model()
    made = scoped_float_graph(_proto([_nbits("/model/lin", "W")]), _Graph(model), model)
    assert made is not None
    graph, origins = made
    assert origins == {"W": (("lin", -1),)}
    node = graph.graph.node[0]
    assert (node.op_type, node.domain, node.name) == ("MatMul", "", "/model/lin/MatMul")
    assert list(node.input) == ["x", "W"] and list(node.output) == ["/model/lin_out"]
    inits = {t.name: numpy_helper.to_array(t) for t in graph.graph.initializer}
    assert set(inits) == {"W", "model.norm"}  # the quantized tensors are the quantizer's to make again
    np.testing.assert_array_equal(inits["W"], model.lin.weight.detach().numpy().T)  # MatMul reads (in, out)
    np.testing.assert_array_equal(inits["model.norm"], model.norm.detach().numpy())


def test_a_node_whose_scope_is_no_module():
    model = _Model()
    assert scoped_float_graph(_proto([_nbits("/model/elsewhere", "W")]), _Graph(model), model) is None


def test_a_linear_module_no_node_names():
    model = _Model(second=True)
    assert scoped_float_graph(_proto([_nbits("/model/lin", "W")]), _Graph(model), model) is None


def test_two_nodes_naming_one_module():
    model = _Model()
    extra = [numpy_helper.from_array(np.zeros((16, 2, 8), np.uint8), "V_Q4"),
             numpy_helper.from_array(np.ones(32, np.float32), "V_scales")]  # fmt: skip
    proto = _proto([_nbits("/model/lin", "W"), _nbits("/model/lin", "V")], extra)
    assert scoped_float_graph(proto, _Graph(model), model) is None


def test_a_tensor_no_parameter_claims():
    model = _Model()
    proto = _proto([_nbits("/model/lin", "W")], [numpy_helper.from_array(np.ones(4, np.float32), "stowaway")])
    assert scoped_float_graph(proto, _Graph(model), model) is None


def test_a_node_whose_shape_is_not_its_modules():
    model = _Model()
    assert scoped_float_graph(_proto([_nbits("/model/lin", "W", k=16, n=32)]), _Graph(model), model) is None


@pytest.mark.parametrize("equal", [True, False])
def test_a_parameter_stored_under_an_equal_ones_name(equal):
    """torch.onnx stores equal tensors once: a parameter with no initializer of its own is
    accepted only when its values are those of one that has."""
    model = _Model()
    model.twin = nn.Parameter(model.norm.detach().clone() * (1 if equal else 2))
    made = scoped_float_graph(_proto([_nbits("/model/lin", "W")]), _Graph(model), model)
    assert (made is not None) is equal
