"""The ``gate`` and ``video`` verbs of the command line (``cli.py`` declares their options and dispatches here)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Callable

from ..errors import ConfigError
from ..graph.io import check_writable
from ..progress import Progress
from .calibrate import GateOptions, GateReport, gate
from .run import VideoReport, run_video
from .synthetic import CALIBRATION_LEVEL, LEVELS

GATE_HELP = "early exit on static frames: run a detector's head only when its early features move"
GATE_DESCRIPTION = (
    "Cut a face detector after an early feature map and write one ONNX model with explicit state: inputs image, "
    "gate.background, gate.skipped and gate.last.<output>; outputs the detector's outputs, the next state, ran_head "
    "and gate.score. An If runs the rest of the network only when the features moved against the background. The "
    "cut (the earliest feature map where a face appearing or moving is separable from sensor noise, JPEG and "
    "flicker simulated on the --calib frames), the threshold and the background update rate are calibrated there.")
VIDEO_HELP = "run a gated detector over a frame sequence (and the ungated one beside it)"
VIDEO_DESCRIPTION = (
    "Run a gated model (from `onnxprune gate`) over FRAMES (a folder of images in name order, or a video file where "
    "OpenCV or imageio is installed) and write per frame the file, ran_head, the detections [x1, y1, x2, y2, score] "
    "in frame pixels and the time; with --baseline the ungated detector's detections and time on the same frame, "
    "and a summary (mean_ms, baseline_mean_ms, skipped, missed faces). Folders written by onnxprune.video.synthetic "
    "are reported as synthetic.")


def add_arguments(gate_parser: argparse.ArgumentParser, video_parser: argparse.ArgumentParser,
                  preset_action: type[argparse.Action], verbose_help: str) -> None:
    g = gate_parser
    g.add_argument("model", help="detector .onnx file, or sample:NAME")
    g.add_argument("--calib", required=True, metavar="FRAMES_DIR",
                   help="frames from the camera (or photos like them): images, searched recursively")
    g.add_argument("--at", metavar="TENSOR", help="cut after this feature map (default: chosen on the frames)")
    g.add_argument("--preset", action=preset_action, metavar="NAME",
                   help="preprocessing (default: inferred from the model); `--preset help` lists them")
    g.add_argument("--min-face", type=int, default=GateOptions.min_face, metavar="PX",
                   help="smallest face, in model-input pixels, whose appearance or move by a quarter of its size must "
                        f"open the gate (default {GateOptions.min_face})")
    g.add_argument("--max-skip", type=int, default=GateOptions.max_skip, metavar="N",
                   help=f"run the head after N skipped frames in a row anyway (default {GateOptions.max_skip}; 0: never)")
    g.add_argument("--noise", choices=list(LEVELS), default=CALIBRATION_LEVEL.name,
                   help="nuisance the gate must ignore, simulated on the frames: "
                        + "; ".join(f"{n}: sigma {v.sigma:g}, flicker +-{v.flicker * 100:g}%%, JPEG q{v.jpeg_quality}"
                                    for n, v in LEVELS.items()) + f" (default {CALIBRATION_LEVEL.name})")
    g.add_argument("--calib-count", type=int, default=GateOptions.count, metavar="N",
                   help=f"calibration frames to use (default {GateOptions.count})")
    g.add_argument("--seed", type=int, default=0, help="which frames and simulated faces, deterministically")
    g.add_argument("-o", "--output", help="output path (default: IN.gated.onnx next to the input; for sample:NAME, "
                                          "in the working directory)")
    g.add_argument("--json", metavar="REPORT.json", help="also write the calibration report as JSON")
    g.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    g.add_argument("-v", "--verbose", action="count", default=0, help=verbose_help)

    v = video_parser
    v.add_argument("model", help="gated .onnx file (from `onnxprune gate`)")
    v.add_argument("frames", help="folder of frames (images in name order) or a video file")
    v.add_argument("--baseline", metavar="DET.onnx", help="the ungated detector (a path or sample:NAME), run on the "
                                                          "same frames in the same process")
    v.add_argument("--preset", action=preset_action, metavar="NAME",
                   help="preprocessing (default: the one recorded in the gated model)")
    v.add_argument("--threads", type=int, default=1, metavar="N", help="ONNX Runtime intra-op threads (default 1)")
    v.add_argument("--json", required=True, metavar="OUT.json", help="per-frame results and the summary")
    v.add_argument("-q", "--quiet", action="store_true", help="print nothing but errors")
    v.add_argument("-v", "--verbose", action="count", default=0, help=verbose_help)


def gate_command(args: argparse.Namespace, progress: Progress, model_arg: Callable[[str], str],
                 default_output: Callable[[str, str], Path]) -> GateReport:
    model = model_arg(args.model)
    output = Path(args.output) if args.output else default_output(model, ".gated.onnx")
    if output.exists() and output.resolve() == Path(model).resolve():
        raise ConfigError(f"refusing to overwrite the input model {model}; choose another -o")
    check_writable(output)
    if args.json:
        check_writable(args.json)
    options = GateOptions(at=args.at, min_face=args.min_face, max_skip=args.max_skip, count=args.calib_count,
                          seed=args.seed, noise=LEVELS[args.noise])
    result = gate(model, args.calib, options=options, preset=args.preset, progress=progress)
    progress("writing")
    result.save(output, protect=[model])
    result.report.output = str(output)
    return result.report


def video_command(args: argparse.Namespace, progress: Progress, model_arg: Callable[[str], str]) -> VideoReport:
    check_writable(args.json)
    if args.threads < 1:
        raise ConfigError(f"--threads must be at least 1, got {args.threads}")
    baseline = model_arg(args.baseline) if args.baseline else None
    return run_video(model_arg(args.model), args.frames, baseline=baseline, preset=args.preset, threads=args.threads,
                     progress=progress)
