"""Action distributions: masked categorical, factored multi-head, diagonal Gaussian."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from gymnasium import spaces
from hypothesis import given, settings
from hypothesis import strategies as st

from memrl.rl import (
    DiagGaussian,
    MaskedCategorical,
    action_head,
    action_head_sizes,
    action_mask_tensor,
    make_distribution,
    to_env_actions,
)


def _reference_log_probs(logits: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """log softmax over the allowed entries of each row, by hand; -inf where masked."""
    out = torch.full_like(logits, -math.inf)
    for row in range(len(logits)):
        valid = logits[row][allowed[row]]
        out[row, allowed[row]] = valid - torch.logsumexp(valid, 0)
    return out


def _random_mask(generator: torch.Generator, batch: int, n: int) -> torch.Tensor:
    allowed = torch.rand(batch, n, generator=generator) < 0.5
    allowed[torch.arange(batch), torch.randint(n, (batch,), generator=generator)] = True
    return allowed


def test_masked_categorical_never_samples_a_masked_action_and_samples_the_right_frequencies():
    torch.manual_seed(0)
    logits = torch.tensor([[2.0, 1.0, 0.0, -1.0, 3.0], [0.0, 0.0, 0.0, 0.0, 0.0]])
    allowed = torch.tensor([[False, True, True, True, False], [True, False, False, False, False]])
    draws = 40_000
    dist = MaskedCategorical(logits.repeat(draws, 1), mask=allowed.repeat(draws, 1))
    samples = dist.sample().view(draws, 2)  # (draws, rows), one head
    assert allowed[torch.arange(2), samples].all()
    counts = torch.bincount(samples[:, 0], minlength=5).double() / draws
    expected = _reference_log_probs(logits, allowed)[0].exp().double()
    assert torch.allclose(counts, expected, atol=0.01)  # ~5 standard errors
    assert (samples[:, 1] == 0).all()


def test_masked_categorical_log_prob_and_entropy_are_those_of_the_allowed_actions():
    generator = torch.Generator().manual_seed(1)
    logits = torch.randn(64, 7, generator=generator) * 3
    allowed = _random_mask(generator, 64, 7)
    dist = make_distribution(spaces.Discrete(7), logits, mask=allowed)
    reference = _reference_log_probs(logits, allowed)
    for action in range(7):
        log_prob = dist.log_prob(torch.full((64, 1), action))
        assert torch.allclose(log_prob, reference[:, action], atol=1e-5)
    for row in range(64):
        valid = torch.distributions.Categorical(logits=logits[row][allowed[row]])
        assert torch.allclose(dist.entropy()[row], valid.entropy(), atol=1e-5)
    assert torch.isfinite(dist.entropy()).all()


def test_unmasked_categorical_matches_torch_distributions():
    logits = torch.randn(16, 5)
    dist = MaskedCategorical(logits)
    reference = torch.distributions.Categorical(logits=logits)
    actions = torch.randint(5, (16,))
    assert torch.allclose(dist.log_prob(actions[:, None]), reference.log_prob(actions), atol=1e-6)
    assert torch.allclose(dist.entropy(), reference.entropy(), atol=1e-6)


def test_mode_picks_the_best_allowed_action():
    logits = torch.tensor([[5.0, 1.0, 2.0, 0.0], [0.0, 3.0, 9.0, 2.5]])
    allowed = torch.tensor([[False, True, True, True], [True, True, False, True]])
    assert MaskedCategorical(logits, mask=allowed).mode().tolist() == [[2], [1]]
    assert MaskedCategorical(logits).mode().tolist() == [[0], [2]]


def test_a_row_with_no_allowed_action_raises_naming_the_row():
    allowed = torch.ones(5, 3, dtype=torch.bool)
    allowed[3] = False
    with pytest.raises(ValueError, match=r"row 3 head 0"):
        MaskedCategorical(torch.zeros(5, 3), mask=allowed)
    multi = spaces.MultiDiscrete([2, 3])
    per_head = (torch.ones(4, 2, dtype=torch.bool), torch.ones(4, 3, dtype=torch.bool))
    per_head[1][2] = False
    with pytest.raises(ValueError, match=r"row 2 head 1"):
        make_distribution(multi, torch.zeros(4, 5), mask=per_head)


def test_gradients_flow_to_allowed_logits_and_are_finite():
    logits = torch.randn(8, 6, requires_grad=True)
    allowed = _random_mask(torch.Generator().manual_seed(2), 8, 6)
    dist = MaskedCategorical(logits, mask=allowed)
    actions = dist.sample()
    loss = -(dist.log_prob(actions) + 0.1 * dist.entropy()).sum()
    loss.backward()
    assert torch.isfinite(logits.grad).all()
    assert (logits.grad[~allowed] == 0).all()
    rows_with_choice = allowed.sum(1) > 1
    assert (logits.grad[rows_with_choice].abs().sum(1) > 0).all()


@pytest.mark.parametrize("nvec", [[4, 4], [3, 5, 2]])
def test_multi_head_log_prob_and_entropy_are_sums_of_independent_masked_heads(nvec):
    generator = torch.Generator().manual_seed(3)
    batch = 32
    logits = torch.randn(batch, sum(nvec), generator=generator)
    masks = [_random_mask(generator, batch, n) for n in nvec]
    space = spaces.MultiDiscrete(nvec)
    joint = make_distribution(space, logits, mask=tuple(masks))
    joined_mask = make_distribution(space, logits, mask=torch.cat(masks, -1))
    heads = [
        MaskedCategorical(part, mask=mask)
        for part, mask in zip(logits.split(nvec, -1), masks, strict=True)
    ]
    actions = joint.sample()
    assert actions.shape == (batch, len(nvec)) and actions.dtype == torch.long
    for h, mask in enumerate(masks):
        assert mask[torch.arange(batch), actions[:, h]].all()
    per_head = sum(head.log_prob(actions[:, h : h + 1]) for h, head in enumerate(heads))
    assert torch.allclose(joint.log_prob(actions), per_head, atol=1e-5)
    assert torch.allclose(joined_mask.log_prob(actions), per_head, atol=1e-5)
    assert torch.allclose(joint.entropy(), sum(head.entropy() for head in heads), atol=1e-5)
    modes = torch.cat([head.mode() for head in heads], -1)
    assert torch.equal(joint.mode(), modes)


def test_many_masked_multi_head_samples_stay_inside_each_heads_mask():
    nvec = [3, 6]
    draws = 20_000
    masks = (
        torch.tensor([True, False, True]).expand(draws, 3),
        torch.tensor([False, False, False, True, False, True]).expand(draws, 6),
    )
    dist = make_distribution(spaces.MultiDiscrete(nvec), torch.zeros(draws, 9), mask=masks)
    actions = dist.sample()
    assert set(actions[:, 0].tolist()) == {0, 2}
    assert set(actions[:, 1].tolist()) == {3, 5}


def test_tuple_and_dict_of_discrete_are_factored_heads():
    tuple_space = spaces.Tuple((spaces.Discrete(3), spaces.Discrete(4, start=1)))
    dict_space = spaces.Dict({"x": spaces.Discrete(3), "y": spaces.MultiBinary(2)})
    assert action_head_sizes(tuple_space) == (3, 4)
    assert action_head_sizes(dict_space) == (3, 2, 2)
    logits = torch.randn(5, 7)
    mask = {"x": torch.tensor([True, False, False]).expand(5, 3), "y": torch.ones(5, 4)}
    dist = make_distribution(dict_space, logits, mask=mask)
    assert (dist.sample()[:, 0] == 0).all()
    joined = action_mask_tensor(action_head(dict_space), mask)
    assert joined.dtype == torch.bool and joined.shape == (5, 7)
    assert joined[0].tolist() == [True, False, False, True, True, True, True]


@settings(max_examples=40, deadline=None)
@given(
    sizes=st.lists(st.integers(1, 6), min_size=1, max_size=3),
    batch=st.integers(1, 5),
    seed=st.integers(0, 2**31 - 1),
)
def test_log_prob_of_every_allowed_joint_action_sums_to_one(sizes, batch, seed):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, sum(sizes), generator=generator) * 4
    masks = [_random_mask(generator, batch, n) for n in sizes]
    dist = MaskedCategorical(logits, sizes, masks)
    joint = torch.cartesian_prod(*[torch.arange(n) for n in sizes]).view(-1, len(sizes))
    total = torch.stack([dist.log_prob(a.expand(batch, -1)).exp() for a in joint]).sum(0)
    assert torch.allclose(total, torch.ones(batch), atol=1e-5)


def test_leading_time_and_batch_axes():
    dist = MaskedCategorical(torch.randn(6, 4, 7), sizes=(3, 4))
    assert dist.sample().shape == (6, 4, 2)
    assert dist.log_prob(dist.mode()).shape == (6, 4)
    assert dist.entropy().shape == (6, 4)


def test_integer_numpy_masks_are_accepted():
    mask = np.array([[0, 1, 0], [1, 1, 0]], dtype=np.int8)
    dist = make_distribution(spaces.Discrete(3), torch.zeros(2, 3), mask=mask)
    assert dist.mode()[0].item() == 1
    assert dist.log_prob(torch.tensor([[1], [0]])).tolist() == pytest.approx([0.0, math.log(0.5)])


def test_gaussian_matches_torch_normal():
    mean = torch.randn(10, 3, requires_grad=True)
    log_std = torch.tensor([-0.5, 0.0, 0.7], requires_grad=True)
    dist = make_distribution(spaces.Box(-1, 1, (3,)), mean, log_std=log_std)
    reference = torch.distributions.Normal(mean, log_std.exp())
    actions = dist.sample()
    assert actions.shape == (10, 3) and not actions.requires_grad
    assert torch.allclose(dist.log_prob(actions), reference.log_prob(actions).sum(-1), atol=1e-5)
    assert torch.allclose(dist.entropy(), reference.entropy().sum(-1), atol=1e-5)
    assert torch.equal(dist.mode(), mean.detach())
    (dist.log_prob(actions).sum() + dist.entropy().sum()).backward()
    assert mean.grad is not None and log_std.grad is not None


def test_gaussian_samples_have_the_given_mean_and_std():
    torch.manual_seed(0)
    dist = DiagGaussian(torch.tensor([1.0, -2.0]).expand(50_000, 2), torch.tensor([0.0, -1.0]))
    samples = dist.sample()
    assert torch.allclose(samples.mean(0), torch.tensor([1.0, -2.0]), atol=0.02)
    assert torch.allclose(samples.std(0), torch.tensor([1.0, math.exp(-1.0)]), atol=0.02)


def test_action_heads():
    assert action_head(spaces.Discrete(5)).sizes == (5,)
    multi = action_head(spaces.MultiDiscrete([8, 8]))
    assert (multi.kind, multi.sizes, multi.num_params, multi.action_dim) == (
        "categorical",
        (8, 8),
        16,
        2,
    )
    box = action_head(spaces.Box(-1, 1, (2, 3)))
    assert (box.kind, box.num_params, box.action_dim, box.action_dtype) == (
        "gaussian",
        6,
        6,
        torch.float32,
    )


@pytest.mark.parametrize(
    "space, named",
    [
        (spaces.Box(0, 5, (2,), dtype=np.int64), "int64"),
        (spaces.Text(5), "Text"),
        (spaces.Graph(spaces.Box(0, 1, (2,)), spaces.Discrete(2)), "Graph"),
        (spaces.Tuple((spaces.Discrete(2), spaces.Box(-1, 1, (1,)))), "Box inside"),
    ],
)
def test_unsupported_action_spaces_raise_naming_the_space(space, named):
    with pytest.raises(ValueError, match="unsupported action space") as err:
        action_head(space)
    assert named in str(err.value) and "supported:" in str(err.value)


def test_bad_masks_and_params_raise():
    with pytest.raises(ValueError, match="expected 5"):
        make_distribution(spaces.MultiDiscrete([2, 3]), torch.zeros(4, 5), mask=torch.ones(4, 4))
    with pytest.raises(ValueError, match="need 5"):
        MaskedCategorical(torch.zeros(4, 6), sizes=(2, 3))
    with pytest.raises(ValueError, match="log_std"):
        make_distribution(spaces.Box(-1, 1, (2,)), torch.zeros(4, 2))
    with pytest.raises(ValueError, match="discrete action space"):
        make_distribution(
            spaces.Box(-1, 1, (2,)), torch.zeros(4, 2), torch.ones(4, 2), torch.zeros(2)
        )


def test_to_env_actions_give_what_the_spaces_contain():
    space = spaces.Tuple(
        (spaces.Discrete(3, start=1), spaces.MultiDiscrete([2, 4]), spaces.MultiBinary(2))
    )
    head = action_head(space)
    dist = make_distribution(head, torch.randn(4, head.num_params))
    batched = to_env_actions(head, dist.sample())
    assert isinstance(batched, tuple) and batched[0].shape == (4,) and batched[1].shape == (4, 2)
    for i in range(4):
        assert space.contains(tuple(part[i] for part in batched))
    single = to_env_actions(head, dist.sample()[0], batched=False)
    assert space.contains(single) and isinstance(single[0], int)

    dict_space = spaces.Dict({"x": spaces.Discrete(3), "y": spaces.Discrete(5)})
    actions = torch.tensor([[2, 4], [0, 1]])
    out = to_env_actions(action_head(dict_space), actions)
    assert out["x"].tolist() == [2, 0] and out["y"].tolist() == [4, 1]

    box = spaces.Box(-1, 1, (2, 2))
    out = to_env_actions(action_head(box), torch.zeros(3, 4))
    assert out.shape == (3, 2, 2) and out.dtype == np.float32
    with pytest.raises(ValueError, match=r"expected \(B, 4\)"):
        to_env_actions(action_head(box), torch.zeros(3, 3))


def test_unequal_heads_first_built_in_inference_mode_still_train():
    # a rollout (inference mode) meets heads of sizes (4, 7) first; the update must backprop
    space = spaces.MultiDiscrete([4, 7])
    with torch.inference_mode():
        make_distribution(action_head(space), torch.zeros(3, 11)).sample()
    logits = torch.zeros(3, 11, requires_grad=True)
    dist = make_distribution(action_head(space), logits)
    dist.log_prob(torch.tensor([[1, 6], [0, 0], [3, 2]])).sum().backward()
    assert logits.grad is not None and torch.isfinite(logits.grad).all()
