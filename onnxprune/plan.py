"""A replayable pruning plan: which output channels of which layers a `slim` kept, and for which graph.

`slim --save-plan plan.json` writes it; `onnxprune apply-plan model.onnx plan.json` re-applies it,
e.g. to next week's retrained weights of the same architecture. The plan names layers and channel
indices of the *prepared* graph (after onnxsim, cleanup and BatchNorm folding, where node names are
stable) and carries that graph's signature: op types, node names, wiring and weight shapes, never
weight values. A plan for another graph is refused in one line. Re-applying a data-free plan to the
model it came from gives the same bytes as the `slim` that wrote it.
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np
import onnx_ir as ir

from .calibration import CalibrationSet
from .calibration.activations import consumer_moments
from .calibration.split import CalibrationSplit, check_task
from .channels.analysis import ChannelAnalysis, analyze_channels
from .errors import ConfigError
from .graph.interface import restore_interface
from .graph.io import ModelLike, ModelSource, write_text_atomic
from .graph.metrics import count_params
from .graph.shapes import Shape, graph_inputs
from .passes import remove_channels
from .passes.reconstruct import reconstruct
from .progress import Progress, log_progress
from .verify import verify

FORMAT, VERSION = "onnxprune-plan", 1


@dataclass(frozen=True)
class Plan:
    """Kept output channels per layer (indices into the original layer's outputs), and the graph they fit."""

    signature: str
    input_shapes: dict[str, list[int]]
    kept: dict[str, list[int]]  # layer (node name) -> kept output channel indices, ascending
    widths: dict[str, int] = field(default_factory=dict)  # layer -> its original output channels
    rewrites: tuple[str, ...] = ()  # exact rewrites made before the analysis ("prelu-max": slim --speedup)

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "version": VERSION, "signature": self.signature,
                           "rewrites": list(self.rewrites),
                           "input_shapes": self.input_shapes, "widths": self.widths, "kept": self.kept},
                          indent=1, sort_keys=True)

    def save(self, path: str | Path) -> Path:
        return write_text_atomic(self.to_json() + "\n", path)

    @classmethod
    def load(cls, path: str | Path) -> "Plan":
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"cannot read plan {path}: {getattr(exc, 'strerror', None) or exc}") from None
        return cls.load_text(text, str(path))

    @classmethod
    def load_text(cls, text: str, path: str = "the plan") -> "Plan":
        try:
            data = json.loads(text)
        except ValueError:
            raise ConfigError(f"{path} is not a pruning plan (not JSON)") from None
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise ConfigError(f"{path} is not a pruning plan (no \"format\": \"{FORMAT}\")")
        if data.get("version") != VERSION:
            raise ConfigError(f"plan {path} has version {data.get('version')}; this onnxprune reads version {VERSION}")
        try:
            return cls(str(data["signature"]), {k: [int(d) for d in v] for k, v in data["input_shapes"].items()},
                       {k: sorted(int(i) for i in v) for k, v in data["kept"].items()},
                       {k: int(v) for k, v in data.get("widths", {}).items()},
                       tuple(str(r) for r in data.get("rewrites", ())))
        except (KeyError, TypeError, ValueError, AttributeError):
            raise ConfigError(f"plan {path} is malformed (signature, input_shapes and kept are required)") from None


def graph_signature(model: ir.Model) -> str:
    """Hash of what a plan depends on: nodes (op, name, wiring) and weight shapes, not weight values."""
    h = hashlib.sha256()
    for node in model.graph:
        ins = [v.name if v is not None else "" for v in node.inputs]
        h.update(f"{node.op_type}|{node.name}|{','.join(ins)}|{','.join(o.name for o in node.outputs)}\n".encode())
    for name, value in sorted(model.graph.initializers.items()):
        shape = value.const_value.shape if value.const_value is not None else value.shape
        h.update(f"{name}:{tuple(shape) if shape is not None else ()}\n".encode())
    return h.hexdigest()[:32]


def make_plan(model: ir.Model, input_shapes: Mapping[str, Shape], keep: Mapping[str, np.ndarray],
              rewrites: tuple[str, ...] = ()) -> Plan:
    """The plan of a pruning of the prepared ``model`` that kept ``keep[layer]`` of each layer's outputs."""
    return Plan(graph_signature(model), {k: [int(d) for d in v] for k, v in input_shapes.items()},
                {n: np.flatnonzero(m).tolist() for n, m in sorted(keep.items()) if not m.all()},
                {n: int(len(m)) for n, m in sorted(keep.items()) if not m.all()}, tuple(rewrites))


