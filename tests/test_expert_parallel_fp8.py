"""Expert parallelism keeps the experts' own GEMM: an FP8 model stays FP8 once its experts are sharded.

(Earlier, `EPExperts` re-implemented the expert computation with plain GEMMs, so `--precision fp8 --ep N`
silently trained the routed experts in full precision.) One process, a gloo group of size 1: the dispatch
is the identity, so the sharded model must reproduce the unsharded FP8 model exactly.
"""

import copy

import pytest
import torch
import torch.distributed as dist

import dsv3
from dsv3.parallel.expert_parallel import EPExperts, apply_expert_parallel
from dsv3.quant import convert_to_fp8


@pytest.fixture
def gloo_world_of_one(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@torch.no_grad()
def test_ep_keeps_fp8_experts(gloo_world_of_one):
    model = dsv3.DeepseekV3(dsv3.get_config("tiny").replace(num_hidden_layers=2, num_nextn_predict_layers=0))
    model.init_weights(seed=0)
    ids = torch.randint(0, 256, (1, 8))
    full_precision = model(ids, mtp=False).logits
    convert_to_fp8(model)
    fp8 = model(ids, mtp=False).logits
    assert not torch.allclose(fp8, full_precision, atol=1e-6, rtol=0)  # FP8 visibly changes the logits

    sharded = apply_expert_parallel(copy.deepcopy(model))
    assert isinstance(sharded.model.layers[1].mlp.experts, EPExperts)
    torch.testing.assert_close(sharded(ids, mtp=False).logits, fp8, atol=0, rtol=0)
