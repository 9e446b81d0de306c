"""Label-free knowledge distillation of a pruned graph from its original, on the calibration samples.

The pruned model keeps its ONNX graph: it is run in torch by :mod:`onnxprune.torch_bridge`, its
float initializers are trained with Adam to reproduce the original's outputs on (augmented)
unlabelled samples, and the new values are written back into the same graph. BatchNorm stays
folded (the graphs given are): only existing weights and biases change, no node is added.

Losses, by task (``task='auto'`` guesses from the original's outputs, as the fidelity report does):

* ``embedding``: ``1 - cosine(student, teacher)``, what face verification compares;
* ``detection`` / ``outputs``: MSE per output normalised by the teacher's variance of that output,
  plus KL(teacher || student) on outputs that are softmax probabilities (RetinaFace ``conf``);
* ``classification``: KL on the class distributions (softmax of logits when not probabilities).

Needs PyTorch (``pip install 'onnxprune[torch]'``).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from .calibration.augment import augment, is_image, mix
from .errors import ConfigError
from .fidelity import TASKS, conf_is_softmaxed, guess_task
from .graph.runtime import pieces, run_all, session
from .progress import Progress, log_progress
from .records import record_dict

BATCH = 8  # samples per step (CPU training of a face model: ~1 s a step)


def _torch():
    try:
        import torch
    except ImportError:
        raise ConfigError("distillation needs PyTorch: pip install 'onnxprune[torch]'") from None
    return torch


def _per_sample(o: Any, n: int) -> Any:
    """``o`` with one leading entry per sample: an output without a batch axis ([A, C], as a batch-1 export
    that folds the batch into its rows gives, concatenated over samples: [n*A, C]) becomes [n, A, C].
    A numpy array or a torch tensor: the teacher's outputs and the student's."""
    if o.ndim and o.shape[0] != n and o.shape[0] % n == 0:
        return o.reshape(n, o.shape[0] // n, *o.shape[1:])
    return o


class _Loss:
    """The distillation loss for one task, fixed from the teacher's outputs on the data."""

    def __init__(self, task: str, teacher: Sequence[np.ndarray]) -> None:
        self.task = task
        self.scale = [float(np.var(t)) or 1.0 for t in teacher]
        self.softmaxed = [t.ndim >= 2 and t.shape[-1] > 1 and conf_is_softmaxed(t.reshape(-1, t.shape[-1]))
                          for t in teacher]

    def __call__(self, student: Sequence[Any], teacher: Sequence[Any]) -> Any:
        torch = _torch()
        F = torch.nn.functional
        if self.task == "embedding":
            s, t = student[0].flatten(1), teacher[0].flatten(1)
            return (1 - F.cosine_similarity(s, t, dim=1, eps=1e-8)).mean()
        total = 0.0
        for i, (s, t) in enumerate(zip(student, teacher)):
            if self.task == "classification" or self.softmaxed[i]:
                if self.softmaxed[i]:
                    logp_s = torch.log(s.clamp_min(1e-8))
                    p_t = t
                else:
                    logp_s, p_t = F.log_softmax(s, dim=-1), F.softmax(t, dim=-1)
                kl = (p_t * (torch.log(p_t.clamp_min(1e-8)) - logp_s)).sum(-1).mean()
                total = total + kl
                if self.task == "classification":
                    continue
            total = total + F.mse_loss(s, t) / self.scale[i]
        return total


FEATURE_BUDGET = 2_000_000  # feature-map elements matched per sample (8 MB): the smallest maps first


@dataclass(frozen=True)
class DistillOptions:
    """How a pruned model is distilled from its original on unlabelled samples."""

    steps: int = 200
    lr: float = 1e-4
    task: str = "auto"  # one of fidelity.TASKS; "auto" guesses from the original's outputs
    augment: bool = True  # image samples: a new random variant every step (calibration/augment.py)
    seed: int = 0  # batches and augmentation: the same seed gives the same weights
    features: float = 1.0  # weight of the feature-map loss beside the output loss (0: outputs only)
    eval_every: int = 25  # held-out loss checked this often; the weights with the lowest are kept
    mix: float = 0.0  # image samples: share of each batch blended with another sample (unlabelled mixup)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {self.task!r}")
        if self.steps < 0 or self.lr <= 0:
            raise ConfigError(f"steps must be >= 0 and lr > 0, got steps={self.steps}, lr={self.lr}")
        if self.features < 0 or self.eval_every < 1:
            raise ConfigError(f"features must be >= 0 and eval_every >= 1, got {self.features}, {self.eval_every}")


