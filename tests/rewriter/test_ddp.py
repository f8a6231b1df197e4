import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import einfx
from einfx import Policy, Structure

from _dist import free_port
from _models import TinyTransformer, ids


def _worker(rank: int, world: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        torch.manual_seed(0)  # same model and same structured layers on every rank
        model = TinyTransformer()
        gm = einfx.optimize(model, Policy(default=Structure.btt(rank=2)), (ids(vocab=50),))
        gm.train()
        ddp = torch.nn.parallel.DistributedDataParallel(gm)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        x = ids(vocab=50, seed=100 + rank)  # different data per rank
        loss = ddp(x).logsumexp(-1).mean()
        loss.backward()
        opt.step()
        flat = torch.cat([p.detach().flatten() for p in gm.parameters()])
        torch.save({"flat": flat, "names": [n for n, _ in gm.named_parameters()]}, os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_one_ddp_step_gives_identical_parameters_on_both_ranks(tmp_path):
    mp.spawn(_worker, args=(2, free_port(), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt", weights_only=True) for r in (0, 1))
    assert r0["names"] == r1["names"] and any(".A" in n for n in r0["names"])
    assert torch.equal(r0["flat"], r1["flat"])
    # the step did change the parameters (the gradients were averaged, not zero)
    torch.manual_seed(0)
    start = einfx.optimize(TinyTransformer(), Policy(default=Structure.btt(rank=2)), (ids(vocab=50),))
    assert not torch.equal(torch.cat([p.detach().flatten() for p in start.parameters()]), r0["flat"])
