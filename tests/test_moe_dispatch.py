import pytest
import torch

from rmoe_plugin.moe import combine, expert_capacity, plan_dispatch, priority_rank


def test_capacity_is_k_times_ceil_of_share():
    assert expert_capacity(2048, 8, 1, 1.25) == 320
    assert expert_capacity(10, 4, 2, 1.0) == 2 * 3
    assert expert_capacity(10, 4, 1, None) is None


def test_slots_follow_token_order_and_drop_past_capacity():
    expert_index = torch.tensor([[0], [0], [0], [1], [0], [1]])
    plan = plan_dispatch(expert_index, num_experts=2, capacity=2)
    assert plan.position.flatten().tolist() == [0, 1, 2, 0, 3, 1]
    assert plan.expert_load.tolist() == [4, 2]
    assert plan.tokens_per_expert.tolist() == [2, 2]
    assert plan.group_end.tolist() == [2, 4] and plan.group_end.dtype == torch.int32
    # kept rows grouped by expert, then the dropped ones, which belong to no expert (E = 2)
    assert plan.token_index.tolist() == [0, 1, 3, 5, 2, 4]
    assert plan.row_expert.tolist() == [0, 0, 1, 1, 2, 2]
    assert plan.kept.flatten().tolist() == [True, True, False, True, False, True]
    assert plan.num_dropped.item() == 2
    sizes = plan.group_sizes()  # copied to the host for the per-expert loop
    assert sizes.tolist() == [2, 2, 2] and sizes.device.type == 'cpu'


def test_batch_prioritized_keeps_the_most_confident_tokens():
    expert_index = torch.tensor([[0], [0], [0], [1], [0], [1]])
    priority = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2])
    plan = plan_dispatch(expert_index, num_experts=2, capacity=2, priority=priority)
    assert plan.token_index.tolist()[:4] == [1, 4, 3, 5]
    assert sorted(plan.token_index.tolist()[4:]) == [0, 2]
    assert plan.position.flatten().tolist() == [3, 0, 2, 0, 1, 1]


def test_priority_rank_is_descending_order_position():
    assert priority_rank(torch.tensor([0.2, 0.9, 0.5])).tolist() == [2, 0, 1]


def test_second_choices_queue_after_all_first_choices():
    # Token 0's second choice and token 1's first choice both want expert 1.
    expert_index = torch.tensor([[0, 1], [1, 0]])
    plan = plan_dispatch(expert_index, num_experts=2, capacity=1)
    assert plan.position.tolist() == [[0, 1], [0, 1]]
    assert plan.token_index.tolist()[:2] == [0, 1]
    assert plan.choice_index.tolist()[:2] == [0, 2]  # flat index token * k + choice
    assert plan.kept.tolist() == [[True, False], [True, False]]


def test_dropless_keeps_every_assignment():
    expert_index = torch.randint(0, 4, (50, 2))
    plan = plan_dispatch(expert_index, num_experts=4, capacity=None)
    assert plan.tokens_per_expert.sum().item() == 100
    assert plan.num_dropped.item() == 0 and bool(plan.kept.all())
    grouped = expert_index.flatten()[plan.choice_index]
    assert torch.equal(grouped, grouped.sort().values)
    assert torch.equal(plan.row_expert, grouped)
    assert plan.group_end.tolist() == torch.cumsum(plan.tokens_per_expert, 0).tolist()


def test_rows_index_kept_assignments_in_expert_order():
    expert_index = torch.tensor([[1, 0], [0, 1], [1, 0]])
    plan = plan_dispatch(expert_index, num_experts=2, capacity=2)
    # expert 0 keeps token 1 (1st choice) then token 0 (2nd); expert 1 keeps tokens 0 and 2.
    assert plan.token_index.tolist()[:4] == [1, 0, 0, 2]
    assert plan.row[plan.kept].tolist() == [2, 1, 0, 3]
    assert plan.kept.tolist() == [[True, True], [True, False], [True, False]]
    # every assignment has its own row: the rows are a permutation
    assert sorted(plan.row.flatten().tolist()) == list(range(6))


def test_the_rows_invert_the_choice_index():
    expert_index = torch.randint(0, 3, (20, 2))
    plan = plan_dispatch(expert_index, num_experts=3, capacity=5)
    assert torch.equal(plan.choice_index[plan.row.flatten()], torch.arange(40))


def test_combine_sums_weighted_outputs_and_leaves_dropped_tokens_zero():
    out = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [9.0, 9.0], [9.0, 9.0],
                        [9.0, 9.0]])
    weight = torch.tensor([[1.0, 2.0], [0.5, 0.5], [4.0, 4.0]])
    row = torch.tensor([[0, 2], [3, 4], [1, 5]])
    kept = torch.tensor([[True, True], [False, False], [True, False]])
    result = combine(out, weight, row, kept)
    assert result.tolist() == [[7.0, 7.0], [0.0, 0.0], [8.0, 8.0]]
    top1 = combine(out, weight[:, :1], row[:, :1], kept[:, :1])
    assert top1.tolist() == [[1.0, 1.0], [0.0, 0.0], [8.0, 8.0]]


@pytest.mark.parametrize('top_k', [1, 2])
def test_a_dropped_row_holding_nan_or_inf_reaches_no_token_and_no_gradient(top_k):
    out = torch.tensor([[1.0, 1.0], [float('nan'), float('inf')], [3.0, 3.0],
                        [float('-inf'), 0.0]], requires_grad=True)
    row = torch.tensor([[0, 1], [2, 3]])[:, :top_k]
    kept = torch.tensor([[True, False], [True, False]])[:, :top_k]
    weight = torch.full((2, top_k), 0.5)
    result = combine(out, weight, row, kept)
    assert result.tolist() == [[0.5, 0.5], [1.5, 1.5]]
    result.sum().backward()
    assert torch.isfinite(out.grad).all()
    assert out.grad[[1, 3]].abs().sum() == 0
