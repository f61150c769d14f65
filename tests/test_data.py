"""Demonstrations in memory (``memrl.data``): the episode store lays episodes flat and cuts
time-major batches (frames, padded episodes, history/ahead windows), its statistics, the batch's
move to a device, and loading with a held-out split."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from memrl.data import Batch, DatasetError, EpisodeStore, load_episodes, write_demos


def episode(length: int, first: int = 0) -> dict:
    """An episode whose every per-step value is its flat step number ``first + t``."""
    steps = np.arange(first, first + length)
    return {
        "obs": {
            "image": np.broadcast_to(steps[:, None, None, None], (length, 2, 2, 3)).astype(
                np.uint8
            ),
            "state": np.repeat(steps[:, None], 3, 1).astype(np.float32),
        },
        "actions": np.repeat(steps[:, None], 3, 1).astype(np.float32),
        "phase": (steps % 2).astype(np.int8),
    }


@pytest.fixture
def store() -> EpisodeStore:
    return EpisodeStore.from_episodes([episode(3), episode(4, first=3)])


def test_the_store_lays_episodes_flat_and_keeps_their_other_keys(store):
    assert len(store) == 2 and store.num_steps == 7
    assert store.starts.tolist() == [0, 3] and store.lengths.tolist() == [3, 4]
    assert store.images.shape == (7, 3, 2, 2) and store.images.dtype == torch.uint8
    assert store.images[:, 0, 0, 0].tolist() == list(range(7))
    assert store.states[:, 0].tolist() == list(range(7))
    assert store.extras["phase"].tolist() == [0, 1, 0, 1, 0, 1, 0]
    with pytest.raises(ValueError, match="no episodes; expected at least one"):
        EpisodeStore.from_episodes([])


def test_statistics_are_per_dimension():
    ep = episode(2)
    ep["obs"]["state"] = np.array([[0.0, 1.0, 5.0], [2.0, 1.0, 5.0]], np.float32)
    ep["actions"] = np.array([[0.5, -2.0, 0.0], [-0.25, 1.0, 0.0]], np.float32)
    statistics = EpisodeStore.from_episodes([ep]).statistics()
    assert statistics.state_mean.tolist() == [1.0, 1.0, 5.0]
    assert statistics.state_std.tolist() == pytest.approx([2**0.5, 1e-3, 1e-3])
    assert statistics.action_scale.tolist() == pytest.approx([0.5, 2.0, 1e-3])


def test_frames_are_length_one_sequences_that_each_start_an_episode(store):
    batch = store.frames(torch.tensor([5, 1]))
    assert batch.images.shape == (1, 2, 3, 2, 2) and batch.states.shape == (1, 2, 3)
    assert batch.actions[0, :, 0].tolist() == [5, 1] and batch.index.tolist() == [[5, 1]]
    assert batch.is_first.tolist() == [[True, True]] and batch.valid is None


def test_episodes_are_padded_time_major_with_valid_and_is_first(store):
    batch = store.episodes(torch.tensor([0, 1]))
    assert batch.images.shape == (4, 2, 3, 2, 2)
    assert batch.states[:, :, 0].T.tolist() == [[0, 1, 2, 0], [3, 4, 5, 6]]  # pad: first step
    assert batch.valid.T.tolist() == [[True, True, True, False], [True] * 4]
    assert batch.is_first.T.tolist() == [[True, False, False, False]] * 2
    assert batch.index.T.tolist() == [[0, 1, 2, 0], [3, 4, 5, 6]]
    assert torch.equal(batch.actions, store.actions[batch.index])


def test_windows_repeat_the_first_frame_and_mask_past_the_end(store):
    batch = store.windows(torch.tensor([1, 4]), history=3, ahead=4)
    assert batch.images[:, :, 0, 0, 0].T.tolist() == [[0, 0, 1], [3, 3, 4]]
    assert batch.states[:, :, 0].T.tolist() == [[0, 0, 1], [3, 3, 4]]
    assert batch.is_first.T.tolist() == [[True, True, False], [True, True, False]]
    assert batch.valid.T.tolist() == [[True, True, False, False], [True, True, True, False]]
    assert batch.actions[:, :, 0].T.tolist() == [[1, 2, 2, 2], [4, 5, 6, 6]]


def test_batch_to_moves_every_tensor_and_keeps_its_type(store):
    @dataclasses.dataclass(kw_only=True)
    class Labelled(Batch):
        labels: torch.Tensor
        missing: torch.Tensor | None = None

    frames = store.frames(torch.tensor([0, 2]))
    batch = Labelled(**vars(frames), labels=torch.zeros(1, 2))
    moved = batch.to("meta")
    assert type(moved) is Labelled and moved.valid is None and moved.missing is None
    tensors = [v for v in vars(moved).values() if isinstance(v, torch.Tensor)]
    assert len(tensors) == 6 and all(t.device.type == "meta" for t in tensors)
    assert batch.images.device.type == "cpu"  # the original stays where it was


def test_load_episodes_holds_out_the_last_and_drops_empty_ones(tmp_path):
    path = tmp_path / "demos.hdf5"
    write_demos(path, [episode(3), episode(0), episode(2, 3), episode(4, 5), episode(1, 9)])
    split = load_episodes(path, val_fraction=0.2)
    assert (len(split.train), len(split.val)) == (3, 1)
    assert split.val.states[:, 0].tolist() == [9] and split.attrs["num_demos"] == 5
    # at least one held out, at most all but one
    assert len(load_episodes(path, 0.01).val) == 1 and len(load_episodes(path, 0.99).train) == 1
    write_demos(path, [episode(3), episode(0)])
    with pytest.raises(
        DatasetError, match="holds 1 non-empty demonstration\\(s\\); need at least 2"
    ):
        load_episodes(path, 0.2)
    with pytest.raises(ValueError, match="val_fraction=1; expected a value in \\(0, 1\\)"):
        load_episodes(path, 1)
    with pytest.raises(DatasetError, match="lacks 'rewards'"):
        load_episodes(path, 0.5, required=("actions", "phase", "rewards"))
