"""Sweeps and executors: same table under every executor, resumable after a kill, failures isolated."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import onnxprune
from onnxprune.calibration import CalibrationSet
from onnxprune.cli import main
from onnxprune.errors import ConfigError
from onnxprune.executors import LocalExecutor, make_executor
from onnxprune.sample_models import load_sample
from onnxprune.sweep import PointFailure, SweepOptions, SweepRow, mark_pareto, sweep

# Fields that must not depend on where a job ran (latency does, and is checked elsewhere).
DETERMINISTIC = ("model", "ratio", "criterion", "int8", "key", "status", "achieved_ratio", "params", "macs",
                 "size_bytes", "fidelity", "fidelity_metric")


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> tuple[Path, CalibrationSet, Path]:
    d = tmp_path_factory.mktemp("sweep")
    model = d / "se-block.onnx"
    onnx.save(load_sample("se-block"), model)
    x = np.random.default_rng(0).standard_normal((12, 3, 32, 32)).astype(np.float32)
    np.save(d / "calib.npy", x)
    return model, CalibrationSet("input", [x]), d / "calib.npy"


OPTIONS = SweepOptions(ratios=(0.3, 0.5), criteria=("l2", "activation"), int8=(False,), runs=3, round_to=4)


def _table(rows: list[SweepRow]) -> list[tuple]:
    return [tuple(round(v, 6) if isinstance(v, float) else v for v in (getattr(r, f) for f in DETERMINISTIC))
            for r in rows]


def _digests(rows: list[SweepRow]) -> list[str]:
    return [hashlib.sha256(Path(r.output).read_bytes()).hexdigest() for r in rows]


def _valid(row: SweepRow, original: Path) -> None:
    model = onnx.load(row.output)
    onnx.checker.check_model(model, full_check=True)
    ref = onnx.load(original)
    assert [i.name for i in model.graph.input] == [i.name for i in ref.graph.input]
    assert [o.name for o in model.graph.output] == [o.name for o in ref.graph.output]
    sess = ort.InferenceSession(row.output, providers=["CPUExecutionProvider"])
    sess.run(None, {"input": np.zeros((2, 3, 32, 32), np.float32)})


def test_local_pool_and_serial_give_the_same_table_and_bytes(setup, tmp_path: Path) -> None:
    model, calib, _ = setup
    serial = sweep([model], calib, OPTIONS, tmp_path / "a", executor=LocalExecutor(1))
    pool = sweep([model], calib, OPTIONS, tmp_path / "b", executor=LocalExecutor(2))
    assert [r.status for r in serial.rows] == ["ok"] * 4
    assert _table(serial.rows) == _table(pool.rows)
    assert _digests(serial.rows) == _digests(pool.rows)
    for r in serial.rows:
        _valid(r, model)
        assert abs(r.achieved_ratio - r.ratio) <= 0.02
        assert 0 < r.fidelity <= 1 and r.latency_ratio > 0
    # More pruning, same criterion: fewer parameters.
    by = {(r.criterion, r.ratio): r for r in serial.rows}
    assert by[("l2", 0.5)].params < by[("l2", 0.3)].params
    saved = json.loads((tmp_path / "a" / "sweep.json").read_text())
    assert [r["key"] for r in saved["rows"]] == [r.key for r in serial.rows]
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(onnxprune.__file__).parent / "schemas" / "report.schema.json").read_text())
    jsonschema.validate(saved, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**saved, "executor": "threads"}, schema)
    assert (tmp_path / "a" / "sweep.csv").read_text().count("\n") == 5


def test_ray_gives_the_same_table_and_bytes_as_local(setup, tmp_path: Path, monkeypatch) -> None:
    ray = pytest.importorskip("ray")
    model, calib, _ = setup
    local = sweep([model], calib, OPTIONS, tmp_path / "local", executor=LocalExecutor(1))
    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value, **kw: puts.append(type(value).__name__) or real_put(value, **kw))
    with make_executor("ray", workers=2) as ex:
        assert ex.name == "ray" and ex.workers == 2
        remote = sweep([model], calib, OPTIONS, tmp_path / "ray", executor=ex)
    assert puts == ["SweepInputs"]  # model and calibration reach the object store once, for all 8 jobs
    assert _table(local.rows) == _table(remote.rows)
    assert _digests(local.rows) == _digests(remote.rows)


def test_failed_point_is_reported_and_the_rest_completes(setup, tmp_path: Path, monkeypatch) -> None:
    import onnxprune.compress as chain
    real = chain.slim

    def flaky(model, ratio, **kw):
        if ratio == 0.5:
            raise RuntimeError("injected failure")
        return real(model, ratio, **kw)

    monkeypatch.setattr(chain, "slim", flaky)  # in-process executor: the jobs see the patch
    model, calib, _ = setup
    result = sweep([model], calib, OPTIONS, tmp_path, executor=LocalExecutor(1))
    status = {(r.criterion, r.ratio): (r.status, r.error) for r in result.rows}
    assert status[("l2", 0.5)] == ("failed", "RuntimeError: injected failure")
    assert status[("l2", 0.3)] == ("ok", None) and status[("activation", 0.3)] == ("ok", None)
    assert "FAILED: RuntimeError: injected failure" in result.summary()
    # The Python API gives the failures as data, and the CLI's status.
    assert result.failures == [PointFailure("se-block.onnx", 0.5, c, False, "compress", "RuntimeError: injected failure")
                               for c in ("l2", "activation")]
    assert str(result.failures[0]) == "point se-block.onnx ratio=0.5 criterion=l2 int8=no: RuntimeError: injected failure"
    assert not result.ok and result.exit_code == 1
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(onnxprune.__file__).parent / "schemas" / "report.schema.json").read_text())
    jsonschema.validate(json.loads((tmp_path / "sweep.json").read_text()), schema)  # failed rows included
    # A failed point is not cached: the next run retries it (and now succeeds).
    monkeypatch.setattr(chain, "slim", real)
    again = sweep([model], calib, OPTIONS, tmp_path, executor=LocalExecutor(1))
    assert [r.status for r in again.rows] == ["ok"] * 4
    assert [r.cached for r in again.rows] == [True, True, False, False]  # ratio-major order
    assert again.failures == [] and again.ok and again.exit_code == 0


def _nothing_to_prune(path: Path) -> None:
    """A valid model with the sweep models' input, but no channel to remove: every point of it fails."""
    from onnx import TensorProto, helper
    io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, ["N", 3, 32, 32]) for n in ("input", "output")]
    graph = helper.make_graph([helper.make_node("Relu", ["input"], ["output"], name="relu")], "relu", io[:1], io[1:])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)


