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


def test_one_unbatched_state_and_time_batch_axes_give_the_same_log_probs():
    # (n,) for one state and (T, B, n) with T != B != n, against torch's Categorical row by row
    logits = torch.randn(2, 3, 5, generator=torch.Generator().manual_seed(4))
    dist = MaskedCategorical(logits)
    assert dist.sizes == (5,)
    actions = torch.tensor([[[0], [4], [2]], [[1], [3], [4]]])
    reference = torch.distributions.Categorical(logits=logits)
    assert torch.allclose(dist.log_prob(actions), reference.log_prob(actions[..., 0]), atol=1e-6)
    assert torch.allclose(dist.entropy(), reference.entropy(), atol=1e-6)
    single = MaskedCategorical(logits[1, 2])
    assert single.sizes == (5,)
    assert single.log_prob(torch.tensor([3])).item() == pytest.approx(
        reference.log_prob(torch.tensor(3))[1, 2].item(), abs=1e-6
    )
    assert single.mode().tolist() == [logits[1, 2].argmax().item()]


def test_masks_of_one_state_and_per_head_masks_with_time_and_batch_axes():
    # one state: (n,) logits and a (n,) mask
    single = make_distribution(
        spaces.Discrete(4), torch.tensor([0.0, 5.0, 1.0, 1.0]), mask=np.array([1, 0, 1, 1])
    )
    assert single.mode().tolist() == [2]
    assert single.log_prob(torch.tensor([1])).item() == -math.inf
    expected = 1.0 - math.log(math.exp(0.0) + 2 * math.exp(1.0))
    assert single.log_prob(torch.tensor([3])).item() == pytest.approx(expected, abs=1e-6)
    # (T, B) = (2, 3) leading axes, heads of sizes (2, 4), masks given per head
    first = torch.zeros(2, 3, 2, dtype=torch.bool)
    first[..., 1] = True
    second = torch.zeros(2, 3, 4, dtype=torch.bool)
    second[..., 0] = True
    second[1, 2, 3] = True
    logits = torch.zeros(2, 3, 6)
    dist = make_distribution(spaces.MultiDiscrete([2, 4]), logits, mask=(first, second))
    assert dist.sample().shape == (2, 3, 2)
    assert (dist.mode()[..., 0] == 1).all()
    log_probs = dist.log_prob(torch.tensor([1, 0]).expand(2, 3, 2))
    expected = torch.zeros(2, 3)
    expected[1, 2] = math.log(0.5)
    assert torch.allclose(log_probs, expected)
    joined = action_mask_tensor(action_head(spaces.MultiDiscrete([2, 4])), (first, second))
    assert torch.equal(joined, torch.cat([first, second], -1))


def test_unequal_heads_without_a_mask_have_finite_entropy_and_expose_the_padding():
    logits = torch.randn(5, 7, generator=torch.Generator().manual_seed(5), requires_grad=True)
    dist = MaskedCategorical(logits, sizes=(3, 4))
    assert dist.sizes == (3, 4)
    heads = [torch.distributions.Categorical(logits=part) for part in logits.split([3, 4], -1)]
    entropy = dist.entropy()
    assert torch.isfinite(entropy).all()
    assert torch.allclose(entropy, heads[0].entropy() + heads[1].entropy(), atol=1e-6)
    entropy.sum().backward()
    assert torch.isfinite(logits.grad).all()
    # the padded slot of the 3-way head is never allowed
    assert dist.allowed.tolist() == [[True, True, True, False], [True, True, True, True]]
    samples = MaskedCategorical(logits.detach().repeat(400, 1), sizes=(3, 4)).sample()
    assert samples[:, 0].max() <= 2 and samples[:, 1].max() <= 3


