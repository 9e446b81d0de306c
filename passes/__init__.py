"""Graph rewrite passes. Each is a pure function (model, config) -> (new model, record of what it did).

- ``cleanup``: canonical form for analysis (constants lifted, Identity chains removed, names fixed).
- ``equalize``: cross-layer range equalisation before int8 (function-preserving).
- ``fold_batchnorm``: BatchNormalization folded into the preceding Conv, keeping γ for saliency.
- ``remove_channels``: physical removal of pruned channels (the smaller dense graph).
- ``mask_channels``: the same selection zeroed in place; the oracle that ``remove_channels`` must match.
- ``reconstruct``: least-squares refit of the layers whose inputs changed (label-free recovery).
- ``relu_activations``: LeakyRelu/PRelu after int8 convs made ReLU, so ORT fuses them (lossy, refitted after).
- ``prelu_split``: PRelu rewritten exactly into ops ORT runs fast in int8 (ReLU absorbed by doubled convs, or
  Mul+Max); an onnx-ir pass, ``PreluSplit``.
- ``sparsify``: unstructured magnitude sparsity of the remaining weights, split by a scan and refitted
  (``slim --sparsity``; import ``onnxprune.passes.sparsify``: it reads ``onnxprune.sensitivity``, which imports
  this package).
"""

from .cleanup import CleanupRecord, cleanup
from .equalize import EqualizeRecord, equalize
from .fold_batchnorm import FoldRecord, fold_batchnorm
from .mask_channels import mask_channels
from .prelu_split import PreluSplit, PreluSplitRecord, prelu_split
from .relu_activations import ReluRecord, fusable_activations, relu_activations
from .remove_channels import RemovalRecord, remove_channels

__all__ = [
    "CleanupRecord", "cleanup", "EqualizeRecord", "equalize", "FoldRecord", "fold_batchnorm", "mask_channels",
    "ReluRecord", "fusable_activations", "relu_activations", "RemovalRecord", "remove_channels", "PreluSplit",
    "PreluSplitRecord", "prelu_split",
]