def test_cli_sweep_with_failed_points_exits_1_with_one_line_each(setup, tmp_path: Path, capsys) -> None:
    model, _, npy = setup
    broken = tmp_path / "relu-only.onnx"
    _nothing_to_prune(broken)
    out, table = tmp_path / "out", tmp_path / "table.json"
    code = main(["sweep", str(model), str(broken), "--ratios", "0.3,0.5", "--criteria", "l2", "--calib", str(npy),
                         "--workers", "1", "--runs", "3", "--round-to", "4", "-o", str(out), "--json", str(table)])
    captured = capsys.readouterr()
    assert code == 1, captured.err
    errors = [line for line in captured.err.splitlines() if line.startswith("onnxprune: error:")]
    assert len(errors) == 2, captured.err
    for line, ratio in zip(errors, ("0.3", "0.5")):
        assert line.startswith(f"onnxprune: error: point relu-only.onnx ratio={ratio} criterion=l2 int8=no: "
                               "NothingToPruneError: "), line
    assert "FAILED: NothingToPruneError" in captured.out  # the table is still printed
    # The good points' results are written all the same: OUTDIR tables, --json, the compressed models.
    for saved in (json.loads((out / "sweep.json").read_text()), json.loads(table.read_text())):
        assert [(r["model"], r["status"]) for r in saved["rows"]] == [
            ("se-block.onnx", "ok"), ("se-block.onnx", "ok"), ("relu-only.onnx", "failed"), ("relu-only.onnx", "failed")]
    for r in json.loads(table.read_text())["rows"][:2]:
        _valid(SweepRow(**{k: v for k, v in r.items() if k in SweepRow.__dataclass_fields__}), model)
    # Every point good: status 0.
    assert main(["sweep", str(model), "--ratios", "0.3", "--criteria", "l2", "--calib", str(npy), "--workers",
                         "1", "--runs", "3", "--round-to", "4", "-o", str(out), "-q"]) == 0
    assert capsys.readouterr().err == ""


