"""The run machinery: checkpoints, configs, run directories, metrics, devices."""

from __future__ import annotations

import dataclasses
import fnmatch
import hashlib
import json
import os
import random
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Literal

import numpy as np
import pytest
import torch

from memrl.runs import (
    CheckpointError,
    ConfigError,
    MetricsLogger,
    NonFiniteLossError,
    Run,
    RunOptions,
    load_checkpoint,
    load_config,
    read_metrics,
    resolve_device,
    rng_state,
    save_checkpoint,
    save_config,
    set_rng_state,
)


@dataclasses.dataclass
class Inner:
    widths: tuple[int, ...] = (32, 32)
    """Layer widths."""


@dataclasses.dataclass
class ToyConfig(RunOptions):
    lr: float = 1e-3
    """Learning rate."""
    mode: Literal["a", "b"] = "a"
    """A choice."""
    inner: Inner = dataclasses.field(default_factory=Inner)
    """Nested options."""


def test_checkpoint_roundtrip(tmp_path):
    payload = {"w": torch.randn(3, 4), "step": 7, "nested": {"x": [1, 2]}}
    save_checkpoint(tmp_path / "last.pt", payload)
    loaded = load_checkpoint(tmp_path / "last.pt")
    assert torch.equal(loaded["w"], payload["w"])
    assert loaded["step"] == 7 and loaded["nested"] == {"x": [1, 2]}
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temp file left behind


@pytest.mark.parametrize("damage", ["flip", "truncate", "foreign", "empty"])
def test_corrupt_checkpoint_names_the_file(tmp_path, damage):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.randn(100)})
    raw = bytearray(path.read_bytes())
    if damage == "flip":
        raw[-50] ^= 0xFF
    elif damage == "truncate":
        raw = raw[: len(raw) // 2]
    elif damage == "foreign":
        torch.save({"w": 1}, path)
        raw = bytearray(path.read_bytes())
    else:
        raw = bytearray()
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=str(path)):
        load_checkpoint(path)


def test_missing_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.pt")


def test_save_checkpoint_creates_missing_parent_directories(tmp_path):
    path = tmp_path / "run" / "checkpoints" / "last.pt"
    save_checkpoint(path, {"step": 3})
    assert load_checkpoint(path) == {"step": 3}


def test_checkpoints_are_written_to_a_hidden_temp_file_beside_the_target(tmp_path, monkeypatch):
    # same directory: the final rename stays on one filesystem (atomic); the name matches the
    # `.*.tmp` that a resume deletes from checkpoints/, so a torn write is cleaned up
    renames = []
    real_replace = os.replace

    def spy(src, dst):
        renames.append((Path(src), Path(dst)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", spy)
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    [(tmp, target)] = renames
    assert target == path and tmp.parent == tmp_path
    assert fnmatch.fnmatchcase(tmp.name, ".last.pt.*.tmp")
    assert not tmp.exists() and load_checkpoint(path) == {"step": 1}


def test_a_failed_write_leaves_the_old_checkpoint_and_no_temp_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})

    def broken_fsync(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", broken_fsync)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(path, {"step": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    assert load_checkpoint(path) == {"step": 1}


def test_save_with_previous_keeps_the_old_checkpoint_under_that_name(tmp_path):
    last, previous = tmp_path / "last.pt", tmp_path / "previous.pt"
    save_checkpoint(last, {"step": 1}, previous=previous)
    assert not previous.exists()  # nothing to keep yet
    save_checkpoint(last, {"step": 2}, previous=previous)
    save_checkpoint(last, {"step": 3}, previous=previous)
    assert load_checkpoint(last) == {"step": 3}
    assert load_checkpoint(previous) == {"step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "previous.pt"]


@pytest.mark.parametrize(
    "header",
    [b"memrl-checkpoint v2 {digest}", b"memrl-checkpoint v1 {digest}0", b"{digest}"],
)
def test_a_header_of_another_version_or_length_is_refused(tmp_path, header):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"step": 1})
    first_line, _, data = path.read_bytes().partition(b"\n")
    digest = first_line.split(b" ")[-1]
    assert len(digest) == 64
    path.write_bytes(header.replace(b"{digest}", digest) + b"\n" + data)
    with pytest.raises(CheckpointError, match="not a memrl checkpoint"):
        load_checkpoint(path)


def test_a_payload_with_a_good_checksum_that_does_not_unpickle_names_the_file(tmp_path):
    path = tmp_path / "last.pt"
    data = b"not a torch.save payload"
    path.write_bytes(
        b"memrl-checkpoint v1 " + hashlib.sha256(data).hexdigest().encode() + b"\n" + data
    )
    with pytest.raises(CheckpointError, match=f"checkpoint {path} could not be read: "):
        load_checkpoint(path)


