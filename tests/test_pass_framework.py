"""The rewrites of ``passes/`` are onnx-ir passes: one interface, typed records, declared checks, composable."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnx
import onnx_ir as ir
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxprune.channels.analysis import analyze_channels
from onnxprune.passes import (CleanupRecord, Cleanup, Equalize, EqualizeRecord, FoldBatchNorm, FoldRecord,
                              MaskChannels, MaskRecord, PreluSplit, PreluSplitRecord, Reconstruct, ReconstructRecord,
                              ReluActivations, ReluRecord, RemovalRecord, RemoveChannels, Sparsify, SparsifyRecord,
                              TileRecord, TileRows, checks_enabled, cleanup, fold_batchnorm, fusable_activations,
                              remove_channels, run_composed)
from onnxprune.passes.checks import ENV, check_output, random_feeds
from onnxprune.passes.gate import GatePass
from onnxprune.pipeline import prepare
from onnxprune.sample_models import GENERATED

from .oracle import random_selection

ROOT = Path(__file__).resolve().parents[1]
SAMPLE, SHAPE = "se-block", (1, 3, 32, 32)  # small, static spatial size: every check runs ORT


def _bytes(model: ir.Model) -> bytes:
    return ir.to_proto(model).SerializeToString(deterministic=True)


def _messy_model(bn_output: bool = False) -> onnx.ModelProto:
    """What exporters write: a weight behind Constant + Identity, initializers listed as inputs, BN after Conv
    (``bn_output``: its output is a graph output too)."""
    rng = np.random.default_rng(0)
    w1 = rng.standard_normal((8, 3, 3, 3)).astype(np.float32)
    w2 = numpy_helper.from_array(rng.standard_normal((4, 8, 1, 1)).astype(np.float32), "w2")
    bn = [numpy_helper.from_array(a.astype(np.float32), n) for a, n in (
        (rng.uniform(0.5, 2, 8), "gamma"), (rng.standard_normal(8), "beta"), (rng.standard_normal(8), "mean"),
        (rng.uniform(0.5, 2, 8), "var"))]
    nodes = [
        helper.make_node("Constant", [], ["w1_const"], value=numpy_helper.from_array(w1)),
        helper.make_node("Identity", ["w1_const"], ["w1"]),
        helper.make_node("Conv", ["x", "w1"], ["c1"], pads=[1, 1, 1, 1]),
        helper.make_node("BatchNormalization", ["c1", "gamma", "beta", "mean", "var"], ["b1"]),
        helper.make_node("Relu", ["b1"], ["r1"]),
        helper.make_node("Conv", ["r1", "w2"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "messy", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16]),
                                               helper.make_tensor_value_info("w2", TensorProto.FLOAT, [4, 8, 1, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 16, 16])], [w2, *bn])
    if bn_output:
        graph.output.append(helper.make_tensor_value_info("b1", TensorProto.FLOAT, ["N", 8, 16, 16]))
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


@pytest.fixture(scope="module")
def sample():
    """(prepared model, analysis, removed units, calibration batch) of a small sample model."""
    proto = GENERATED[SAMPLE]()
    prep = prepare(proto, input_shapes={"input": SHAPE}, simplify=False)
    analysis = analyze_channels(prep.model, prep.shapes)
    removed = random_selection(analysis, np.random.default_rng(1), 0.4)
    assert removed
    x = np.random.default_rng(2).standard_normal((2, *SHAPE[1:])).astype(np.float32)
    return prep.model, analysis, removed, x


def test_checks_are_on_in_the_pass_tests() -> None:
    assert checks_enabled()  # tests/conftest.py
    assert checks_enabled(True) and not checks_enabled(False)


def test_checks_are_off_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(ENV, raising=False)
    assert not checks_enabled()
    for value, on in (("0", False), ("false", False), ("", False), ("1", True), ("yes", True)):
        monkeypatch.setenv(ENV, value)
        assert checks_enabled() is on


@pytest.mark.parametrize("cls", [Cleanup, Equalize, FoldBatchNorm, RemoveChannels, MaskChannels, ReluActivations,
                                 Reconstruct, Sparsify, TileRows, PreluSplit, GatePass])
def test_every_rewrite_is_an_onnx_ir_pass(cls: type) -> None:
    assert issubclass(cls, ir.passes.PassBase)
    if cls is not GatePass:  # the gate rewrites in place; every other pass leaves its input as it was
        assert issubclass(cls, ir.passes.FunctionalPass)


def _passes(model: ir.Model, analysis, removed, x) -> dict[str, tuple[ir.passes.PassBase, ir.Model, type]]:
    """name -> (configured pass, the model it runs on, its record type)."""
    pruned = remove_channels(model, analysis, removed)[0]
    return {
        "cleanup": (Cleanup(), model, CleanupRecord),
        "equalize": (Equalize(), model, EqualizeRecord),
        "fold": (FoldBatchNorm(), ir.from_proto(GENERATED[SAMPLE]()), FoldRecord),
        "remove": (RemoveChannels(analysis, removed), model, RemovalRecord),
        "mask": (MaskChannels(analysis, removed), model, MaskRecord),
        "relu": (ReluActivations(fusable_activations(model)), model, ReluRecord),
        "reconstruct": (Reconstruct(model, analysis, set(removed), "input", [x]), pruned, ReconstructRecord),
        "sparsify": (Sparsify(0.3), pruned, SparsifyRecord),
        "sparsify_calibrated": (Sparsify(0.3, input_name="input", batches=[x], reference=model, workers=1), pruned,
                                SparsifyRecord),
        "tile": (TileRows(SHAPE, budget=1 << 10), model, TileRecord),
        "prelu": (PreluSplit(), ir.from_proto(GENERATED["mobilefacenet"]()), PreluSplitRecord),
    }


@pytest.mark.parametrize("name", ["cleanup", "equalize", "fold", "remove", "mask", "relu", "reconstruct", "sparsify",
                                  "sparsify_calibrated", "tile", "prelu"])
def test_each_pass_returns_a_pass_result_with_its_typed_record(sample, name: str) -> None:
    the_pass, model, record_type = _passes(*sample)[name]
    before = _bytes(model)
    result = the_pass(model)  # with the checks on (conftest): checker, ORT run, mask oracle for removal
    assert isinstance(result, ir.passes.PassResult)
    assert isinstance(result.record, record_type)
    assert result.model is not model and _bytes(model) == before  # functional: the input is untouched
    if name != "prelu":  # PreluSplit is not one of ours: its record is frozen, but it keeps none on the pass
        assert the_pass.record is result.record
    field = dataclasses.fields(result.record)[0].name
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(result.record, field, None)


def test_the_records_say_what_the_passes_did(sample) -> None:
    model, analysis, removed, x = sample
    mask = MaskChannels(analysis, removed)(model)
    assert mask.modified and mask.record.units == tuple(sorted(removed)) and mask.record.values
    removal = RemoveChannels(analysis, removed)(model)
    assert removal.modified and removal.record.removed_units == len(removed)
    assert any(c.after < c.before for c in removal.record.layers)
    tile = TileRows(SHAPE, budget=1 << 10)(model)
    assert tile.modified == tile.record.tiled


def test_function_wrappers_give_the_passes_results(sample) -> None:
    model, analysis, removed, _ = sample
    got, record = remove_channels(model, analysis, removed)
    result = RemoveChannels(analysis, removed, check=False)(model)
    assert _bytes(got) == _bytes(result.model) and record == result.record


def test_pass_manager_composition_equals_the_function_chain() -> None:
    model = ir.from_proto(_messy_model())
    chained, rec = cleanup(model)
    chained, fold = fold_batchnorm(chained)
    clean, fold_pass = Cleanup(), FoldBatchNorm()
    result = ir.passes.PassManager([clean, fold_pass])(model)
    assert _bytes(result.model) == _bytes(chained)
    assert clean.record == rec and fold_pass.record.folded == fold.folded and fold.folded
    assert {"IdentityEliminationPass", "LiftConstantsToInitializersPass"} <= set(rec.passes)
    assert result.modified


def test_prepare_reads_both_records_from_the_composed_passes() -> None:
    proto = _messy_model()
    prep = prepare(proto, simplify=False)
    _, rec = cleanup(ir.from_proto(proto))
    assert prep.steps == [f"cleanup: {p}" for p in rec.passes] + ["folded 1 BatchNormalization into Conv"]
    assert list(prep.bn_gamma) == [n.name for n in prep.model.graph if n.op_type == "Conv"][:1]


def test_a_batchnorm_output_in_the_interface_folds_and_passes_the_checks() -> None:
    # The Conv output that takes the BN output's place has no declared type: the checks infer it, as the
    # pipeline restores the interface before writing.
    result = ir.passes.PassManager([Cleanup(check=True), FoldBatchNorm(check=True)])(ir.from_proto(_messy_model(True)))
    assert [v.name for v in result.model.graph.outputs] == ["y", "b1"]
    assert not any(n.op_type == "BatchNormalization" for n in result.model.graph)


def test_a_composed_pass_raises_its_own_error() -> None:
    class Broken(Cleanup):
        def call(self, model: ir.Model):
            raise ValueError("unsupported graph")

    with pytest.raises(ValueError, match="unsupported graph"):
        run_composed(ir.passes.PassManager([Broken(), FoldBatchNorm()]), ir.from_proto(_messy_model()))


class _WrongWeightShape(FoldBatchNorm):
    """Folds, then gives the first Conv a weight with the wrong number of input channels."""

    def call(self, model: ir.Model):
        result = super().call(model)
        conv = next(n for n in result.model.graph if n.op_type == "Conv")
        w = conv.inputs[1]
        bad = np.zeros((w.const_value.shape[0], w.const_value.shape[1] + 1, 3, 3), np.float32)
        w.const_value, w.shape = ir.tensor(bad, name=w.name), ir.Shape(bad.shape)
        return result


class _UnknownOp(FoldBatchNorm):
    """Folds, then renames a Relu to an op no schema defines."""

    def call(self, model: ir.Model):
        result = super().call(model)
        next(n for n in result.model.graph if n.op_type == "Relu").op_type = "NotAnOnnxOp"
        return result


@pytest.mark.parametrize("broken", [_WrongWeightShape, _UnknownOp])
def test_ensures_catches_a_broken_output(broken: type) -> None:
    model = ir.from_proto(GENERATED[SAMPLE]())
    with pytest.raises(ir.passes.PostconditionError):
        broken(check=True)(model)
    with pytest.raises(ir.passes.PostconditionError):
        broken()(model)  # checks on through ONNXPRUNE_CHECK_PASSES (conftest)
    broken(check=False)(model)  # off: the broken model is returned unchecked


def test_remove_channels_passes_the_mask_oracle(sample) -> None:
    model, analysis, removed, _ = sample
    assert not set(removed) & analysis.inexact  # the oracle runs (it skips units exact only inside the image)
    result = RemoveChannels(analysis, removed, check=True)(model)
    assert result.record.removed_units == len(removed)


def test_the_mask_oracle_catches_a_removal_that_changes_outputs(sample) -> None:
    model, analysis, removed, _ = sample

    class Off(RemoveChannels):
        def call(self, model: ir.Model):
            result = super().call(model)
            bias = next(n for n in result.model.graph if n.op_type == "Conv").inputs[2]
            bias.const_value = ir.tensor(bias.const_value.numpy() + 1, name=bias.name)
            return result

    with pytest.raises(ir.passes.PostconditionError, match="mask oracle"):
        Off(analysis, removed, check=True)(model)


def test_removing_unprunable_units_is_a_precondition_and_a_value_error(sample) -> None:
    model, analysis, _, _ = sample
    unprunable = [u for u, unit in analysis.units.items() if not unit.prunable]
    assert unprunable
    with pytest.raises(ir.passes.PreconditionError, match="not prunable"):
        RemoveChannels(analysis, unprunable[:1])(model)
    with pytest.raises(ValueError, match="not prunable"):
        remove_channels(model, analysis, unprunable[:1])


def test_random_feeds_fill_the_batch_and_skip_other_symbolic_dims() -> None:
    feeds = random_feeds(GENERATED[SAMPLE]())
    assert feeds is not None and feeds["input"].shape == SHAPE
    detector = GENERATED["retinaface"]()  # [N, 3, H, W]: no height to guess
    assert random_feeds(detector) is None
    assert random_feeds(detector, {"input": (1, 3, 64, 64)})["input"].shape == (1, 3, 64, 64)


def test_passes_import_from_any_working_directory(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    code = "import onnxprune.passes as p; p.Sparsify; p.RemoveChannels; print(p.__file__)"
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr
    assert Path(out.stdout.strip()).resolve() == ROOT / "passes" / "__init__.py"


def test_a_shape_the_input_model_cannot_run_is_not_blamed_on_the_pass() -> None:
    """A 5x5 kernel on a 2x2 input fails in ORT whatever the pass did: with the pass's input given, the
    run is skipped; without it, or when only the output fails, the check still raises."""
    w = numpy_helper.from_array(np.ones((1, 1, 5, 5), np.float32), "w")
    graph = helper.make_graph([helper.make_node("Conv", ["x", "w"], ["y"], name="conv")], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 1, "H", "W"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 1, "h", "w"])], [w])
    model = ir.from_proto(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=8))
    too_small = {"x": (1, 1, 2, 2)}
    assert check_output(model, shapes=too_small, source=model) == (None, None)
    with pytest.raises(ir.passes.PostconditionError, match="cannot run the output"):
        check_output(model, shapes=too_small)
    feeds, outputs = check_output(model, shapes={"x": (1, 1, 8, 8)}, source=model)
    assert feeds["x"].shape == (1, 1, 8, 8) and outputs[0].shape == (1, 1, 4, 4)
