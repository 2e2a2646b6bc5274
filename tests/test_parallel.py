"""EPLB placement and the cost / bubble model."""

import pytest
import torch

import dsv3
from dsv3.cost import parse_count, pipeline_bubbles, training_cost
from dsv3.parallel import rebalance_experts

LOADS = torch.tensor([[90, 132, 40, 61, 104, 165, 39, 4, 73, 56, 183, 86],
                      [20, 107, 104, 64, 19, 197, 187, 157, 172, 86, 16, 27]])


def test_eplb_reproduces_the_published_example():
    phy2log, log2phy, logcnt = rebalance_experts(LOADS, num_replicas=16, num_groups=4, num_nodes=2, num_gpus=8)
    assert phy2log.tolist() == [[5, 6, 5, 7, 8, 4, 3, 4, 10, 9, 10, 2, 0, 1, 11, 1],
                                [7, 10, 6, 8, 6, 11, 8, 9, 2, 4, 5, 1, 5, 0, 3, 1]]
    # log2phy and logcnt are consistent with phy2log
    for layer in range(2):
        for e in range(12):
            slots = [s for s in log2phy[layer, e].tolist() if s >= 0]
            assert len(slots) == logcnt[layer, e]
            assert all(phy2log[layer, s] == e for s in slots)
    assert logcnt.sum(-1).tolist() == [16, 16]


def test_eplb_hierarchical_keeps_groups_on_one_node_and_balances_gpus():
    torch.manual_seed(0)
    loads = torch.randint(1, 1000, (3, 64)).float()
    loads[:, 5] *= 20  # a very hot expert gets replicas
    phy2log, _, logcnt = rebalance_experts(loads, num_replicas=80, num_groups=8, num_nodes=4, num_gpus=16)
    per_node = 80 // 4
    for layer in range(3):
        assert logcnt[layer, 5] > 1
        for node in range(4):
            groups = {int(e) // 8 for e in phy2log[layer, node * per_node : (node + 1) * per_node]}
            assert len(groups) == 2  # each node holds exactly its 2 whole groups (8 groups / 4 nodes)
        slot_load = loads[layer][phy2log[layer]] / logcnt[layer][phy2log[layer]]
        gpu_load = slot_load.view(4, 4, 5).sum(-1)  # [node, gpu, slots]: groups pin load to nodes, so the
        # balance to check is between the GPUs of each node
        assert (gpu_load.max(-1).values / gpu_load.mean(-1)).max() < 1.5


def test_eplb_global_policy_and_errors():
    phy2log, _, logcnt = rebalance_experts(LOADS, num_replicas=16, num_groups=3, num_nodes=2, num_gpus=4)
    assert phy2log.shape == (2, 16) and logcnt.sum(-1).tolist() == [16, 16]
    with pytest.raises(ValueError, match="multiple of num_gpus"):
        rebalance_experts(LOADS, num_replicas=15, num_groups=4, num_nodes=2, num_gpus=8)


def test_cost_model_lands_near_the_reported_gpu_hours():
    est = training_cost(dsv3.get_config("deepseek-v3-671b"), parse_count("14.8T"), 2048, "h800", mfu=0.4)
    assert abs(est.gpu_hours - 2.664e6) / 2.664e6 < 0.10
    assert parse_count("469B") == 469e9


def test_bubble_formulas():
    b = pipeline_bubbles(pp=8, micro_batches=16, f=1, b=2, w=1)
    assert b["1F1B"]["bubble"] == 7 * 3
    assert b["ZB1P"]["bubble"] == 7 * 1
    assert b["DualPipe"]["bubble"] == 3 * (3 + 2 - 3)
    assert b["DualPipe"]["bubble"] < b["ZB1P"]["bubble"] < b["1F1B"]["bubble"]
