"""``memrl board``: a grid of ppo runs that survives interruptions, and the board it writes."""

from __future__ import annotations

import csv

import pytest

from memrl.cli import main
from memrl.rl import board


def test_a_tiny_board_writes_its_outputs_and_a_rerun_skips_finished_cells(tmp_path, monkeypatch):
    out = tmp_path / "board"
    args = ["board", "--envs", "popgym/RepeatPreviousEasy", "popgym/CountRecallEasy"]
    args += ["--cores", "gru", "none", "--seeds", "1", "--total-steps", "2048"]
    assert main([*args, "--output-dir", str(out)]) == 0
    with (out / "board.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert {(r["env"], r["core"]) for r in rows} == {
        (e, c)
        for e in ("popgym/RepeatPreviousEasy", "popgym/CountRecallEasy")
        for c in ("gru", "none")
    }
    board_md = (out / "board.md").read_text()
    assert "| rank | core | mean MMER | RepeatPreviousEasy | CountRecallEasy |" in board_md
    for row in rows:  # the board's figure is the run's own MMER
        summary = board.load_summary(
            board.cell_dir(board.BoardConfig(output_dir=out), row["env"], row["core"], 0)
        )
        assert float(row["mmer"]) == pytest.approx(summary["mmer"])
    assert (out / "board.png").stat().st_size > 1000
    trained = []
    monkeypatch.setattr(board, "train_ppo", lambda cfg: trained.append(cfg))
    assert main([*args, "--output-dir", str(out)]) == 0  # every cell finished: nothing trains
    assert trained == []
    # one more seed: only the new cells train
    (out / "popgym_CountRecallEasy" / "none-seed0" / "summary.json").unlink()
    with pytest.raises(FileNotFoundError):  # the stubbed trainer writes no summary
        main([*args, "--output-dir", str(out)])
    assert [(c.env, c.core) for c in trained] == [("popgym/CountRecallEasy", "none")]
    assert trained[0].resume is not None  # the killed cell resumes from its checkpoint


def test_a_cell_directory_of_other_settings_is_an_error(tmp_path, capsys):
    out = tmp_path / "board"
    args = ["board", "--envs", "popgym/RepeatPreviousEasy", "--cores", "none", "--seeds", "1"]
    assert main([*args, "--total-steps", "2048", "--output-dir", str(out)]) == 0
    assert main([*args, "--total-steps", "4096", "--output-dir", str(out)]) == 2
    assert "holds a run of env=popgym/RepeatPreviousEasy, core=none, seed=0, total_steps=2048" in (
        " ".join(capsys.readouterr().err.split())
    )
