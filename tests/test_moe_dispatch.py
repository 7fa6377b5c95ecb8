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
    assert plan.token_index.tolist() == [0, 1, 3, 5]
    assert plan.num_dropped.item() == 2


def test_batch_prioritized_keeps_the_most_confident_tokens():
    expert_index = torch.tensor([[0], [0], [0], [1], [0], [1]])
    priority = torch.tensor([0.1, 0.9, 0.5, 0.3, 0.7, 0.2])
    plan = plan_dispatch(expert_index, num_experts=2, capacity=2, priority=priority)
    assert plan.token_index.tolist() == [1, 4, 3, 5]
    assert plan.position.flatten().tolist() == [3, 0, 2, 0, 1, 1]


def test_priority_rank_is_descending_order_position():
    assert priority_rank(torch.tensor([0.2, 0.9, 0.5])).tolist() == [2, 0, 1]


def test_second_choices_queue_after_all_first_choices():
    # Token 0's second choice and token 1's first choice both want expert 1.
    expert_index = torch.tensor([[0, 1], [1, 0]])
    plan = plan_dispatch(expert_index, num_experts=2, capacity=1)
    assert plan.position.tolist() == [[0, 1], [0, 1]]
    assert plan.token_index.tolist() == [0, 1]
    assert plan.choice_index.tolist() == [0, 2]  # flat index token * k + choice


def test_dropless_keeps_every_assignment():
    expert_index = torch.randint(0, 4, (50, 2))
    plan = plan_dispatch(expert_index, num_experts=4, capacity=None)
    assert plan.tokens_per_expert.sum().item() == 100
    assert plan.num_dropped.item() == 0
    grouped = expert_index.flatten()[plan.choice_index]
    assert torch.equal(grouped, grouped.sort().values)


def test_rows_index_kept_assignments_in_expert_order():
    expert_index = torch.tensor([[1, 0], [0, 1], [1, 0]])
    plan = plan_dispatch(expert_index, num_experts=2, capacity=2)
    # expert 0 keeps token 1 (1st choice) then token 0 (2nd); expert 1 keeps tokens 0 and 2.
    assert plan.token_index.tolist() == [1, 0, 0, 2]
    assert plan.row.tolist() == [[2, 1], [0, -1], [3, -1]]


def test_combine_sums_weighted_outputs_and_leaves_dropped_tokens_zero():
    out = torch.tensor([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    weight = torch.tensor([[1.0, 2.0], [0.5, 0.5], [4.0, 4.0]])
    row = torch.tensor([[0, 2], [-1, -1], [1, -1]])
    result = combine(out, weight, row)
    assert result.tolist() == [[7.0, 7.0], [0.0, 0.0], [8.0, 8.0]]
    top1 = combine(out, weight[:, :1], row[:, :1])
    assert top1.tolist() == [[1.0, 1.0], [0.0, 0.0], [8.0, 8.0]]
