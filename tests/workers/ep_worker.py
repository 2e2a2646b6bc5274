"""One rank of the expert-parallel check (launched by tests/test_expert_parallel.py, one process per rank).

Builds the same tiny model as the single-process reference, shards its routed experts over the ranks, runs this
rank's share of the batch, averages gradients data-parallel style and saves logits, loss, gradients and the
global expert loads for the test to compare.
"""

import torch
import torch.distributed as dist
from launch import worker_args

import dsv3
from dsv3.parallel.expert_parallel import apply_expert_parallel
from dsv3.parallel.mesh import Mesh, host_all_reduce, sync_gradients
from dsv3.train.losses import lm_loss, mtp_losses


def build():
    cfg = dsv3.get_config("tiny").replace(n_routed_experts=8, n_group=4, topk_group=2, num_experts_per_tok=2)
    model = dsv3.DeepseekV3(cfg)
    model.init_weights(seed=1)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(3 if p.dim() > 1 else 1)
    torch.manual_seed(2)
    tokens = torch.randint(1, cfg.vocab_size, (4, 17))
    return model, tokens


def loss_of(model, tokens):
    out = model(tokens[:, :-1])
    loss = lm_loss(out.logits, tokens) + 0.3 * sum(mtp_losses(out.mtp_logits, tokens, None))
    return out, loss


def main():
    args = worker_args()
    model, tokens = build()
    mesh = Mesh(ep=args.world)  # every rank in one expert-parallel group
    apply_expert_parallel(model, mesh.ep_group)
    rows = tokens.shape[0] // args.world
    local = tokens[args.rank * rows : (args.rank + 1) * rows]
    out, loss = loss_of(model, local)
    loss.backward()
    sync_gradients(model, mesh)
    loads = [host_all_reduce(r.load.clone()) for r in out.routing]
    losses = [torch.zeros(()) for _ in range(args.world)]
    dist.all_gather(losses, loss.detach())
    torch.save({"logits": out.logits.detach(), "loss": torch.stack(losses).mean(), "loads": loads,
                "grads": {n: p.grad for n, p in model.named_parameters()}}, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