def test_allowed_is_none_without_a_mask_and_the_padded_mask_with_one():
    assert MaskedCategorical(torch.zeros(2, 6), sizes=(3, 3)).allowed is None
    assert MaskedCategorical(torch.zeros(2, 6)).allowed is None
    mask = torch.tensor([[True, False, True, True, True, False, False]]).expand(2, 7)
    dist = MaskedCategorical(torch.zeros(2, 7), sizes=(3, 4), mask=mask)
    assert dist.allowed.shape == (2, 2, 4)
    assert dist.allowed[1].tolist() == [[True, False, True, False], [True, True, False, False]]
    equal = MaskedCategorical(torch.zeros(4), sizes=(2, 2), mask=torch.tensor([1, 0, 1, 1]))
    assert equal.allowed.tolist() == [[True, False], [True, True]]


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"logits have 6 entries in the last axis.*need 5"):
        MaskedCategorical(torch.zeros(6), sizes=(2, 3))
    with pytest.raises(ValueError, match=r"logits have 6 entries in the last axis.*need 5"):
        MaskedCategorical(torch.zeros(2, 4, 6), sizes=(2, 3))
    with pytest.raises(
        ValueError,
        match=r"action mask of shape \(3, 5\) does not match logits of shape \(4, 5\)",
    ):
        MaskedCategorical(torch.zeros(4, 5), mask=torch.ones(3, 5, dtype=torch.bool))
    dist = MaskedCategorical(torch.zeros(4, 5))
    with pytest.raises(ValueError, match=r"actions of shape \(4,\); expected \(4, 1\)"):
        dist.log_prob(torch.zeros(4, dtype=torch.long))
    with pytest.raises(
        ValueError, match=r"log_std of shape \(2,\) does not match mean of shape \(4, 3\)"
    ):
        DiagGaussian(torch.zeros(4, 3), torch.zeros(2))
    with pytest.raises(ValueError, match=r"log_std of shape \(2,\) does not match"):
        DiagGaussian(torch.zeros(3), torch.zeros(2))


def test_malformed_masks_are_value_errors_counting_the_last_axis():
    discrete = action_head(spaces.Discrete(5))
    with pytest.raises(ValueError, match=r"has 0 entries in the last axis; expected 5"):
        action_mask_tensor(discrete, torch.tensor(True))
    with pytest.raises(ValueError, match=r"has 4 entries in the last axis; expected 5"):
        action_mask_tensor(discrete, torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"has 4 entries in the last axis; expected 5"):
        action_mask_tensor(discrete, torch.ones(2, 3, 4, dtype=torch.bool))
    assert action_mask_tensor(discrete, np.array([0, 2, 0, 1, 0])).tolist() == [
        False,
        True,
        False,
        True,
        False,
    ]


def test_an_empty_row_under_time_and_batch_axes_is_named_by_its_index_tuple():
    allowed = torch.ones(2, 3, 4, dtype=torch.bool)
    allowed[1, 2] = False
    with pytest.raises(ValueError, match=r"allows no action in row \(1, 2\) head 0 \("):
        MaskedCategorical(torch.zeros(2, 3, 4), mask=allowed)


def test_gaussian_with_one_state_and_with_time_and_batch_axes_matches_torch_normal():
    generator = torch.Generator().manual_seed(6)
    for shape in [(3,), (2, 4, 3)]:
        mean = torch.randn(*shape, generator=generator)
        log_std = torch.tensor([-0.5, 0.0, 0.7])
        dist = DiagGaussian(mean, log_std)
        reference = torch.distributions.Normal(mean, log_std.exp().expand_as(mean))
        actions = torch.randn(*shape, generator=generator)
        expected = reference.log_prob(actions).sum(-1)
        assert dist.log_prob(actions).shape == shape[:-1]
        assert torch.allclose(dist.log_prob(actions), expected, atol=1e-5)
        assert torch.allclose(dist.entropy(), reference.entropy().sum(-1), atol=1e-5)
        assert dist.sample().shape == shape


def test_multi_discrete_start_is_added_to_the_env_actions():
    space = spaces.MultiDiscrete([3, 4], start=[1, -2])
    out = to_env_actions(action_head(space), torch.tensor([[0, 0], [2, 3]]))
    assert out.tolist() == [[1, -2], [3, 1]]
    assert all(space.contains(row) for row in out)


def test_one_dict_action_becomes_a_dict_of_python_ints_and_arrays():
    space = spaces.Dict({"move": spaces.Discrete(4, start=1), "bits": spaces.MultiBinary(2)})
    # a Dict space orders its keys: "bits" (two heads), then "move"
    single = to_env_actions(action_head(space), torch.tensor([1, 0, 2]), batched=False)
    assert set(single) == {"move", "bits"}
    assert single["move"] == 3 and isinstance(single["move"], int)
    assert single["bits"].tolist() == [1, 0]
    assert space.contains(single)