def removed_units(analysis: ChannelAnalysis, plan: Plan) -> set[int]:
    """The channel units ``plan`` drops in ``analysis``; refuses a plan that splits a coupled group."""
    slots = {s.node: s for s in analysis.slots if s.role == "out"}
    removed, kept = set(), set()
    for node, indices in plan.kept.items():
        slot = slots.get(node)
        if slot is None:
            raise ConfigError(f"the plan prunes layer {node!r}, which has no prunable outputs in this model")
        mask = np.zeros(len(slot.elems), bool)
        if indices and (indices[-1] >= len(mask) or indices[0] < 0):
            raise ConfigError(f"the plan keeps channel {indices[-1]} of {node!r}, which has {len(mask)}")
        mask[indices] = True
        roots = analysis.root[slot.elems]
        removed.update(roots[~mask].tolist())
        kept.update(roots[mask].tolist())
    clash = removed & kept
    if clash or any(not analysis.units[u].prunable for u in removed):
        raise ConfigError("the plan removes channels this model couples to kept or unprunable ones; "
                          "it was made for a different graph")
    return removed


@dataclass
class PlanResult:
    model: object  # onnx.ModelProto
    params_before: int
    params_after: int
    refitted: int
    fidelity: object | None
    seconds: float

    def summary(self) -> str:
        lines = [f"plan applied: params {self.params_before:,} -> {self.params_after:,} "
                 f"(removed {1 - self.params_after / max(self.params_before, 1):.1%})"]
        if self.refitted:
            lines.append(f"refitted {self.refitted} layers on the calibration samples")
        if self.fidelity is not None:
            lines.append("held-out " + self.fidelity.summary())
        lines.append(f"time: {self.seconds:.1f} s")
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"schema": 1, "kind": "apply-plan", "params_before": self.params_before,
                "params_after": self.params_after, "refitted": self.refitted, "seconds": self.seconds,
                "fidelity": self.fidelity.to_dict() if self.fidelity is not None else None}


def apply_plan(model: ModelLike, plan: Plan, *, calibration: CalibrationSet | None = None, holdout: float = 0.25,
               task: str = "auto", simplify: bool = True, progress: Progress | None = None) -> PlanResult:
    """Remove the channels ``plan`` removed, from ``model`` (same architecture, any weights); with
    ``calibration``, refit the layers after them and measure held-out fidelity."""
    from .pipeline import fast_prelu, prepare  # noqa: PLC0415 - the pipeline imports this module

    start = time.perf_counter()
    say = progress or log_progress
    inputs = {i.name for i in graph_inputs(ModelSource(model).skeleton)}
    if set(plan.input_shapes) != inputs:
        raise ConfigError(f"the plan was made for another graph (its inputs {sorted(plan.input_shapes)}, this model's "
                          f"{sorted(inputs)}); run slim on this model instead")
    prep = prepare(model, input_shapes={k: tuple(v) for k, v in plan.input_shapes.items()}, simplify=simplify,
                   progress=say)
    unknown = set(plan.rewrites) - {"prelu-max"}
    if unknown:
        raise ConfigError(f"the plan needs rewrite {sorted(unknown)[0]!r}, unknown to this onnxprune")
    if "prelu-max" in plan.rewrites:
        fast_prelu(prep)
    if graph_signature(prep.model) != plan.signature:
        raise ConfigError("the plan was made for another graph (its signature differs: other layers, wiring or "
                          "weight shapes); run slim on this model instead")
    analysis = analyze_channels(prep.model, prep.shapes)
    removed = removed_units(analysis, plan)
    split, means = None, None
    if calibration is not None:
        split = CalibrationSplit.split(calibration, holdout, prep.input_shapes)
        check_task(prep.original, calibration, task)
        say(f"collecting activation statistics on {split.count} samples")
        moments = consumer_moments(prep.model, analysis, split.input_name, split.batches)
        means = {k: moments.mean(k) for k in moments.axes}
    say(f"removing {len(removed)} channel units")
    pruned, _ = remove_channels(prep.model, analysis, removed, input_means=means)
    refitted, fidelity = 0, None
    if split is not None:
        say("refitting layers on calibration data")
        pruned, rec = reconstruct(prep.model, pruned, analysis, removed, split.input_name, split.batches,
                                  downstream=True)
        refitted = len(rec.layers)
    proto = restore_interface(ir.to_proto(pruned), prep.skeleton)
    say("verifying the output model")
    verify(prep.source.runtime_model(), proto, prep.input_shapes)
    if split is not None:
        fidelity = split.evaluate(prep.original, proto, task)
    return PlanResult(proto, count_params(prep.skeleton), count_params(proto), refitted, fidelity,
                      time.perf_counter() - start)
