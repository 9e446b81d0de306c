"""--relu: leaky activations after int8 convs become ReLU (fused by ORT), and the next layers are refitted."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir

from onnxprune.calibration import CalibrationSet
from onnxprune.cli import main
from onnxprune.int8 import quantize
from onnxprune.passes import fusable_activations, relu_activations
from onnxprune.passes.reconstruct import reconstruct
from onnxprune.verify import interface

from .oracle import run
from .pattern_models import GraphBuilder


def _leaky_net(seed: int = 0, slope: float = 0.2) -> onnx.ModelProto:
    """conv -> LeakyRelu -> conv -> PRelu -> conv -> Add(skip) -> LeakyRelu -> conv; wide enough to refit."""
    g = GraphBuilder(seed, "leaky")
    x = g.input("x", ["N", 3, 16, 16])
    a = g.op("LeakyRelu", g.conv(x, 3, 16), alpha=slope)
    b = g.op("PRelu", g.conv(a, 16, 16), g.const(g.rng.uniform(0.25, 0.75, (16, 1, 1)).astype(np.float32) * slope))
    s = g.op("Add", g.conv(b, 16, 16), a)
    c = g.op("LeakyRelu", s, alpha=slope)  # after an Add, not a conv: ORT could not fuse it
    return g.build([g.conv(c, 16, 8, k=1)])


def _with_zero_slopes(model: onnx.ModelProto, names: set[str]) -> onnx.ModelProto:
    """The same graph where the named activations have slope 0: what ReLU must compute."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    inits = {i.name: i for i in m.graph.initializer}
    for n in m.graph.node:
        if n.name not in names:
            continue
        if n.op_type == "LeakyRelu":
            next(a for a in n.attribute if a.name == "alpha").f = 0.0
        else:
            slope = inits[n.input[1]]
            slope.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(slope)), slope.name))
    return m


def _x(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, 3, 16, 16)).astype(np.float32)


def test_only_activations_right_after_a_single_use_conv_are_fusable() -> None:
    model = ir.from_proto(_leaky_net())
    picked = fusable_activations(model)
    ops = {n.name: n.op_type for n in model.graph}
    assert sorted(ops[p] for p in picked) == ["LeakyRelu", "PRelu"]  # the LeakyRelu after the Add is not
    first = picked[0]
    assert fusable_activations(model, float_nodes={first}) == picked[1:]
    conv = next(n for n in model.graph if n.op_type == "Conv")
    assert fusable_activations(model, float_nodes={conv.name}) == picked[1:]  # its conv stays float


def test_replaced_activations_compute_relu_and_the_input_model_is_untouched() -> None:
    proto = _leaky_net()
    model = ir.from_proto(proto)
    picked = fusable_activations(model)
    new, record = relu_activations(model, picked)
    out = ir.to_proto(new)
    onnx.checker.check_model(out, full_check=True)
    assert interface(out) == interface(proto)
    assert [op for _, op in record.replaced] == ["LeakyRelu", "PRelu"]
    assert {n.name: n.op_type for n in out.graph.node if n.name in picked} == {p: "Relu" for p in picked}
    assert len(out.graph.initializer) == len(proto.graph.initializer) - 1  # the PRelu slope is gone
    assert sum(n.op_type in ("LeakyRelu", "PRelu") for n in model.graph) == 3  # the input still has them
    x = _x(4, 1)
    np.testing.assert_allclose(run(out, {"x": x})[0], run(_with_zero_slopes(proto, set(picked)), {"x": x})[0],
                               rtol=1e-5, atol=1e-5)


def test_refit_after_relu_brings_the_outputs_back_toward_the_original() -> None:
    proto = _leaky_net(slope=0.3)
    model = ir.from_proto(proto)
    new, record = relu_activations(model, fusable_activations(model))
    fit, rec = reconstruct(model, new, None, set(), "x", [_x(32, 2)], changed=record.outputs)
    assert {f.node for f in rec.layers} and all(f.error_after < f.error_before for f in rec.layers)
    x = _x(16, 3)  # held out
    ref = run(proto, {"x": x})[0]
    err = lambda m: float(np.linalg.norm(run(ir.to_proto(m), {"x": x})[0] - ref) / np.linalg.norm(ref))  # noqa: E731
    assert err(fit) < 0.7 * err(new)


def _calib(model: onnx.ModelProto, n: int = 24) -> CalibrationSet:
    return CalibrationSet(model.graph.input[0].name, [_x(n, 0)], [], None, [])


def test_quantize_relu_leaves_no_separate_int8_activation_kernel() -> None:
    model = _leaky_net()
    plain = quantize(model, _calib(model), float_slow_layers=False)
    fused = quantize(model, _calib(model), float_slow_layers=False, relu=True)
    assert plain.report.kernels.get("QLinearLeakyRelu", 0) >= 1 and not plain.report.relu_replaced
    assert len(fused.report.relu_replaced) == 2
    # The LeakyRelu after the Add stays (it has no conv to fuse into); the one after the conv is gone.
    assert fused.report.kernels.get("QLinearLeakyRelu", 0) == plain.report.kernels["QLinearLeakyRelu"] - 1
    assert not any(k.startswith("PRelu") or k == "QLinearPRelu" for k in fused.report.kernels)
    onnx.checker.check_model(fused.model)
    assert interface(fused.model) == interface(model)
    assert any("--relu: 2 LeakyRelu/PRelu made ReLU" in n for n in fused.report.notes)
    assert fused.report.fidelity["outputs"][0]["cosine"] > 0.9


def test_cli_relu(tmp_path: Path, capsys) -> None:
    model = _leaky_net()
    path, npy = tmp_path / "m.onnx", tmp_path / "c.npy"
    onnx.save(model, str(path))
    np.save(npy, _x(16, 0))
    assert main(["quantize", str(path), "--calib", str(npy), "--relu", "-q", "--json", str(tmp_path / "r.json")]) == 0
    assert (tmp_path / "m.int8.onnx").exists()
    capsys.readouterr()
    assert main(["slim", str(path), "--ratio", "0.3", "--relu"]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "--relu only applies with --int8" in err[0]
    assert not (tmp_path / "m.slim.onnx").exists()


def test_relu_pass_ignores_nodes_not_named() -> None:
    model = ir.from_proto(_leaky_net())
    new, record = relu_activations(model, ["no such node"])
    assert not record.replaced
    for op in ("LeakyRelu", "PRelu"):
        assert sum(n.op_type == op for n in new.graph) == sum(n.op_type == op for n in model.graph)


def test_activations_far_from_relu_on_the_data_are_kept() -> None:
    model = _leaky_net(slope=0.9)  # LeakyRelu(0.9) is nearly linear: its negative side matters
    result = quantize(model, _calib(model), float_slow_layers=False, relu=True)
    kept = {n.name for n in model.graph.node if n.op_type == "LeakyRelu"} - set(result.report.relu_replaced)
    assert len(kept) == 2 and all(n.startswith("LeakyRelu") for n in kept)
    assert any("activation(s) kept: their negative side carries over 5%" in n for n in result.report.notes)
