"""Graph rewrite passes, as onnx-ir passes (installed as ``onnxprune.passes``).

Each rewrite is an ``onnx_ir.passes.PassBase`` (a ``FunctionalPass``: the input model is never
modified) configured in its constructor, data included. ``Pass(config)(model)`` returns a
``PassResult`` subclass whose ``.record`` (a frozen dataclass) says what the pass did; the pass
keeps the last record in its own ``.record`` too, for passes composed with ``ir.passes.PassManager``,
whose result drops it. Each pass also has a function wrapper with the signature callers use,
``fn(model, config) -> (new model, record)`` (``mask_channels`` returns the model alone). The
wrappers ``reconstruct``, ``tile_rows`` and ``sparsify`` are imported from their modules
(``onnxprune.passes.reconstruct.reconstruct``): here those names are the modules.

Postconditions (``onnx.checker``, an ONNX Runtime run, the mask oracle for removal) run when
``ONNXPRUNE_CHECK_PASSES=1`` or ``check=True``: off by default, for speed (see :mod:`.checks`).

- ``Cleanup`` / ``cleanup``: canonical form for analysis (constants lifted, Identity chains removed, names fixed).
- ``Equalize`` / ``equalize``: cross-layer range equalisation before int8 (function-preserving).
- ``FoldBatchNorm`` / ``fold_batchnorm``: BatchNormalization folded into the preceding Conv, keeping γ for saliency.
- ``RemoveChannels`` / ``remove_channels``: physical removal of pruned channels (the smaller dense graph).
- ``MaskChannels`` / ``mask_channels``: the same selection zeroed in place; the oracle that removal must match.
- ``Reconstruct`` / ``reconstruct``: least-squares refit of the layers whose inputs changed (label-free recovery).
- ``ReluActivations`` / ``relu_activations``: LeakyRelu/PRelu after int8 convs made ReLU, so ORT fuses them
  (lossy, refitted after).
- ``PreluSplit`` / ``prelu_split``: PRelu rewritten exactly into ops ORT runs fast in int8 (ReLU absorbed by
  doubled convs, or Mul+Max).
- ``TileRows`` / ``tile_rows``: the high-resolution prefix run in row strips (int8 models, cache-bound layers).
- ``Sparsify`` / ``sparsify``: unstructured magnitude sparsity of the remaining weights, split by a scan and
  refitted (``slim --sparsity``). It reads ``onnxprune.sensitivity``, which imports this package, so it is
  loaded on first use of those names (or import ``onnxprune.passes.sparsify``).
- ``GatePass`` (``onnxprune.passes.gate``): the motion-gated video detector rewrite.
"""

from .checks import CheckedPass, checks_enabled, run_composed
from .cleanup import Cleanup, CleanupRecord, CleanupResult, cleanup
from .equalize import Equalize, EqualizeRecord, EqualizeResult, equalize
from .fold_batchnorm import FoldBatchNorm, FoldRecord, FoldResult, fold_batchnorm
from .mask_channels import MaskChannels, MaskRecord, MaskResult, mask_channels
from .prelu_split import PreluSplit, PreluSplitRecord, PreluSplitResult, prelu_split
from .reconstruct import Reconstruct, ReconstructRecord, ReconstructResult
from .relu_activations import ReluActivations, ReluRecord, ReluResult, fusable_activations, relu_activations
from .remove_channels import RemovalError, RemovalRecord, RemovalResult, RemoveChannels, remove_channels
from .tile_rows import TileRecord, TileResult, TileRows

_LAZY = {"Sparsify", "SparsifyRecord", "SparsifyResult"}  # see the module doc

__all__ = [
    "CheckedPass", "checks_enabled", "run_composed",
    "Cleanup", "CleanupRecord", "CleanupResult", "cleanup",
    "Equalize", "EqualizeRecord", "EqualizeResult", "equalize",
    "FoldBatchNorm", "FoldRecord", "FoldResult", "fold_batchnorm",
    "MaskChannels", "MaskRecord", "MaskResult", "mask_channels",
    "PreluSplit", "PreluSplitRecord", "PreluSplitResult", "prelu_split",
    "Reconstruct", "ReconstructRecord", "ReconstructResult",
    "ReluActivations", "ReluRecord", "ReluResult", "fusable_activations", "relu_activations",
    "RemovalError", "RemovalRecord", "RemovalResult", "RemoveChannels", "remove_channels",
    "TileRecord", "TileResult", "TileRows",
    *sorted(_LAZY),
]


def __getattr__(name: str):
    if name in _LAZY:
        from . import sparsify as module  # noqa: PLC0415 - deferred: see the module doc

        return getattr(module, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