def test_load_checkpoint_maps_tensors_to_the_requested_device(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint(path, {"w": torch.ones(3)})
    assert load_checkpoint(path)["w"].device == torch.device("cpu")
    assert load_checkpoint(path, map_location="meta")["w"].device == torch.device("meta")


def _draws() -> tuple:
    return random.random(), float(np.random.rand()), torch.rand(2).tolist()


def test_set_rng_state_replays_python_numpy_and_torch_draws():
    state = rng_state()
    assert ("cuda" in state) == torch.cuda.is_available()
    first = _draws()
    assert _draws() != first
    set_rng_state(state)
    assert _draws() == first


def _fake_cuda(monkeypatch, available: bool) -> list:
    """Pretend CUDA is (not) there; the CUDA RNG states handed to torch land in the list."""
    restored = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: available)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", lambda: ["gpu0-state", "gpu1-state"])
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", restored.append)
    return restored


def test_rng_state_captures_the_cuda_generators_when_there_is_a_gpu(monkeypatch):
    _fake_cuda(monkeypatch, available=True)
    assert rng_state()["cuda"] == ["gpu0-state", "gpu1-state"]


def test_a_gpu_checkpoints_rng_state_restores_on_a_cpu_only_machine(monkeypatch):
    from_gpu = {**rng_state(), "cuda": ["gpu0-state"]}
    restored = _fake_cuda(monkeypatch, available=False)
    first = _draws()
    set_rng_state(from_gpu)
    assert _draws() == first
    assert restored == []  # the CUDA states are ignored, not queued for a GPU that never comes


def test_a_cpu_checkpoints_rng_state_restores_on_a_gpu_machine(monkeypatch):
    from_cpu = {key: value for key, value in rng_state().items() if key != "cuda"}
    restored = _fake_cuda(monkeypatch, available=True)
    first = _draws()
    set_rng_state(from_cpu)
    assert _draws() == first and restored == []
    set_rng_state({**from_cpu, "cuda": ["gpu0-state"]})
    assert restored == [["gpu0-state"]]