def test_ray_workers_import_the_installed_package_not_the_working_directory(setup, tmp_path: Path,
                                                                            monkeypatch) -> None:
    # Run from a source checkout, the working directory holds an `onnxprune/` folder that is not the
    # installed package (pyproject maps `passes/` into it only when installing). Ray puts the driver's
    # working directory first on its workers' sys.path unless told otherwise: a decoy there stands for it.
    pytest.importorskip("ray")
    model, calib, _ = setup
    checkout = tmp_path / "checkout"
    (checkout / "onnxprune").mkdir(parents=True)
    (checkout / "onnxprune" / "__init__.py").write_text(
        "raise ModuleNotFoundError(\"No module named 'onnxprune.passes' (the decoy in the working directory)\")\n")
    monkeypatch.chdir(checkout)
    options = SweepOptions(ratios=(0.3,), criteria=("l2",), runs=3, round_to=4)
    with make_executor("ray", workers=1) as ex:
        result = sweep([model], calib, options, tmp_path / "out", executor=ex)
    assert [(r.status, r.error) for r in result.rows] == [("ok", None)]
    _valid(result.rows[0], model)


def test_a_ray_task_that_cannot_import_reports_the_workers_exception() -> None:
    from onnxprune.executors import _describe_remote
    wrapped = RuntimeError("\x1b[36mray::_worker_call()\x1b[39m (pid=1, ip=10.0.0.1)\n  At least one of the input "
                           "arguments for this task could not be computed:\nray.exceptions.RaySystemError: System "
                           "error: No module named 'onnxprune.passes'\ntraceback: Traceback (most recent call last):\n"
                           "  File \"x.py\", line 1, in <module>\nModuleNotFoundError: No module named 'onnxprune.passes'")
    assert _describe_remote(wrapped) == "ModuleNotFoundError: No module named 'onnxprune.passes'"
    assert _describe_remote(ValueError("worker died\nsee the logs")) == "ValueError: worker died"


def _die_on_two(_shared, item: int) -> int:
    if item == 2:
        os._exit(3)  # the worker process dies, as on an out-of-memory kill
    return item * 10


def test_a_dying_worker_fails_only_its_own_job() -> None:
    out = LocalExecutor(2, retries=1).map(_die_on_two, [0, 1, 2, 3, 4])
    assert [o.value for o in out if o.ok] == [0, 10, 30, 40]
    assert [o.index for o in out if not o.ok] == [2] and "worker died" in out[2].error


def test_killed_sweep_resumes_without_recomputing(setup, tmp_path: Path) -> None:
    model, calib, npy = setup
    out = tmp_path / "sweep"
    argv = [sys.executable, "-m", "onnxprune", "sweep", str(model), "--ratios", "0.3,0.4,0.5", "--criteria", "l2",
            "--calib", str(npy), "--workers", "1", "--runs", "3", "--round-to", "4", "-o", str(out), "-q"]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 120
        while not list(out.glob("points/*/compute.json")) and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)
    finally:
        proc.wait()
    done = {p.parent.name: p.parent.joinpath("model.onnx").stat().st_mtime_ns for p in out.glob("points/*/compute.json")}
    assert 1 <= len(done) < 3, "the sweep should have been killed midway"
    assert not (out / "sweep.json").exists()
    options = SweepOptions(ratios=(0.3, 0.4, 0.5), criteria=("l2",), runs=3, round_to=4)
    result = sweep([model], CalibrationSet("input", [np.load(npy)]), options, out, executor=LocalExecutor(1))
    assert [r.status for r in result.rows] == ["ok"] * 3
    for r in result.rows:
        assert r.cached == (r.key in done)
        if r.key in done:  # reused, not recomputed
            assert Path(r.output).stat().st_mtime_ns == done[r.key]
        _valid(r, model)
    assert not [p for p in out.rglob("*") if p.is_file() and ".tmp" in p.name]