@dataclass(frozen=True)
class FeatureMap:
    """A Conv output present in the original and the pruned graph, under the same name."""

    name: str
    channels: tuple[int, ...] | None  # the original's channels the pruned tensor kept (None: all)
    size: int  # elements per sample in the original


@dataclass(frozen=True)
class DistillRecord:
    """What distillation did. Losses are on un-augmented samples; ``held_out_*`` on the held-out ones."""

    task: str
    steps: int
    lr: float
    augment: bool
    samples: int
    initial_loss: float
    final_loss: float
    held_out_initial: float | None
    held_out_best: float | None
    best_step: int  # the step whose weights were kept (0: none improved the held-out loss)
    feature_maps: int
    train_loss: tuple[float, ...]  # mean training loss of every 10 steps
    seconds: float

    def to_dict(self) -> dict:
        return {**record_dict(self), "train_loss": list(self.train_loss)}

    def summary(self) -> str:
        text = f"distilled {self.steps} steps: loss {self.initial_loss:.4g} -> {self.final_loss:.4g}"
        if self.held_out_best is not None:
            text += (f"; held-out {self.held_out_initial:.4g} -> {self.held_out_best:.4g}"
                     + (f" (best at step {self.best_step})" if self.best_step else " (not improved)"))
        return text + (f"; {self.feature_maps} feature maps matched" if self.feature_maps else "")

    def improved(self) -> bool:
        """Lower loss than before, on the held-out samples when there are some."""
        if self.held_out_best is not None and self.held_out_initial is not None:
            return self.held_out_best < self.held_out_initial
        return self.final_loss <= self.initial_loss


def feature_maps(reference: ir.Model, pruned: ir.Model, keep: Mapping[str, np.ndarray]) -> list[FeatureMap]:
    """The Conv outputs of ``pruned`` that ``reference`` (the prepared original, same names) also has,
    with the channels they kept (``keep``: per layer, its original outputs still present), smallest
    first up to :data:`FEATURE_BUDGET` elements per sample."""
    ref = {n.name: n for n in reference.graph if n.op_type == "Conv"}
    found = []
    for node in pruned.graph:
        r = ref.get(node.name)
        if node.op_type != "Conv" or r is None or r.outputs[0].name != node.outputs[0].name:
            continue
        size, width, ref_width = _numel(r.outputs[0]), _out_channels(node), _out_channels(r)
        if size is None or width is None or ref_width is None:
            continue
        kept = np.flatnonzero(keep[node.name]) if node.name in keep else np.arange(ref_width)
        if len(kept) != width:
            continue
        found.append(FeatureMap(node.outputs[0].name, None if width == ref_width else tuple(int(c) for c in kept), size))
    chosen, total = [], 0
    for f in sorted(found, key=lambda f: f.size):
        if total + f.size > FEATURE_BUDGET:
            break
        chosen.append(f)
        total += f.size
    return chosen


def _out_channels(node: ir.Node) -> int | None:
    w = node.inputs[1] if len(node.inputs) > 1 else None
    return int(w.const_value.shape[0]) if w is not None and w.const_value is not None else None


def _numel(value: ir.Value) -> int | None:
    shape = value.shape
    if shape is None or len(shape) != 4 or not all(isinstance(d, int) for d in shape[1:]):
        return None
    return int(np.prod([d for d in shape[1:]]))