def test_kill_while_writing_keeps_previous_checkpoint(tmp_path):
    """A process SIGKILLed in the middle of writing leaves a loadable last.pt."""
    path = tmp_path / "last.pt"
    child = textwrap.dedent(
        f"""
        import sys, torch
        from memrl.runs import save_checkpoint
        big = torch.arange(8_000_000, dtype=torch.float64)  # 64 MB: a write takes a while
        save_checkpoint({str(path)!r}, {{"version": 0, "w": big}})
        print("ready", flush=True)
        version = 1
        while True:
            save_checkpoint({str(path)!r}, {{"version": version, "w": big + version}})
            version += 1
        """
    )
    for delay in (0.05, 0.2, 0.45):
        proc = subprocess.Popen([sys.executable, "-c", child], stdout=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "ready"
        time.sleep(delay)
        proc.kill()
        proc.wait()
        loaded = load_checkpoint(path)
        version = loaded["version"]
        assert loaded["w"].shape == (8_000_000,)
        assert loaded["w"][0] == version and loaded["w"][-1] == 7_999_999 + version


def test_config_roundtrip_and_errors(tmp_path):
    cfg = ToyConfig(lr=0.5, mode="b", inner=Inner(widths=(8, 16, 4)), output_dir=Path("x/y"))
    save_config(cfg, tmp_path / "config.yaml")
    # a saved config never names its run directory: --config of it starts a new run
    assert load_config(ToyConfig, tmp_path / "config.yaml") == dataclasses.replace(
        cfg, output_dir=None
    )
    (tmp_path / "old.yaml").write_text("lr: 0.2\noutput_dir: runs/a\nresume: runs/a\n")
    old = load_config(ToyConfig, tmp_path / "old.yaml")
    assert (old.lr, old.output_dir, old.resume) == (0.2, None, None)

    (tmp_path / "bad.yaml").write_text("lr: 0.1\nlearning_rate: 3\n")
    with pytest.raises(ConfigError, match="learning_rate"):
        load_config(ToyConfig, tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("lr: fast\n")
    with pytest.raises(ConfigError, match="lr='fast'; expected a number"):
        load_config(ToyConfig, tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("mode: c\n")
    with pytest.raises(ConfigError, match="mode='c'; expected one of 'a', 'b'"):
        load_config(ToyConfig, tmp_path / "bad.yaml")
    (tmp_path / "bad.yaml").write_text("inner: {widths: [1, x]}\n")
    with pytest.raises(ConfigError, match=r"inner.widths\[1\]"):
        load_config(ToyConfig, tmp_path / "bad.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(ToyConfig, tmp_path / "missing.yaml")


def test_run_directory_holds_the_documented_files(tmp_path):
    run = Run("toy", ToyConfig(output_dir=tmp_path / "run", device="cpu"))
    for step in range(1, 4):
        run.log(step, {"loss": 1.0 / step})
    run.save(3, {"model": {"w": torch.ones(2)}})
    assert run.finish({"loss": 1 / 3, "best": -float("inf")})
    names = {p.name for p in (tmp_path / "run").iterdir()}
    assert {"config.yaml", "metrics.jsonl", "checkpoints", "plots"} <= names
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert (tmp_path / "run/checkpoints/last.pt").is_file()
    assert (tmp_path / "run/plots/metrics.png").stat().st_size > 1000
    assert [r["loss"] for r in read_metrics(tmp_path / "run/metrics.jsonl")] == [1.0, 0.5, 1 / 3]
    assert json.loads((tmp_path / "run/summary.json").read_text()) == {"loss": 1 / 3, "best": None}

    with pytest.raises(ConfigError, match="already holds a run"):
        Run("toy", ToyConfig(output_dir=tmp_path / "run", device="cpu"))
    resumed = Run("toy", ToyConfig(resume=tmp_path / "run", device="cpu"))
    assert resumed.start_step == 3
    assert resumed.restore()["model"]["w"].tolist() == [1.0, 1.0]
    with pytest.raises(ConfigError, match="no checkpoint"):
        Run("toy", ToyConfig(resume=tmp_path / "elsewhere", device="cpu"))


def test_resumed_metrics_drop_records_after_the_checkpoint(tmp_path):
    logger = MetricsLogger(tmp_path)
    for step in range(1, 6):
        logger.log(step, {"x": step})
    logger.close()
    with (tmp_path / "metrics.jsonl").open("a") as f:
        f.write('{"step": 6, "x"')  # torn line from a kill
    logger = MetricsLogger(tmp_path, resume_step=3)
    logger.log(4, {"x": 40})
    logger.close()
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["x"]) for r in records] == [(1, 1), (2, 2), (3, 3), (4, 40)]


def test_non_finite_loss_stops_with_a_message(tmp_path):
    run = Run("toy", ToyConfig(output_dir=tmp_path / "run", device="cpu"))
    run.check_finite(1, loss=torch.tensor(0.3))
    with pytest.raises(NonFiniteLossError, match="loss became nan at step 2.*last.pt"):
        run.check_finite(2, loss=torch.tensor(float("nan")))
    run.finish({})


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda", "mps")
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="--device cuda: this machine has no CUDA device"):
            resolve_device("cuda")
    with pytest.raises(ConfigError, match="--device tpu; expected one of auto, cpu, cuda, mps"):
        resolve_device("tpu")


def test_metrics_jsonl_is_one_object_per_line(tmp_path):
    logger = MetricsLogger(tmp_path)
    logger.log(1, {"a": 1.5, "b": float("inf")})
    logger.close()
    (line,) = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert "Infinity" not in line and json.loads(line)["b"] is None  # strict JSON: null


def test_a_resume_never_rewrites_the_run_config(tmp_path):
    run = Run("toy", ToyConfig(output_dir=tmp_path / "run", device="cpu", lr=0.5))
    run.save(1, {"w": 1})
    run.finish({})
    before = (tmp_path / "run/config.yaml").read_text()
    Run("toy", ToyConfig(resume=tmp_path / "run", device="cpu", lr=0.1)).finish({})
    assert (tmp_path / "run/config.yaml").read_text() == before


@pytest.mark.parametrize("leftover", ["config.yaml", "metrics.jsonl"])
def test_a_run_that_died_before_its_first_checkpoint_is_never_appended_to(tmp_path, leftover):
    run = tmp_path / "run"
    run.mkdir()
    (run / leftover).write_text("")
    with pytest.raises(ConfigError, match="stopped before its first checkpoint"):
        Run("toy", ToyConfig(output_dir=run, device="cpu"))
    assert (run / leftover).read_text() == ""


def test_output_dir_that_is_a_file_or_unwritable_is_a_clear_error(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(ConfigError, match="is a file; expected a directory"):
        Run("toy", ToyConfig(output_dir=tmp_path / "file", device="cpu"))
    with pytest.raises(ConfigError, match="/proc/memrl-x: cannot write there"):
        Run("toy", ToyConfig(output_dir=Path("/proc/memrl-x"), device="cpu"))


@pytest.mark.parametrize("damage", ["corrupt", "missing"])
def test_a_bad_last_checkpoint_falls_back_to_the_previous_one(tmp_path, damage):
    run = Run("toy", ToyConfig(output_dir=tmp_path / "run", device="cpu"))
    run.save(1, {"w": 1})
    run.save(2, {"w": 2})
    run.finish({})
    last = tmp_path / "run/checkpoints/last.pt"
    assert load_checkpoint(tmp_path / "run/checkpoints/previous.pt")["w"] == 1
    if damage == "corrupt":
        raw = bytearray(last.read_bytes())
        raw[-20] ^= 0xFF  # a bit flip inside the tensor data still unpickles
        last.write_bytes(bytes(raw))
    else:  # killed between the two renames of Run.save
        last.unlink()
    with pytest.warns(UserWarning, match="previous.pt"):
        resumed = Run("toy", ToyConfig(resume=tmp_path / "run", device="cpu"))
    assert resumed.start_step == 1 and resumed.restore()["w"] == 1
