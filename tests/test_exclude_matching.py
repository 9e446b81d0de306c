"""--exclude: one rule (graph/matching.py) in slim and quantize, and the 'matched no node' warning from it."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxprune import cli
from onnxprune.errors import ConfigError
from onnxprune.graph.matching import match_nodes, node_matcher
from onnxprune.sample_models import GENERATED

NAMES = ["stem.conv", "stem.relu", "stage1.0.conv", "stage1.1.conv", "ssh1.conv3X3", "head.stride8.score"]


@pytest.mark.parametrize("pattern, expected", [
    ("*ssh*", ["ssh1.conv3X3"]),                           # glob, whole name
    ("stage1.?.conv", ["stage1.0.conv", "stage1.1.conv"]),  # glob with ?
    ("^stem.*", ["stem.conv", "stem.relu"]),               # regex (^ and .*): a glob in quantize before
    ("^stem", ["stem.conv", "stem.relu"]),
    ("conv(3X3)?$", ["stem.conv", "stage1.0.conv", "stage1.1.conv", "ssh1.conv3X3"]),
    ("ssh", ["ssh1.conv3X3"]),                             # plain word: found anywhere
    ("nothing", []),
])
def test_one_rule(pattern: str, expected: list[str]) -> None:
    assert match_nodes(NAMES, [pattern]) == (expected, [] if expected else [pattern])


def test_broken_regex_is_one_line() -> None:
    with pytest.raises(ConfigError, match=r"--exclude 'conv\(' is not a valid glob or regular expression"):
        node_matcher("conv(")


def test_slim_and_quantize_exclude_the_same_nodes(tmp_path: Path, capsys) -> None:
    model = tmp_path / "m.onnx"
    onnx.save(GENERATED["retinaface"](), model)
    names = [n.name for n in onnx.load(model).graph.node]
    pattern = "^body.stage1.*"  # regex: matched by both verbs (quantize read it as a glob before)
    expected, _ = match_nodes(names, [pattern])
    assert expected
    np.save(tmp_path / "x.npy", np.random.default_rng(0).normal(size=(8, 3, 64, 64)).astype(np.float32))
    calib = ["--calib", str(tmp_path / "x.npy"), "--task", "outputs"]
    assert cli.main(["quantize", str(model), *calib, "--exclude", pattern, "--no-tile", "--json",
                     str(tmp_path / "q.json")]) == 0
    import json
    report = json.loads((tmp_path / "q.json").read_text())
    assert {n for n in expected if not n.endswith(".bn")} <= set(report["excluded"])  # BN is folded first
    assert "matched no node" not in capsys.readouterr().out
    assert cli.main(["slim", str(model), "--ratio", "0.3", "--exclude", "^no_such_layer.*", "--json",
                     str(tmp_path / "s.json")]) == 0
    assert "--exclude '^no_such_layer.*' matched no node" in capsys.readouterr().out
