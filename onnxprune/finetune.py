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
from typing import Any, Sequence

import numpy as np
import onnx
import onnx_ir as ir

from .errors import ConfigError
from .fidelity import TASKS, conf_is_softmaxed, guess_task
from .graph.runtime import pieces, run_all, session
from .progress import Progress, log_progress

BATCH = 8  # samples per step (CPU training of a face model: ~1 s a step)
MAX_SHIFT = 0.04  # random translation, as a fraction of H/W
BRIGHTNESS = 0.1  # random additive brightness, in units of the data's standard deviation


def _torch():
    try:
        import torch
    except ImportError:
        raise ConfigError("distillation needs PyTorch: pip install 'onnxprune[torch]'") from None
    return torch


def _run(module: Any, input_name: str, x: Any) -> list[Any]:
    """The student's float outputs (a graph with its batch fixed to 1 runs sample by sample, in the bridge)."""
    return [_per_sample(o, len(x)) for o in module.run({input_name: x})[0] if o.dtype.is_floating_point]


def _per_sample(o: Any, n: int) -> Any:
    """``o`` with one leading entry per sample: an output without a batch axis ([A, C], as a batch-1 export
    that folds the batch into its rows gives, concatenated over samples: [n*A, C]) becomes [n, A, C]."""
    if o.dim() and o.shape[0] != n and o.shape[0] % n == 0:
        return o.reshape(n, o.shape[0] // n, *o.shape[1:])
    return o


def _is_image(x: np.ndarray) -> bool:
    return x.ndim == 4 and x.shape[1] in (1, 3) and x.shape[2] >= 8 and x.shape[3] >= 8


def _augment(x: Any, rng: np.random.Generator, std: float) -> Any:
    """Horizontal flip (p=0.5), a small random shift (edge-replicated) and brightness, per sample."""
    torch = _torch()
    F = torch.nn.functional
    n, _, h, w = x.shape
    out = []
    for i in range(n):
        s = x[i:i + 1]
        if rng.random() < 0.5:
            s = torch.flip(s, dims=[3])
        dy, dx = (int(rng.integers(-int(MAX_SHIFT * d), int(MAX_SHIFT * d) + 1)) for d in (h, w))
        if dy or dx:
            s = F.pad(s, [max(dx, 0), max(-dx, 0), max(dy, 0), max(-dy, 0)], mode="replicate")
            s = s[:, :, max(-dy, 0):max(-dy, 0) + h, max(-dx, 0):max(-dx, 0) + w]
        out.append(s + float(rng.uniform(-BRIGHTNESS, BRIGHTNESS)) * std)
    return torch.cat(out)


class _Teacher:
    """The original model in ONNX Runtime: float outputs for a torch batch, as torch tensors."""

    def __init__(self, model: onnx.ModelProto, input_name: str) -> None:
        self.model = model
        self.sess = session(model)
        self.input_name = input_name
        outs = self.sess.get_outputs()
        self.index = [i for i, o in enumerate(outs) if "float" in o.type or "double" in o.type]
        self.names = [outs[i].name for i in self.index]

    def __call__(self, x: Any) -> list[Any]:
        torch = _torch()
        arr = x.detach().cpu().numpy().astype(np.float32, copy=False)
        outs = run_all(self.sess, self.input_name, pieces(self.model, [arr], self.input_name))
        return [_per_sample(torch.from_numpy(outs[i]), len(arr)) for i in self.index]


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


def distill(original: onnx.ModelProto, pruned: ir.Model | onnx.ModelProto, input_name: str,
            batches: Sequence[np.ndarray], steps: int = 200, lr: float = 1e-4, task: str = "auto",
            augment: bool = True, seed: int = 0, progress: Progress | None = None) -> tuple[ir.Model, dict]:
    """Train ``pruned``'s initializers to reproduce ``original`` on unlabelled ``batches``.

    Returns the pruned graph with new initializer values (an onnx_ir.Model, same nodes and
    interface) and a record: task, steps, initial/final loss on the un-augmented samples, seconds.
    """
    torch = _torch()
    from .torch_bridge import to_torch, write_back

    if task not in TASKS:
        raise ConfigError(f"task must be one of {', '.join(TASKS)}, got {task!r}")
    if not batches:
        raise ConfigError("distillation needs calibration samples")
    if steps < 0 or lr <= 0:
        raise ConfigError(f"steps must be >= 0 and lr > 0, got steps={steps}, lr={lr}")
    start = time.perf_counter()
    say = progress or log_progress
    pruned_ir = ir.from_proto(pruned) if isinstance(pruned, onnx.ModelProto) else pruned
    pruned_proto = ir.to_proto(pruned_ir)
    try:
        student = to_torch(pruned_proto)
    except NotImplementedError as exc:
        raise ConfigError(f"distillation cannot run this graph in PyTorch: {exc}") from None
    student.eval()
    teacher = _Teacher(original, input_name)  # frozen: ONNX Runtime is several times faster than torch here

    data = np.concatenate([np.asarray(b) for b in batches]).astype(np.float32, copy=False)
    xs = torch.from_numpy(np.ascontiguousarray(data))
    with torch.no_grad():
        targets = [torch.cat(p) for p in zip(*(teacher(xs[i:i + BATCH]) for i in range(0, len(xs), BATCH)))]
    names = teacher.names
    np_targets = [t.numpy() for t in targets]
    if task == "auto":
        task = guess_task(names, np_targets)
    loss_fn = _Loss(task, np_targets)

    def full_loss() -> float:
        with torch.no_grad():
            total, count = 0.0, 0
            for i in range(0, len(xs), BATCH):
                out = _run(student, input_name, xs[i:i + BATCH])
                n = min(BATCH, len(xs) - i)
                total += float(loss_fn(out, [t[i:i + BATCH] for t in targets])) * n
                count += n
            return total / count

    params = [p for p in student.params.values() if p.dtype.is_floating_point]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=lr)
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    image = augment and _is_image(data)
    std = float(data.std()) or 1.0
    initial = full_loss()
    history: list[float] = []
    for step in range(steps):
        idx = rng.choice(len(xs), size=min(BATCH, len(xs)), replace=False)
        x = xs[torch.from_numpy(idx)]
        if image:
            x = _augment(x, rng, std)
            target = teacher(x)
        else:
            target = [t[torch.from_numpy(idx)] for t in targets]
        loss = loss_fn(_run(student, input_name, x), target)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        history.append(loss.item())
        say("distilling from the original", step + 1, steps)
    final = full_loss()
    out = write_back(student, pruned_ir)
    record = {"task": task, "steps": steps, "lr": lr, "augment": bool(image), "samples": int(len(xs)),
              "initial_loss": initial, "final_loss": final,
              "train_loss": [float(np.mean(history[i:i + 10])) for i in range(0, len(history), 10)],
              "seconds": time.perf_counter() - start}
    return out, record