class _Teacher:
    """The original in ONNX Runtime: its float outputs, and the feature maps asked for, for a batch."""

    def __init__(self, model: onnx.ModelProto, input_name: str, features: Sequence[FeatureMap] = ()) -> None:
        proto = onnx.ModelProto()
        proto.CopyFrom(model)
        n_out = len(proto.graph.output)
        for f in features:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(f.name, onnx.TensorProto.FLOAT, None))
        self.model, self.sess, self.input_name, self.features = proto, session(proto), input_name, list(features)
        outs = self.sess.get_outputs()[:n_out]
        self.index = [i for i, o in enumerate(outs) if "float" in o.type or "double" in o.type]
        self.names = [outs[i].name for i in self.index]
        self.n_out = n_out

    def __call__(self, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        outs = run_all(self.sess, self.input_name, pieces(self.model, [x], self.input_name))
        feats = [outs[self.n_out + k] if f.channels is None else outs[self.n_out + k][:, list(f.channels)]
                 for k, f in enumerate(self.features)]
        return [_per_sample(outs[i], len(x)) for i in self.index], feats

    def batched(self, x: np.ndarray) -> tuple[list[np.ndarray], list[np.ndarray]]:
        parts = [self(x[i:i + BATCH]) for i in range(0, len(x), BATCH)]
        return [np.concatenate(p) for p in zip(*(o for o, _ in parts))], [np.concatenate(p) for p in zip(*(f for _, f in parts))]


class _Student:
    """The pruned graph in the torch bridge, trained in place; outputs and feature maps for a batch."""

    def __init__(self, model: ir.Model, input_name: str, features: Sequence[FeatureMap]) -> None:
        from .torch_bridge import to_torch

        try:
            self.module = to_torch(ir.to_proto(model))
        except NotImplementedError as exc:
            raise ConfigError(f"distillation cannot run this graph in PyTorch: {exc}") from None
        self.module.eval()
        self.input_name, self.capture = input_name, [f.name for f in features]
        self.params = [p for p in self.module.params.values() if p.dtype.is_floating_point]

    def __call__(self, x: Any) -> tuple[list[Any], list[Any]]:
        outs, captured = self.module.run({self.input_name: x}, capture=self.capture)
        return [_per_sample(o, len(x)) for o in outs if o.dtype.is_floating_point], [captured[c] for c in self.capture]

    def snapshot(self) -> list[Any]:
        return [p.detach().clone() for p in self.params]

    def restore(self, values: list[Any]) -> None:
        torch = _torch()
        with torch.no_grad():
            for p, v in zip(self.params, values):
                p.copy_(v)


class _Objective:
    """Output loss for the task plus ``weight`` x the mean feature-map MSE (each map over its variance)."""

    def __init__(self, task: str, outputs: Sequence[np.ndarray], feats: Sequence[np.ndarray], weight: float) -> None:
        self.output = _Loss(task, outputs)
        self.scales = [float(np.var(f)) or 1.0 for f in feats]
        self.weight = weight

    def __call__(self, student: tuple[list[Any], list[Any]], teacher: tuple[list[Any], list[Any]]) -> Any:
        F = _torch().nn.functional
        loss = self.output(student[0], teacher[0])
        if self.weight and self.scales:
            feat = sum(F.mse_loss(s, t) / v for s, t, v in zip(student[1], teacher[1], self.scales))
            loss = loss + self.weight * feat / len(self.scales)
        return loss


def distill(original: onnx.ModelProto, pruned: ir.Model | onnx.ModelProto, input_name: str,
            batches: Sequence[np.ndarray], options: DistillOptions = DistillOptions(), *,
            held: np.ndarray | None = None, reference: ir.Model | None = None,
            keep: Mapping[str, np.ndarray] | None = None, progress: Progress | None = None
            ) -> tuple[ir.Model, DistillRecord]:
    """Train ``pruned``'s initializers to reproduce ``original`` on unlabelled ``batches``.

    ``reference`` (the original after the same preparation, so its value names match the pruned
    graph's) adds feature-map targets: the Conv outputs both graphs have, on the channels ``keep``
    says were kept. ``held`` samples (never trained on) pick the weights to keep: every
    ``options.eval_every`` steps their output loss is measured, and the best weights (the
    starting ones included) are returned. Returns the pruned graph with new initializer values
    (same nodes and interface) and a :class:`DistillRecord`.
    """
    _torch()
    if not batches:
        raise ConfigError("distillation needs calibration samples")
    start = time.perf_counter()
    pruned_ir = ir.from_proto(pruned) if isinstance(pruned, onnx.ModelProto) else pruned
    feats = feature_maps(reference, pruned_ir, keep or {}) if reference is not None and options.features else []
    teacher = _Teacher(ir.to_proto(reference) if reference is not None else original, input_name, feats)
    student = _Student(pruned_ir, input_name, feats)
    data = np.concatenate([np.asarray(b) for b in batches]).astype(np.float32, copy=False)
    fit = teacher.batched(data)
    task = guess_task(teacher.names, fit[0]) if options.task == "auto" else options.task
    objective = _Objective(task, fit[0], fit[1], options.features)
    held = held if held is not None and len(held) else None
    held_fit = (held, teacher.batched(held)[0]) if held is not None else None
    loop = _Loop(student, teacher, objective, options, data, progress or log_progress)
    initial = loop.loss(data, fit[0])
    history, best = loop.train(held_fit)
    final = loop.loss(data, fit[0])
    record = DistillRecord(task, options.steps, options.lr, loop.image, len(data), initial, final,
                           best.initial, best.value, best.step, len(feats),
                           tuple(float(np.mean(history[i:i + 10])) for i in range(0, len(history), 10)),
                           time.perf_counter() - start)
    from .torch_bridge import write_back
    return write_back(student.module, pruned_ir), record


@dataclass
class _Best:
    initial: float | None = None
    value: float | None = None
    step: int = 0
    weights: list | None = None


class _Loop:
    """The training loop: seeded batches, augmentation, Adam, keep-best on held-out samples."""

    def __init__(self, student: _Student, teacher: _Teacher, objective: _Objective, options: DistillOptions,
                 data: np.ndarray, say: Progress) -> None:
        self.student, self.teacher, self.objective, self.options, self.data, self.say = \
            student, teacher, objective, options, data, say
        self.image = options.augment and is_image(data)
        self.std = float(data.std()) or 1.0

    def loss(self, x: np.ndarray, outputs: Sequence[np.ndarray]) -> float:
        """Output loss (no feature term) on un-augmented ``x``, batch by batch."""
        torch = _torch()
        total = 0.0
        with torch.no_grad():
            for i in range(0, len(x), BATCH):
                out = self.student(torch.from_numpy(np.ascontiguousarray(x[i:i + BATCH])))[0]
                want = [torch.from_numpy(t[i:i + BATCH]) for t in outputs]
                total += float(self.objective.output(out, want)) * len(out[0])
        return total / len(x)

    def train(self, held: tuple[np.ndarray, list[np.ndarray]] | None) -> tuple[list[float], _Best]:
        torch = _torch()
        for p in self.student.params:
            p.requires_grad_(True)
        opt = torch.optim.Adam(self.student.params, lr=self.options.lr)
        rng = np.random.default_rng(self.options.seed)
        torch.manual_seed(self.options.seed)
        best, history = self._check(held, _Best(), 0), []
        for step in range(1, self.options.steps + 1):
            history.append(self._step(opt, rng))
            self.say("distilling from the original", step, self.options.steps)
            if held is not None and (step % self.options.eval_every == 0 or step == self.options.steps):
                best = self._check(held, best, step)
        if best.weights is not None and best.step != self.options.steps:
            self.student.restore(best.weights)
        return history, best

    def _step(self, opt: Any, rng: np.random.Generator) -> float:
        torch = _torch()
        x = self.data[rng.choice(len(self.data), size=min(BATCH, len(self.data)), replace=False)]
        if self.image:
            x = mix(augment(x, rng, std=self.std), rng, self.options.mix)
        outs, feats = self.teacher(x)
        target = ([torch.from_numpy(o) for o in outs], [torch.from_numpy(np.ascontiguousarray(f)) for f in feats])
        loss = self.objective(self.student(torch.from_numpy(np.ascontiguousarray(x))), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return float(loss.item())

    def _check(self, held: tuple[np.ndarray, list[np.ndarray]] | None, best: _Best, step: int) -> _Best:
        if held is None:
            return best
        value = self.loss(*held)
        if best.value is None or value < best.value:
            return _Best(best.initial if step else value, value, step, self.student.snapshot())
        return best