def test_pareto_frontier_per_model() -> None:
    def row(model, fid, lat):
        return SweepRow(model, 0.5, "l2", False, f"{model}{fid}{lat}", fidelity=fid, latency_ratio=lat)
    rows = [row("a", 0.99, 0.9), row("a", 0.95, 0.6), row("a", 0.94, 0.7), row("a", 0.99, 0.95), row("b", 0.5, 0.99)]
    rows.append(SweepRow("a", 0.7, "l2", False, "x", status="failed", error="boom"))
    mark_pareto(rows)
    assert [r.pareto for r in rows] == [True, True, False, False, True, False]


def test_cli_sweep_errors_are_one_line(setup, tmp_path: Path, capsys) -> None:
    model, _, npy = setup
    for argv, needle in [
        (["sweep", str(model), "--ratios", "0.3"], "needs calibration data"),
        (["sweep", str(model), "--ratios", "0.3,1.2", "--calib", str(npy)], "--ratios must be in [0, 1)"),
        (["sweep", str(model), "--ratios", "a", "--calib", str(npy)], "comma-separated numbers"),
        (["sweep", str(model), "--ratios", "0.3", "--criteria", "nope", "--calib", str(npy)], "unknown criterion"),
        (["sweep", str(model), "--ratios", "0.3", "--calib", str(npy), "--ray-address", "x"], "only applies with"),
    ]:
        assert main(argv) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and needle in err, err


def test_unreachable_ray_cluster_fails_fast_with_one_line(setup, capsys) -> None:
    pytest.importorskip("ray")
    model, _, npy = setup
    start = time.time()
    code = main(["sweep", str(model), "--ratios", "0.3", "--calib", str(npy), "--executor", "ray",
                 "--ray-address", "127.0.0.1:1"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("onnxprune: error: cannot reach the Ray cluster at 127.0.0.1:1")
    assert time.time() - start < 30


def test_a_script_without_main_guard_runs_its_body_once(tmp_path: Path) -> None:
    # Worker processes must not re-run the caller's script (forkserver/spawn import __main__ by default).
    script = tmp_path / "unguarded.py"
    script.write_text("import operator\nfrom onnxprune.executors import LocalExecutor\nprint('body ran')\n"
                      "print([o.value for o in LocalExecutor(2).map(operator.mul, [1, 2, 3], shared=10)])\n")
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["body ran", "[10, 20, 30]"]


def test_relu_changes_only_int8_keys_and_needs_int8() -> None:
    from onnxprune.sweep import Point
    plain, relu = SweepOptions(ratios=(0.3,), int8=(False, True)), SweepOptions(ratios=(0.3,), int8=(False, True), relu=True)
    f, q = Point("m", "h", 0.3, None, False), Point("m", "h", 0.3, None, True)
    assert f.key(plain, "c") == f.key(relu, "c")  # float points are the same points
    assert q.key(plain, "c") != q.key(relu, "c")
    with pytest.raises(onnxprune.ConfigError, match="--relu only applies with --int8"):
        SweepOptions(ratios=(0.3,), relu=True).validate()


def test_speedups_are_an_axis_beside_ratios(setup, tmp_path: Path, monkeypatch) -> None:
    """`sweep --speedups`: one point per target, compressed with slim --speedup, keyed apart from ratio points."""
    monkeypatch.setenv("ONNXPRUNE_CACHE_DIR", str(tmp_path / "latency"))
    model, calib, _ = setup
    options = SweepOptions(ratios=(0.3,), speedups=(1.3,), criteria=("l2",), runs=3, round_to=4)
    result = sweep([model], calib, options, tmp_path / "out", executor=LocalExecutor(1))
    by_budget = {(r.ratio, r.speedup): r for r in result.rows}
    assert set(by_budget) == {(0.3, None), (None, 1.3)}
    point = by_budget[(None, 1.3)]
    assert point.status == "ok", point.error
    assert point.predicted_speedup > 1.0  # re-allocated on measurement, so not exactly 1.3
    assert point.key != by_budget[(0.3, None)].key
    assert "s=1.3x" in result.summary() and "r=0.30" in result.summary()
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(onnxprune.__file__).parent / "schemas" / "report.schema.json").read_text())
    jsonschema.validate(json.loads((tmp_path / "out" / "sweep.json").read_text()), schema)
    with pytest.raises(ConfigError, match="--speedup must be a number above 1"):
        SweepOptions(ratios=(), speedups=(0.9,)).validate()
    with pytest.raises(ConfigError, match="--ratios or --speedups"):
        SweepOptions(ratios=()).validate()
