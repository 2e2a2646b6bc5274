"""EPLB: placing redundant replicas of hot experts across GPUs, from observed per-expert loads.

Serving DeepSeek-V3 with expert parallelism, some experts receive far more tokens than others. Each MoE layer may
be given extra "physical" experts (replicas of hot "logical" experts) so that every GPU gets a similar load.

Hierarchical policy (used when the expert groups divide evenly across nodes, so that group-limited routing keeps
its traffic inside nodes):
  1. pack whole expert groups onto nodes, balancing the nodes' summed loads;
  2. inside each node, give replicas one at a time to the expert with the highest load per replica;
  3. pack the node's physical experts onto its GPUs, balancing the GPUs' loads (load of a replica =
     expert load / its replica count).
Global policy (otherwise): the same with one group and one node.
"Balanced packing" places the heaviest item first, each into the lightest pack that still has room; every pack
gets the same number of items (the number of slots per node / per GPU is fixed).

Returns, per layer: phy2log [replicas] (the logical expert of each physical slot), log2phy [logical, max_count]
(the physical slots of each logical expert, -1 padded) and logcnt [logical] (replicas per logical expert).
"""

from __future__ import annotations

import torch


def balanced_packing(weights: list[float], n_packs: int) -> list[tuple[int, int]]:
    """(pack, rank within pack) for each item; each pack holds exactly len(weights) / n_packs items.

    Raises:
        ValueError: len(weights) not divisible by n_packs.
    """
    n = len(weights)
    if n % n_packs:
        raise ValueError(f"{n} items do not split evenly into {n_packs} packs")
    per_pack = n // n_packs
    if per_pack == 1:
        return [(i, 0) for i in range(n)]
    load, count = [0.0] * n_packs, [0] * n_packs
    placed: list[tuple[int, int]] = [(-1, -1)] * n
    for item in sorted(range(n), key=lambda i: -weights[i]):  # heaviest first (stable on ties)
        pack = min((p for p in range(n_packs) if count[p] < per_pack), key=lambda p: load[p])
        placed[item] = (pack, count[pack])
        load[pack] += weights[item]
        count[pack] += 1
    return placed


def replicate(weights: list[float], n_physical: int) -> tuple[list[int], list[int], list[int]]:
    """Give n_physical - len(weights) extra replicas, each to the expert with the highest load per replica.
    Returns (logical expert of each physical slot, replica rank of each slot, replica count of each expert)."""
    counts = [1] * len(weights)
    phy2log, rank = list(range(len(weights))), [0] * len(weights)
    for _ in range(n_physical - len(weights)):
        e = max(range(len(weights)), key=lambda j: weights[j] / counts[j])  # first on ties
        phy2log.append(e)
        rank.append(counts[e])
        counts[e] += 1
    return phy2log, rank, counts


def _rebalance_layer(w: list[float], n_physical: int, n_groups: int, n_nodes: int, n_gpus: int):
    n_experts = len(w)
    group_size = n_experts // n_groups
    groups_per_node = n_groups // n_nodes
    gpus_per_node = n_gpus // n_nodes
    per_gpu = n_physical // n_gpus
    # 1. groups -> nodes; a node's local expert order: its groups by rank, each group's experts in order
    group_load = [sum(w[g * group_size : (g + 1) * group_size]) for g in range(n_groups)]
    local = [[0] * (groups_per_node * group_size) for _ in range(n_nodes)]
    for g, (node, r) in enumerate(balanced_packing(group_load, n_nodes)):
        for j in range(group_size):
            local[node][r * group_size + j] = g * group_size + j
    phy2log, phyrank, logcnt = [], [], [0] * n_experts
    for node in range(n_nodes):
        experts = local[node]
        loads = [w[e] for e in experts]
        # 2. replicas inside the node
        p2l, rank, counts = replicate(loads, n_physical // n_nodes)
        # 3. physical experts -> the node's GPUs
        slot_of = balanced_packing([loads[m] / counts[m] for m in p2l], gpus_per_node)
        by_slot = [0] * len(p2l)
        for i, (gpu, r) in enumerate(slot_of):
            by_slot[gpu * per_gpu + r] = i
        phy2log += [experts[p2l[i]] for i in by_slot]
        phyrank += [rank[i] for i in by_slot]
        for m, c in enumerate(counts):
            logcnt[experts[m]] = c
    return phy2log, phyrank, logcnt


def rebalance_experts(weight: torch.Tensor, num_replicas: int, num_groups: int, num_nodes: int, num_gpus: int
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """weight [layers, logical experts] of observed loads (tokens per expert) -> (phy2log [layers, replicas],
    log2phy [layers, logical, max replicas] (-1 padded), logcnt [layers, logical]), int64; see the module doc.
    Source: DeepSeek's `eplb.py` (deepseek-ai/EPLB), whose published example this reproduces.

    Raises:
        ValueError: counts that do not divide: experts by groups, GPUs by nodes, replicas by GPUs, or fewer
            replicas than experts.
    """
    layers, n_experts = weight.shape
    for ok, msg in ((n_experts % num_groups == 0, "the number of experts must be divisible by num_groups"),
                    (num_gpus % num_nodes == 0, "num_gpus must be a multiple of num_nodes"),
                    (num_replicas % num_gpus == 0, "num_replicas must be a multiple of num_gpus"),
                    (num_replicas >= n_experts, "num_replicas must be at least the number of experts")):
        if not ok:
            raise ValueError(msg)
    if num_groups % num_nodes == 0:
        groups, nodes = num_groups, num_nodes  # hierarchical
    else:
        groups, nodes = 1, 1  # global
    if num_replicas % nodes or (num_replicas // nodes) % (num_gpus // nodes):
        raise ValueError("num_replicas must split evenly over nodes and their GPUs")
    results = [_rebalance_layer(row.float().tolist(), num_replicas, groups, nodes, num_gpus) for row in weight]
    phy2log = torch.tensor([r[0] for r in results], dtype=torch.int64)
    phyrank = torch.tensor([r[1] for r in results], dtype=torch.int64)
    logcnt = torch.tensor([r[2] for r in results], dtype=torch.int64)
    log2phy = torch.full((layers, n_experts, int(logcnt.max())), -1, dtype=torch.int64)
    for layer in range(layers):
        for slot in range(num_replicas):
            log2phy[layer, phy2log[layer, slot], phyrank[layer, slot]] = slot
    return phy2log, log2phy, logcnt