def test_masks_and_padding_live_on_the_logits_device():
    meta = torch.device("meta")
    head = action_head(spaces.MultiDiscrete([3, 5]))
    for mask in (np.ones((2, 8), dtype=bool), [np.ones((2, 3), bool), torch.ones(2, 5)]):
        joined = action_mask_tensor(head, mask, meta)
        assert joined.device == meta and joined.dtype == torch.bool and joined.shape == (2, 8)
    dist = MaskedCategorical(torch.zeros(2, 8, device=meta), sizes=(3, 5))
    assert dist.allowed.device == meta
    assert dist.log_probs.device == meta and dist.log_probs.shape == (2, 2, 5)


def _empty_rows_message(rows: list[str], more: int, sizes: tuple[int, ...]) -> str:
    shown = ", ".join(rows) + (f" and {more} more" if more else "")
    return (
        f"action mask allows no action in {shown} (heads of sizes {sizes}); every row needs at "
        "least one allowed action per head"
    )


@pytest.mark.parametrize("empty_rows", [1, 10, 11, 13])
def test_empty_mask_rows_are_named_the_first_ten_then_counted(empty_rows):
    allowed = torch.ones(20, 3, dtype=torch.bool)
    allowed[:empty_rows] = False
    with pytest.raises(ValueError) as err:
        MaskedCategorical(torch.zeros(20, 3), mask=allowed)
    rows = [f"row {row} head 0" for row in range(min(empty_rows, 10))]
    assert str(err.value) == _empty_rows_message(rows, max(empty_rows - 10, 0), (3,))


def test_empty_mask_heads_under_time_and_batch_axes_are_named_by_index_tuples():
    # (T, B) = (2, 4), heads of sizes (2, 3): the second head of step (1, 3) has no action
    allowed = torch.ones(2, 4, 5, dtype=torch.bool)
    allowed[1, 3, 2:] = False
    with pytest.raises(ValueError) as err:
        MaskedCategorical(torch.zeros(2, 4, 5), sizes=(2, 3), mask=allowed)
    assert str(err.value) == _empty_rows_message(["row (1, 3) head 1"], 0, (2, 3))


def test_misused_arguments_raise_errors_naming_the_space_and_the_expected_shape():
    nested = spaces.Tuple((spaces.Discrete(2), spaces.Tuple((spaces.Box(-1, 1, (1,)),))))
    with pytest.raises(ValueError) as err:
        action_head(nested)
    assert str(err.value).startswith(f"unsupported action space {nested} (a Box inside a Tuple/")
    text = spaces.Dict({"a": spaces.Discrete(2), "b": spaces.Text(3)})
    with pytest.raises(ValueError) as err:
        action_head(text)
    assert str(err.value).startswith(f"unsupported action space {text} ({text['b']});")
    with pytest.raises(ValueError, match=r"unsupported action space Tuple\(\): no action heads"):
        action_head(spaces.Tuple(()))
    discrete, box = spaces.Discrete(3), spaces.Box(-1, 1, (2,))
    with pytest.raises(ValueError, match=r"log_std is for Box action spaces, got Discrete\(3\)"):
        make_distribution(discrete, torch.zeros(3), log_std=torch.zeros(3))
    with pytest.raises(ValueError, match=r"masks need a discrete action space, got Box\("):
        action_mask_tensor(action_head(box), torch.ones(2))
    with pytest.raises(ValueError, match=r"mapping needs a Dict action space, got Discrete\(3\)"):
        action_mask_tensor(action_head(discrete), {"a": torch.ones(3)})
    with pytest.raises(ValueError, match=r"shape \(3,\) for Discrete\(3\); expected \(1,\)$"):
        to_env_actions(action_head(discrete), torch.zeros(3), batched=False)
    with pytest.raises(ValueError) as err:
        action_mask_tensor(
            action_head(spaces.MultiDiscrete([2, 3])), (torch.ones(2), torch.ones(2))
        )
    assert str(err.value) == (
        "action mask of shape(s) [(2,), (2,)] has 4 entries in the last axis; expected 5 (one "
        "per logit), as one mask or per-head parts joined along the last axis"
    )
