"""``onnxprune`` command line: ``slim`` and ``analyze``.

Errors in the user's input print one line and exit with status 2; the input model is never
touched and outputs appear atomically or not at all.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Sequence

from . import __version__
from .errors import ConfigError, OnnxPruneError, TargetUnreachableError
from .executors import EXECUTORS, make_executor
from .calibration import PRESETS, Preprocess, load_calibration, load_identities, parse_floats, parse_size
from .calibration.presets import infer_preset, preset_help
from .calibration.split import check_task
from .fidelity import TASKS
from .graph.io import check_writable, load_proto, save_atomic, write_text_atomic
from .graph.shapes import parse_input_shape
from .int8 import DEFAULT_THRESHOLDS
from .progress import ConsoleProgress, configure_logging
from .compress import PruneOptions, QuantizeOptions, compress
from .pipeline import CALIBRATED_CRITERION, DEFAULT_CRITERION, DEFAULT_ROUND_TO, analyze
from .quantization import THRESHOLDS
from .quantization.prelu import PRELU_MODES
from .report import write_json
from .saliency.criteria import DESCRIPTIONS

SAMPLE_PREFIX = "sample:"
_VERBOSE = "log what happens to stderr (-v: steps, -vv: debug detail)"


def _model_arg(spec: str) -> str:
    """A path, or ``sample:NAME`` for one of the bundled sample models (fetched or generated)."""
    if not spec.startswith(SAMPLE_PREFIX):
        return spec
    from .sample_models import SampleUnavailable, sample_path
    name = spec[len(SAMPLE_PREFIX):]
    try:
        return str(sample_path(name))
    except KeyError as exc:
        raise ConfigError(str(exc.args[0]) if exc.args else f"unknown sample {name}") from None
    except SampleUnavailable as exc:
        raise ConfigError(f"sample {name} is unavailable: {exc}") from None


def _default_output(model: str, suffix: str = ".slim.onnx") -> Path:
    """IN.slim.onnx next to the input; for a sample model (kept in the hidden model cache, see
    ``_model_arg``) in the working directory instead, as an absolute path the summary shows."""
    from .sample_models import default_cache_dir
    p = Path(model)
    name = p.stem + suffix if p.suffix == ".onnx" else p.name + suffix
    if p.resolve().parent == default_cache_dir().resolve():
        return Path.cwd() / name
    return p.with_name(name)


def _shapes(specs: Sequence[str] | None) -> dict[str, tuple[int, ...]]:
    return dict(parse_input_shape(s) for s in specs or [])


def _ratio(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    return value


def _calibration(args: argparse.Namespace, model: str, progress: ConsoleProgress):
    """Load --calib with the preprocessing options, or None; options without --calib are an error.

    The task (``--task``, or the one guessed) is checked on one sample here, before any expensive work.
    """
    given = {k: getattr(args, k) for k in ("preset", "size", "mean", "std", "channel_order", "layout", "resize")
             if getattr(args, k) is not None}
    if args.calib is None:
        if given:
            raise ConfigError(f"--{next(iter(given)).replace('_', '-')} only applies with --calib")
        return None
    proto = load_proto(model)
    progress("loading calibration data")
    data = load_calibration(args.calib, proto, count=args.calib_count, seed=args.seed,
                            preprocess=_explicit_preprocess(args, proto, given),
                            preset=args.preset if given.keys() == {"preset"} else None, progress=progress)
    check_task(proto, data, args.task)
    progress.done()
    if not args.quiet:
        for note in data.notes:
            print(f"onnxprune: note: {note}", file=sys.stderr)
    return data


def _explicit_preprocess(args: argparse.Namespace, proto, given: dict) -> Preprocess | None:
    """--size/--mean/... over the preset (given or inferred from the model); None when only a preset is given."""
    if not given.keys() - {"preset"}:
        return None
    from dataclasses import replace
    inferred = None if args.preset else infer_preset(proto)
    base = PRESETS[args.preset] if args.preset else (inferred.preprocess() if inferred else Preprocess())
    fields: dict = {}
    if args.size:
        fields["size"] = parse_size(args.size)
    if args.mean:
        fields["mean"] = parse_floats(args.mean)
    if args.std:
        fields["std"] = parse_floats(args.std)
    for k in ("channel_order", "layout", "resize"):
        if getattr(args, k):
            fields[k] = getattr(args, k)
    return replace(base, **fields)


class _PresetAction(argparse.Action):
    """``--preset NAME``, or ``--preset help``: print the presets and exit."""

    def __call__(self, parser, namespace, values, option_string=None):
        if values == "help":
            print(preset_help())
            parser.exit(0)
        if values not in PRESETS:
            parser.error(f"argument --preset: unknown preset {values!r} (choose from {', '.join(PRESETS)}, "
                         "or help)")
        setattr(namespace, self.dest, values)


RELU_HELP = ("make LeakyRelu/PRelu after int8 convs ReLU, which ORT fuses into the conv (faster on CPU; changes the "
             "function: the next layers are refitted on --calib and the fidelity reported includes it)")
PRELU_HELP = ("PReLU layers rewritten exactly into ops ONNX Runtime runs fast in an int8 model (it has no int8 PRelu, "
              "and its float one is slow): auto (default) times the two rewrites on the model and keeps the faster, "
              "split rewrites every one, keep none")
MAX_DROP_HELP = ("keep the layers that add the most int8 error in float (each alone or with the layers feeding it), "
                 "and on PReLU models try the more precise PReLU form, until the held-out fidelity drop is at most X")
ORT_COMPARE = {"auto": None, "on": True, "off": False}  # quantize --ort-compare -> QuantizeOptions.compare_ort
TILE_HELP = ("do not run the full-resolution first layers in cache-sized strips of rows (on by default where it "
             "applies; same outputs, faster on detector stems)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnxprune", description="Compress ONNX face detectors and recognizers: structured channel pruning, int8 quantization, "
                    "latency benchmarks and a CI gate.")
    parser.add_argument("--version", action="version", version=f"onnxprune {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("model", help="input .onnx file, or sample:NAME (see `python -m onnxprune.sample_models list`)")
    common.add_argument("--input-shape", action="append", metavar="NAME=1x3x640x640",
                        help="concrete shape used for analysis only (dynamic dims stay dynamic in the output); repeatable")
    common.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                        help="keep layers whose node name matches intact (quantize: in float); a glob when it has * ? [ "
                             "and no regex-only character (^ $ + \\ ( ) { } | .*), else a regex searched in the name; "
                             "repeatable")
    common.add_argument("--no-simplify", action="store_true", help="do not run onnxsim before analysis")
    common.add_argument("--json", metavar="REPORT.json", help="also write the report as JSON")
    common.add_argument("--report", metavar="DIR",
                        help="also write DIR/report.html (self-contained, with charts) and PNG charts (with matplotlib)")
    common.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    common.add_argument("-v", "--verbose", action="count", default=0, help=_VERBOSE)

    calib = argparse.ArgumentParser(add_help=False)
    cal = calib.add_argument_group("calibration (unlabelled samples in the model's input format)")
    cal.add_argument("--calib", metavar="PATH", help="folder of images (jpg/png/bmp), one image, or .npy/.npz in the model's input format")
    cal.add_argument("--calib-count", type=int, default=64, metavar="N", help="samples to use (default 64)")
    cal.add_argument("--seed", type=int, default=0, help="which images are picked and, with --finetune-steps, how they are augmented "
                     "(deterministic; default 0)")
    cal.add_argument("--preset", action=_PresetAction, metavar="NAME",
                     help="preprocessing of a face-model family (default: inferred from the model); "
                          "`--preset help` lists them")
    cal.add_argument("--size", metavar="HxW", help="image size fed to the model (default: preset or model input)")
    cal.add_argument("--mean", metavar="A,B,C", help="per-channel mean subtracted (in --channel-order)")
    cal.add_argument("--std", metavar="A,B,C", help="per-channel divisor")
    cal.add_argument("--channel-order", choices=["rgb", "bgr"])
    cal.add_argument("--layout", choices=["nchw", "nhwc"])
    cal.add_argument("--resize", choices=["letterbox", "resize"], help="letterbox keeps the aspect ratio (pads with the mean)")
    cal.add_argument("--holdout", type=float, default=0.25, metavar="F",
                     help="share of the samples kept out of fitting to measure fidelity (default 0.25)")
    cal.add_argument("--task", choices=list(TASKS), default="auto", help="fidelity metric (default: guessed from outputs)")
    cal.add_argument("--identities", metavar="DIR",
                     help="recognizers: DIR/<person>/<crops>; reports verification accuracy and FNMR@FMR before/after")

    crit = "; ".join(f"{k}: {v}" for k, v in DESCRIPTIONS.items())
    p = sub.add_parser("slim", parents=[common, calib], help="remove channels to shrink a model",
                       description="Remove whole channels (a smaller dense graph) until --ratio of the parameters are "
                                   "gone, or until the model runs --speedup times faster on ONNX Runtime.")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--ratio", type=_ratio, help="share of parameters to remove, in [0, 1)")
    budget.add_argument("--speedup", type=float, metavar="S",
                        help="latency target: original/compressed on --providers with --threads at the analysis "
                             "shape (with --int8: the int8 model against the float original); channels are chosen "
                             "by fidelity lost per millisecond saved, from per-layer times measured on this machine "
                             "(cached); the report gives predicted and measured speed-up")
    p.add_argument("--stages", type=int, metavar="N",
                   help="prune in N steps, each refitted (and distilled with --finetune-steps) and rescored before "
                        "the next (default 1 with --ratio; with --speedup, enough that no stage buys more than 2x)")
    p.add_argument("--providers", default="CPUExecutionProvider", metavar="EP",
                   help="with --speedup: the execution provider the target is measured on (default CPUExecutionProvider)")
    p.add_argument("--threads", type=int, default=1, metavar="N", help="with --speedup: intra-op threads (default 1)")
    p.add_argument("--save-plan", metavar="PLAN.json",
                   help="also write the pruning plan (kept channels per layer and the graph they fit), to re-apply "
                        "with `onnxprune apply-plan` to retrained weights of the same architecture")
    p.add_argument("--strict", action="store_true",
                   help="with --speedup: an unreachable target is an error (exit 1, nothing written) instead of a "
                        "warning with the best model reached")
    p.add_argument("--sparsity", type=_ratio, default=0.0, metavar="S",
                   help="then set this share of the remaining Conv/Gemm/MatMul weights to zero, in [0, 1) (smallest "
                        "magnitudes, spread by a per-layer scan and refitted with --calib; the file compresses, "
                        "README 'Sparse weights')")
    p.add_argument("-o", "--output", help="output path (default: IN.slim.onnx next to the input; for sample:NAME, in the "
                        "working directory)")
    p.add_argument("--criterion", default=None,
                   help=f"channel importance (default {DEFAULT_CRITERION}, or {CALIBRATED_CRITERION} with --calib). {crit}")
    p.add_argument("--round-to", type=int, default=DEFAULT_ROUND_TO, metavar="N",
                   help=f"keep channel counts multiples of N (default {DEFAULT_ROUND_TO}: fastest on ONNX Runtime CPU kernels)")
    p.add_argument("--min-keep", type=float, default=0.1, metavar="FRAC",
                   help="keep at least this share of every layer's channels (default 0.1)")

    p.add_argument("--allocation", choices=["auto", "uniform", "sensitivity"], default="auto",
                   help="how the budget is spread: per-group sensitivity scan (default with --calib) or global ranking")
    p.add_argument("--no-recover", action="store_true", help="do not refit the layers after removed channels")
    p.add_argument("--workers", type=int, default=2, metavar="N", help="parallel workers for the sensitivity scan")
    p.add_argument("--executor", choices=list(EXECUTORS), default="local",
                   help="where the sensitivity scan runs: local processes (default) or ray")
    p.add_argument("--ray-address", metavar="ADDR", help="with --executor ray: join this cluster")
    p.add_argument("--finetune-steps", type=int, default=0, metavar="N",
                   help="then distil from the original on the calibration images for N steps: augmented batches, outputs "
                        "and feature maps matched, the held-out images keeping the best weights (needs onnxprune[torch])")
    p.add_argument("--int8", action="store_true", help="then quantize to int8 (needs --calib; see `quantize`)")
    p.add_argument("--thresholds", choices=list(THRESHOLDS), default=DEFAULT_THRESHOLDS,
                   help=f"with --int8: how activation ranges are chosen (default {DEFAULT_THRESHOLDS})")
    p.add_argument("--relu", action="store_true", help="with --int8: " + RELU_HELP)
    p.add_argument("--no-tile", action="store_true", help="with --int8: " + TILE_HELP)
    p.add_argument("--prelu", choices=PRELU_MODES, default="auto", help="with --int8: " + PRELU_HELP)
    p.add_argument("--max-drop", type=float, metavar="X",
                   help="with --int8: " + MAX_DROP_HELP + " (the int8 model against the pruned one)")

    _add_quantize_parser(sub, [common, calib])

    b = sub.add_parser("bench", help="interleaved latency benchmark of one or more models",
                       description="Time models interleaved (A B A B ...) so machine drift cannot fake a speed-up; "
                                   "ratios are to the first model, round by round.")
    b.add_argument("models", nargs="+", help=".onnx files or sample:NAME; the first is the reference")
    b.add_argument("--providers", default="CPUExecutionProvider", help="comma-separated ORT execution providers")
    b.add_argument("--threads", default="1", help="comma-separated intra-op thread counts (default 1)")
    b.add_argument("--input-shape", action="append", metavar="NAME=1x3x640x640",
                   help="input shape; repeat for a resolution sweep")
    b.add_argument("--runs", type=int, default=50)
    b.add_argument("--warmup", type=int, default=5)
    b.add_argument("--accuracy", metavar="A,B,...",
                   help="accuracy or fidelity in (0, 1] of each model, in order (empty: unknown), for NetScore")
    b.add_argument("--json", metavar="OUT.json")
    b.add_argument("--report", metavar="DIR", help="also write DIR/report.html and latency.png")
    b.add_argument("-q", "--quiet", action="store_true")
    b.add_argument("-v", "--verbose", action="count", default=0, help=_VERBOSE)

    c = sub.add_parser("check", parents=[calib], help="CI gate: validity, fidelity, speed-up and size thresholds",
                       description="Exit 0 when every threshold passes, 1 when one fails, 2 on a usage or input error.")
    c.add_argument("original")
    c.add_argument("candidate")
    c.add_argument("--min-fidelity", type=float, help="minimum task metric (or mean output cosine without --task)")
    c.add_argument("--max-drop", type=float, help="maximum 1 - fidelity")
    c.add_argument("--min-speedup", type=float, help="minimum original/candidate median latency ratio")
    c.add_argument("--max-size-ratio", type=float, help="maximum candidate/original file size")
    c.add_argument("--runs", type=int, default=30)
    c.add_argument("--json", metavar="OUT.json")
    c.add_argument("--junit", metavar="OUT.xml", help="JUnit XML, one test case per threshold")
    c.add_argument("--markdown", metavar="OUT.md", help="summary table for a pull-request comment")
    c.add_argument("--report", metavar="DIR", help="also write DIR/report.html (and latency.png with --min-speedup)")
    c.add_argument("-q", "--quiet", action="store_true")
    c.add_argument("-v", "--verbose", action="count", default=0, help=_VERBOSE)

    w = sub.add_parser("sweep", parents=[calib], help="compress at several ratios/criteria/int8; fidelity vs latency frontier",
                       description="Every (model, ratio, criterion, int8) point: compress, measure fidelity on held-out "
                                   "calibration samples and latency against the original; table (JSON + CSV) and "
                                   "Pareto frontier. Re-running with the same arguments resumes: complete points are "
                                   "reused. Exit status: 0 when every point has a result; 1 when a point failed (one "
                                   "`onnxprune: error: point ...` line each, after all results are written); 2 on a "
                                   "usage or input error.")
    w.add_argument("models", nargs="+", help=".onnx files or sample:NAME")
    w.add_argument("--ratios", metavar="R,R,...", help="shares of parameters to remove, e.g. 0.3,0.5,0.69")
    w.add_argument("--speedups", metavar="S,S,...",
                   help="latency targets (as slim --speedup; with --int8 the int8 model's), e.g. 1.5,2,3; an axis "
                        "beside --ratios (at least one of the two)")
    w.add_argument("--criteria", metavar="C,C,...", help=f"channel criteria (default: {CALIBRATED_CRITERION}). {crit}")
    w.add_argument("--int8", action="store_true", help="quantize every point (with --no-int8 too: both variants)")
    w.add_argument("--no-int8", action="store_true", help="float points (the default)")
    w.add_argument("--relu", action="store_true", help="int8 points: " + RELU_HELP)
    w.add_argument("--thresholds", choices=list(THRESHOLDS), default="mse", help="with --int8 (default mse)")
    w.add_argument("--round-to", type=int, default=DEFAULT_ROUND_TO, metavar="N")
    w.add_argument("--input-shape", action="append", metavar="NAME=1x3x640x640", help="analysis shape; repeatable")
    w.add_argument("-o", "--output", metavar="OUTDIR", help="where points and tables go (default: sweep/ here)")
    w.add_argument("--executor", choices=list(EXECUTORS), default="local",
                   help="local: a process pool (default); ray: a local Ray instance or --ray-address")
    w.add_argument("--ray-address", metavar="ADDR", help="join this Ray cluster (e.g. ray://head:10001 or auto)")
    w.add_argument("--workers", type=int, metavar="N", help="local processes, or CPUs of a new local Ray instance "
                                                            "(default: all cores)")
    w.add_argument("--retries", type=int, default=1, metavar="N", help="re-runs of a job whose worker died (default 1)")
    w.add_argument("--runs", type=int, default=30, metavar="N", help="interleaved timing rounds per point (default 30)")
    w.add_argument("--json", metavar="OUT.json", help="also write the table here (always in OUTDIR/sweep.json)")
    w.add_argument("--report", metavar="DIR", help="also write DIR/report.html with the frontier plot")
    w.add_argument("-q", "--quiet", action="store_true")
    w.add_argument("-v", "--verbose", action="count", default=0, help=_VERBOSE)

    sub.add_parser("analyze", parents=[common], help="show channel groups and why some cannot be pruned",
                   description="List coupled channel groups, which are prunable, and the reason for the others.")

    a = sub.add_parser("apply-plan", parents=[calib], help="re-apply a saved pruning plan (slim --save-plan)",
                       description="Remove the channels a plan removed (slim --save-plan PLAN.json), e.g. from next "
                                   "week's retrained weights of the same architecture. A plan for another graph is "
                                   "refused. With --calib the layers after removed channels are refitted and "
                                   "held-out fidelity is reported. --sparsity zeros are not part of a plan.")
    a.add_argument("model", help="input .onnx file, or sample:NAME")
    a.add_argument("plan", help="the plan JSON written by slim --save-plan")
    a.add_argument("-o", "--output", help="output path (default: IN.slim.onnx next to the input)")
    a.add_argument("--no-simplify", action="store_true", help="do not run onnxsim (give it if the plan's slim did)")
    a.add_argument("--json", metavar="REPORT.json", help="also write the report as JSON")
    a.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    a.add_argument("-v", "--verbose", action="count", default=0, help=_VERBOSE)

    from .video import commands as video_commands
    video_commands.add_arguments(
        sub.add_parser("gate", help=video_commands.GATE_HELP, description=video_commands.GATE_DESCRIPTION),
        sub.add_parser("video", help=video_commands.VIDEO_HELP, description=video_commands.VIDEO_DESCRIPTION),
        _PresetAction, _VERBOSE)
    return parser


def _add_quantize_parser(sub, parents: list[argparse.ArgumentParser]) -> None:
    """The ``quantize`` verb's options (``QuantizeOptions``)."""
    q = sub.add_parser("quantize", parents=parents,
                       help="static int8 quantization (QDQ) with calibrated activation ranges",
                       description="Write an int8 QDQ model (ONNX Runtime's quantizer) with activation ranges chosen "
                                   "on calibration data: mse (default), minmax, percentile, trained (PyTorch), "
                                   "or ORT's own calibrators (ort-minmax, ort-percentile, ort-entropy).")
    q.add_argument("-o", "--output", help="output path (default: IN.int8.onnx next to the input; for sample:NAME, in the "
                        "working directory)")
    q.add_argument("--thresholds", choices=list(THRESHOLDS), default=DEFAULT_THRESHOLDS)
    q.add_argument("--per-tensor", action="store_true", help="per-tensor weight scales (default: per output channel)")
    q.add_argument("--no-equalize", action="store_true", help="skip cross-layer range equalisation before int8")
    q.add_argument("--relu", action="store_true", help=RELU_HELP)
    q.add_argument("--no-tile", action="store_true", help=TILE_HELP)
    q.add_argument("--prelu", choices=PRELU_MODES, default="auto", help=PRELU_HELP)
    q.add_argument("--max-drop", type=float, metavar="X", help=MAX_DROP_HELP)
    q.add_argument("--max-float-layers", type=int, default=QuantizeOptions.max_float_layers, metavar="N",
                   help="with --max-drop: at most N layers kept in float (default %(default)s)")
    q.add_argument("--adaround", action="store_true",
                   help="round each Conv/Gemm weight up or down by what the layer's output needs on the calibration "
                        "data (AdaRound, label-free; needs onnxprune[torch]), placed on ONNX Runtime's int8 grid; kept "
                        "per layer and as a whole only where it lowers the held-out error")
    q.add_argument("--ort-compare", choices=list(ORT_COMPARE), default="auto",
                   help="also make the model with ONNX Runtime's MinMax, Percentile and Entropy ranges and keep the "
                        "best on the held-out samples: auto (default) when there are at least 8 held-out samples and "
                        "the model is small, on always, off never (then the --thresholds ranges are used as chosen)")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    verbose = getattr(args, "verbose", 0)
    configure_logging(verbose)
    progress = ConsoleProgress(not args.quiet, stages=not verbose)
    try:
        code = 0
        if args.command == "bench":
            report = _bench(args, progress)
        elif args.command == "check":
            report, code = _check(args, progress)
        elif args.command == "sweep":
            report, code = _sweep(args, progress)
        elif args.command in ("gate", "video"):
            from .video import commands as video_commands
            report = (video_commands.gate_command(args, progress, _model_arg, _default_output)
                      if args.command == "gate" else video_commands.video_command(args, progress, _model_arg))
        elif args.command == "apply-plan":
            report = _apply_plan(args, _model_arg(args.model), progress)
        elif args.command == "analyze":
            report = analyze(_model_arg(args.model), input_shapes=_shapes(args.input_shape), exclude=args.exclude,
                             simplify=not args.no_simplify, progress=progress)
        else:
            report = _slim_or_quantize(args, _model_arg(args.model), progress)
        if args.json and args.command != "check":
            write_json(report, args.json)
    except TargetUnreachableError as exc:  # --strict: a verdict on the model, as a failed `check` threshold
        progress.done()
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        return 1
    except OnnxPruneError as exc:
        progress.done()
        print(f"onnxprune: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        progress.done()
        print("onnxprune: interrupted; nothing was written", file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - a model or input nothing above anticipated: one line, not a traceback
        progress.done()
        if verbose:
            raise
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"onnxprune: error: unexpected {type(exc).__name__}: {first} (the model or input is not supported "
              "as given; nothing was written; rerun with -v for the traceback and report it)", file=sys.stderr)
        return 2
    progress.done()
    if not args.quiet:
        _print_summary(report.summary())
    for failure in getattr(report, "failures", ()) if args.command == "sweep" else ():
        print(f"onnxprune: error: {failure}", file=sys.stderr)
    return code


def _print_summary(text: str) -> None:
    """Print to stdout; a reader that went away (``| head``) is no error."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit


def _sweep(args: argparse.Namespace, progress: ConsoleProgress):
    """Run the sweep: (result, exit status). Status 1 when a point failed (as `check` when a threshold
    fails; 2 stays for usage and input errors): main() prints one ``onnxprune: error: point ...`` line
    per failed point after the table, so a CI step does not pass a sweep whose points failed."""
    from .sweep import SweepOptions, sweep
    if args.json:
        check_writable(args.json)
    models = [_model_arg(m) for m in args.models]
    if args.calib is None:
        raise ConfigError("sweep needs calibration data (--calib) to measure fidelity")
    ratios, speedups = _numbers(args.ratios, "--ratios"), _numbers(args.speedups, "--speedups")
    criteria = tuple(c.strip() for c in args.criteria.split(",") if c.strip()) if args.criteria else (None,)
    int8 = tuple(v for v, on in ((False, args.no_int8 or not args.int8), (True, args.int8)) if on)
    options = SweepOptions(ratios=ratios, criteria=criteria, int8=int8, task=args.task, thresholds=args.thresholds,
                           round_to=args.round_to, holdout=args.holdout,
                           input_shapes=tuple(sorted(_shapes(args.input_shape).items())), runs=args.runs,
                           seed=args.seed, relu=args.relu, speedups=speedups)
    options.validate()
    calibration = [_calibration(args, m, progress) for m in models]  # each model in its own input format
    with make_executor(args.executor, workers=args.workers, address=args.ray_address, retries=args.retries) as ex:
        result = sweep(models, calibration, options, args.output or "sweep", executor=ex, progress=progress)
    if args.report:
        _write_report(result, args.report, "", args.quiet)
    return result, result.exit_code


def _bench(args: argparse.Namespace, progress: ConsoleProgress):
    from .bench import bench
    if args.json:
        check_writable(args.json)
    shapes = [dict([parse_input_shape(sp)]) for sp in args.input_shape] if args.input_shape else None
    try:
        threads = tuple(int(t) for t in args.threads.split(",") if t.strip())
    except ValueError:
        raise ConfigError(f"--threads must be comma-separated integers, got {args.threads!r}") from None
    report = bench([_model_arg(m) for m in args.models], providers=tuple(p.strip() for p in args.providers.split(",")),
                   threads=threads, input_shapes=shapes, runs=args.runs, warmup=args.warmup,
                   accuracy=_accuracy(args.accuracy, len(args.models)), progress=progress)
    if args.report:
        _write_report(report, args.report, "", args.quiet)
    return report


def _accuracy(text: str | None, n_models: int) -> dict[int, float]:
    """``--accuracy 0.91,,0.88``: model index -> accuracy; empty entries are unknown."""
    if not text:
        return {}
    parts = text.split(",")
    if len(parts) > n_models:
        raise ConfigError(f"--accuracy has {len(parts)} values for {n_models} model(s)")
    try:
        return {i: float(p) for i, p in enumerate(parts) if p.strip()}
    except ValueError:
        raise ConfigError(f"--accuracy must be comma-separated numbers in (0, 1], got {text!r}") from None


def _apply_plan(args: argparse.Namespace, model: str, progress: ConsoleProgress):
    from .plan import Plan, apply_plan
    plan = Plan.load(args.plan)
    output = Path(args.output) if args.output else _default_output(model, ".slim.onnx")
    if output.exists() and output.resolve() == Path(model).resolve():
        raise ConfigError(f"refusing to overwrite the input model {model}; choose another -o")
    check_writable(output)
    calibration = _calibration(args, model, progress)
    result = apply_plan(model, plan, calibration=calibration, holdout=args.holdout, task=args.task,
                        simplify=not args.no_simplify, progress=progress)
    progress("writing")
    save_atomic(result.model, output, protect=[Path(model)])
    return result


def _write_report(report, directory: str, preview: str, quiet: bool) -> None:
    """report.html (self-contained, charts inline as SVG) and each chart's PNG beside it, then one
    stderr line naming the page."""
    from .html_report import write_files
    try:
        Path(directory).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OnnxPruneError(f"cannot create the report directory {directory}: {exc.strerror or exc}") from None
    page, _ = write_files(report, directory, preview)
    if not quiet:
        clear = "\r\033[K" if sys.stderr.isatty() else ""  # over a progress stage line left open
        print(f"{clear}onnxprune: wrote {page}", file=sys.stderr)


def _check(args: argparse.Namespace, progress: ConsoleProgress):
    from .check import check
    for out in (args.json, args.junit, args.markdown):
        if out:
            check_writable(out)
    original, candidate = _model_arg(args.original), _model_arg(args.candidate)
    calibration = _calibration(args, original, progress)
    progress("checking")
    report = check(original, candidate, calibration=calibration, task=args.task, min_fidelity=args.min_fidelity,
                   max_drop=args.max_drop, min_speedup=args.min_speedup, max_size_ratio=args.max_size_ratio,
                   runs=args.runs, progress=progress)
    if args.json:
        write_json(report, args.json)
    if args.junit:
        write_text_atomic(report.to_junit_xml(), args.junit)
    if args.markdown:
        write_text_atomic(report.to_markdown(), args.markdown)
    if args.report:
        _write_report(report, args.report, "", args.quiet)
    return report, report.exit_code


def _numbers(text: str | None, flag: str) -> tuple[float, ...]:
    try:
        return tuple(float(r) for r in (text or "").split(",") if r.strip())
    except ValueError:
        raise ConfigError(f"{flag} must be comma-separated numbers, got {text!r}") from None


def _check_speed_flags(args: argparse.Namespace) -> None:
    """--strict, --threads and --providers describe a --speedup target (PruneOptions checks their values)."""
    if args.speedup is None:
        for flag, given in (("--strict", args.strict), ("--threads", args.threads != 1),
                            ("--providers", args.providers != "CPUExecutionProvider")):
            if given:
                raise ConfigError(f"{flag} only applies with --speedup")


def _check_int8_flags(args: argparse.Namespace, int8: bool) -> None:
    """Flags that only mean something with int8 (or with --max-drop), refused before any work."""
    for flag, given in (("--relu", args.relu), ("--no-tile", args.no_tile), ("--prelu", args.prelu != "auto"),
                        ("--max-drop", args.max_drop is not None)):
        if given and not int8:
            raise ConfigError(f"{flag} only applies with --int8")
    default = QuantizeOptions.max_float_layers
    if getattr(args, "max_float_layers", default) != default and args.max_drop is None:
        raise ConfigError("--max-float-layers only applies with --max-drop")


def _slim_or_quantize(args: argparse.Namespace, model: str, progress: ConsoleProgress):
    int8 = args.command == "quantize" or args.int8
    _check_int8_flags(args, int8)
    from .pipeline import check_sparsity
    sparsity = getattr(args, "sparsity", 0.0)  # slim only
    check_sparsity(sparsity)  # before the calibration data is loaded
    if sparsity and args.relu:
        raise ConfigError("--sparsity cannot be combined with --relu (its refit of the next layers would fill the "
                          "zeros); use one or the other")
    suffix = ".int8.onnx" if args.command == "quantize" else (".slim.int8.onnx" if int8 else ".slim.onnx")
    output = Path(args.output) if args.output else _default_output(model, suffix)
    if output.exists() and output.resolve() == Path(model).resolve():
        raise ConfigError(f"refusing to overwrite the input model {model}; choose another -o")
    check_writable(output)
    if args.json:
        check_writable(args.json)
    if getattr(args, "save_plan", None):
        check_writable(args.save_plan)
    quant = QuantizeOptions(thresholds=args.thresholds, relu=args.relu, tile=not args.no_tile, prelu=args.prelu,
                            max_drop=args.max_drop,
                            **({} if args.command != "quantize" else
                               dict(per_channel=not args.per_tensor, exclude=tuple(args.exclude),
                                    equalize=not args.no_equalize, adaround=args.adaround,
                                    max_float_layers=args.max_float_layers,
                                    compare_ort=ORT_COMPARE[args.ort_compare]))) if int8 else None
    prune = None
    if args.command == "slim":
        _check_speed_flags(args)
        prune = PruneOptions(
            ratio=args.ratio, speedup=args.speedup, stages=args.stages,
            providers=tuple(p.strip() for p in args.providers.split(",") if p.strip()), threads=args.threads,
            strict=args.strict, criterion=args.criterion, round_to=args.round_to, exclude=tuple(args.exclude),
            input_shapes=tuple(_shapes(args.input_shape).items()),
            min_keep=args.min_keep, simplify=not args.no_simplify, allocation=args.allocation,
            recover=False if args.no_recover else None, finetune_steps=args.finetune_steps, seed=args.seed,
            sparsity=sparsity, workers=args.workers)
    calibration = _calibration(args, model, progress)
    if int8 and calibration is None:
        raise ConfigError("int8 quantization needs calibration data (--calib)")
    identities = (load_identities(args.identities, load_proto(model), calibration)
                  if getattr(args, "identities", None) and calibration is not None and prune is not None else None)
    run = dict(prune=prune, quantize=quant, calibration=calibration, holdout=args.holdout, task=args.task,
               identities=identities, progress=progress)
    if prune is None:
        result = compress(model, **run)
    else:
        with make_executor(args.executor, workers=args.workers, address=args.ray_address) as executor:
            result = compress(model, executor=executor, **run)
    progress("writing")
    result.save(output, protect=[model])
    if getattr(args, "save_plan", None):
        result.plan.save(args.save_plan)
    result.report.output = str(output)
    if args.report:
        _write_report(result.report, args.report, getattr(result, "preview", ""), args.quiet)
    return result.report


if __name__ == "__main__":
    raise SystemExit(main())
