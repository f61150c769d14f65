"""The `memrl` command line: clear errors, --config, and kill-and-resume bit-identity."""

from __future__ import annotations

import importlib
import importlib.metadata
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from memrl.cli import COMMANDS, main
from memrl.recall import RecallConfig
from memrl.runs import load_checkpoint, load_config, read_metrics

FAST = [
    "--device",
    "cpu",
    "--deterministic",
    "--steps",
    "24",
    "--seq-len",
    "8",
    "--batch-size",
    "8",
    "--hidden-size",
    "16",
    "--log-interval",
    "4",
]


def memrl(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "memrl", *args], capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["recal"], "unknown command 'recal'; expected one of: demo, recall"),
        (["recall", "--bogus-flag", "1"], "--bogus-flag"),
        (["recall", "--lr", "fast"], "--lr"),
        (["recall", "--lr", "-1"], "lr=-1.0; expected a positive number"),
        (["recall", "--core", "transformer"], "transformer"),
        (["recall", "--config", "missing.yaml"], "missing.yaml does not exist"),
        (["recall", "--resume", "no/such/run"], "no/such/run"),
        (["recall", "--config"], "--config expects a value"),
        (
            ["ppo", "--core", "s4d", "--rnn-init", "pytorch"],
            "rnn_init='pytorch' applies to gru and lstm, not s4d",
        ),
    ],
)
def test_bad_input_is_a_clear_error_with_exit_code_2(args, message, tmp_path):
    result = memrl(*args)
    assert result.returncode == 2, result.stderr
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_help_documents_every_flag():
    result = memrl("recall", "--help")
    assert result.returncode == 0
    for flag, doc in [
        ("--seq-len", "Truncated-BPTT window"),
        ("--device", "auto picks cuda"),
        ("--resume", "Continue the run"),
        ("--config", "saved config.yaml"),
    ]:
        assert flag in result.stdout and doc in result.stdout
    assert "recall" in memrl("--help").stdout


def test_top_level_help_describes_every_command_and_version_is_the_package_version():
    listing = memrl("--help").stdout
    for command, spec in COMMANDS.items():
        assert f"  {command}" in listing and spec[3] in " ".join(listing.split())
    result = memrl("--version")
    assert result.returncode == 0
    assert result.stdout.strip() == f"memrl {importlib.metadata.version('memrl')}"


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_flag_of_every_command_shows_its_default(command, capsys):
    """One flag vocabulary: every flag shows its default (never an empty "(default: )"), and
    every command that runs a model takes --device auto|cpu|cuda|mps."""
    with pytest.raises(SystemExit) as exit:
        main([command, "--help"])
    assert exit.value.code == 0
    out = capsys.readouterr().out
    flags = re.findall(r"^(?:│ |  )(--[a-z][\w.-]*)", out, re.M)  # boxed when on a terminal
    assert len(flags) >= (2 if command == "export" else 4), out
    assert out.count("(default:") == len(flags), out
    assert "(default: )" not in " ".join(out.split())  # tyro wraps long lines
    if command not in ("push-collect", "export"):  # export traces on the CPU, runs nothing
        assert "--device {auto,cpu,cuda,mps}" in out


def test_config_file_with_flags_overriding(tmp_path):
    first = tmp_path / "first"
    assert main(["recall", *FAST, "--output-dir", str(first), "--num-symbols", "3"]) == 0
    second = tmp_path / "second"
    code = main(
        [
            "recall",
            "--config",
            str(first / "config.yaml"),
            "--output-dir",
            str(second),
            "--hidden-size",
            "8",
        ]
    )
    assert code == 0
    cfg = load_config(RecallConfig, second / "config.yaml")
    assert (cfg.num_symbols, cfg.hidden_size, cfg.steps) == (3, 8, 24)


def test_memory_core_learns_recall_and_memoryless_does_not(tmp_path):
    """The main job's task separates memory from no memory."""
    results = {}
    for core in ("gru", "none"):
        out = tmp_path / core
        assert (
            main(
                [
                    "recall",
                    "--device",
                    "cpu",
                    "--core",
                    core,
                    "--steps",
                    "150",
                    "--output-dir",
                    str(out),
                ]
            )
            == 0
        )
        results[core] = read_metrics(out / "metrics.jsonl")[-1]["accuracy_after_first"]
    assert results["gru"] > 0.9
    assert results["none"] < 0.4  # chance is 1/4


def _params(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(run_dir / "model.safetensors")


def test_killed_run_resumes_bit_identical(tmp_path):
    """SIGKILL a run after its first checkpoint, resume it, compare with an uninterrupted run."""
    args = [*FAST, "--steps", "1000", "--checkpoint-interval", "20", "--log-interval", "10"]
    whole = tmp_path / "whole"
    assert memrl("recall", *args, "--output-dir", str(whole)).returncode == 0

    killed = tmp_path / "killed"
    proc = subprocess.Popen(
        [sys.executable, "-m", "memrl", "recall", *args, "--output-dir", str(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    last = killed / "checkpoints" / "last.pt"
    deadline = time.time() + 90
    while time.time() < deadline and not (last.exists() and load_checkpoint(last)["step"] >= 40):
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    stopped_at = load_checkpoint(last)["step"]
    assert 40 <= stopped_at < 1000, "the run should have been killed part-way"

    resumed = memrl("recall", "--resume", str(killed))
    assert resumed.returncode == 0, resumed.stderr
    a, b = _params(whole), _params(killed)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    steps = [r["step"] for r in read_metrics(killed / "metrics.jsonl")]
    assert steps == sorted(set(steps)) and steps[-1] == 1000  # no duplicated log steps


def test_a_later_command_never_corrupts_an_earlier_run(tmp_path):
    """--config of a resumed run starts a new run; a --resume that would change the model is
    refused before anything is touched; an allowed one (--steps) continues the run."""
    a, b = tmp_path / "a", tmp_path / "b"
    assert main(["recall", *FAST, "--output-dir", str(a)]) == 0
    saved = (a / "config.yaml").read_text()
    assert main(["recall", "--resume", str(a), "--steps", "32"]) == 0
    assert read_metrics(a / "metrics.jsonl")[-1]["step"] == 32
    result = memrl("recall", "--config", str(a / "config.yaml"), "--core", "lstm",
                   "--output-dir", str(b))  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert load_config(RecallConfig, b / "config.yaml").core == "lstm"
    for flag, value in (("--hidden-size", "64"), ("--core", "lstm")):
        result = memrl("recall", "--resume", str(a), flag, value, "--steps", "64")
        assert result.returncode == 2 and "Traceback" not in result.stderr
        assert f"--resume {a}: {flag} would change the run's model or data" in result.stderr
    assert (a / "config.yaml").read_text() == saved
    assert load_checkpoint(a / "checkpoints/last.pt")["step"] == 32


def test_a_resume_with_its_budget_spent_says_so(tmp_path, capsys):
    run = tmp_path / "r"
    assert main(["recall", *FAST, "--output-dir", str(run)]) == 0
    assert main(["recall", "--resume", str(run)]) == 2
    assert "already at step 24" in capsys.readouterr().err
    assert main(["recall", "--resume", str(run), "--steps", "16"]) == 2
    assert load_checkpoint(run / "checkpoints/last.pt")["step"] == 24


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
@pytest.mark.parametrize("command", [["recall"], ["ppo", "--total-steps", "64"]])
def test_a_missing_device_is_one_line_and_exit_2(command, tmp_path):
    result = memrl(*command, "--device", "cuda", "--output-dir", str(tmp_path / "r"))
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "--device cuda: this machine has no CUDA device" in result.stderr
