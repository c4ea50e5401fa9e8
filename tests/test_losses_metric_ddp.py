"""2 processes holding half a batch each must give the loss and gradients of 1 process on the whole batch, for every
metric-learning loss that uses other samples of the batch (DESIGN.md §3). One `mp.spawn` runs all the cases.

The control case, a NT-Xent that scores each process's half only (no gather), must NOT match: it proves the comparison
detects a missing gather. TOL = 1e-9 in float64 (summation order only; a missing gather is off by > 1e-2).
"""

import gc
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_distributed import _free_port
from torch.nn.parallel import DistributedDataParallel as DDP

import selfsup.distributed
from selfsup.losses.metric_learning import (
    UNIFIED_FAMILY,
    dcl_loss,
    dclw_loss,
    info_nce,
    margin_contrastive_loss,
    n_pair_loss,
    nca_loss,
    npid_loss,
    supcon_loss,
    triplet_loss,
    unified_contrastive,
)

TOL = 1e-9
WORLD = 2



def _data():
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(8, 6, generator=g, dtype=torch.float64)
    x2 = x1 + 0.5 * torch.randn(8, 6, generator=g, dtype=torch.float64)
    # rank 0 holds labels [0, 1, 0, 2], rank 1 [1, 3, 0, 2]: class 3 has no positive, so the number of anchors that
    # count differs between the ranks (what a plain local mean gets wrong)
    labels = torch.tensor([0, 1, 0, 2, 1, 3, 0, 2])
    index = torch.tensor([3, 9, 0, 14, 7, 1, 12, 5])
    bank = F.normalize(torch.randn(16, 4, generator=g, dtype=torch.float64), dim=1)
    queue = torch.randn(10, 4, generator=g, dtype=torch.float64)
    model = torch.nn.Linear(6, 4).double()
    with torch.no_grad():
        model.weight.copy_(torch.randn(4, 6, generator=g, dtype=torch.float64))
        model.bias.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    return x1, x2, labels, index, bank, queue, model


def _local_only_nt_xent(z1, z2, t=0.2):
    """NT-Xent over this process's samples only: the bug every loss here must not have."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = z1.shape[0]
    logits = (z @ z.T / t).fill_diagonal_(float("-inf"))
    return F.cross_entropy(logits, torch.cat([torch.arange(n) + n, torch.arange(n)]))


def _cases(bank, queue):
    """name -> loss(f, x1, x2, labels, index), f the (DDP-wrapped) model; single-view losses forward x1 only."""
    two = {
        "margin": lambda a, b, y, i: margin_contrastive_loss(a, b, y % 2 == 0),
        "n_pair": lambda a, b, y, i: n_pair_loss(a, b),
        "info_nce_in_batch": lambda a, b, y, i: info_nce(a, b, scale_by_2tau=True),
        "info_nce_queue": lambda a, b, y, i: info_nce(a, b, negatives=queue),
        "dcl": lambda a, b, y, i: dcl_loss(a, b),
        "dclw": lambda a, b, y, i: dclw_loss(a, b),
        "dclw_weight_grad": lambda a, b, y, i: dclw_loss(a, b, detach_weight=False),
        "supcon_2_views": lambda a, b, y, i: supcon_loss([a, b], y),
        "local_only_nt_xent": lambda a, b, y, i: _local_only_nt_xent(a, b),
        **{f"unified_{k}": (lambda a, b, y, i, k=k: unified_contrastive(a, b, k, tau=0.5)) for k in UNIFIED_FAMILY},
    }
    one = {
        "nca_anchor": lambda a, y, i: nca_loss(a, y),
        "nca_global": lambda a, y, i: nca_loss(a, y, "global"),
        "triplet_hard": lambda a, y, i: triplet_loss(a, y, margin=1.0),
        "triplet_semi_hard": lambda a, y, i: triplet_loss(a, y, margin=1.0, mining="semi-hard"),
        "triplet_all": lambda a, y, i: triplet_loss(a, y, margin=1.0, mining="all"),
        "supcon_1_view": lambda a, y, i: supcon_loss([a], y),
        "npid": lambda a, y, i: npid_loss(a, i, bank),
    }
    cases = {k: (lambda f, x1, x2, y, i, fn=fn: fn(f(x1), f(x2), y, i)) for k, fn in two.items()}
    cases.update({k: (lambda f, x1, x2, y, i, fn=fn: fn(f(x1), y, i)) for k, fn in one.items()})
    return cases


def _run(f, model, sl):
    x1, x2, labels, index, bank, queue, _ = _data()
    out = {}
    for name, case in _cases(bank, queue).items():
        model.zero_grad(set_to_none=True)
        loss = case(f, x1[sl], x2[sl], labels[sl], index[sl])
        loss.backward()
        out[name] = (loss.detach(), model.weight.grad.clone(), model.bias.grad.clone())
    return out


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    model = _data()[-1]
    ddp = DDP(model)
    n = 8 // world
    results = _run(ddp, model, slice(rank * n, (rank + 1) * n))
    saved = {}
    for name, (loss, grad_w, grad_b) in results.items():
        losses = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
        dist.all_gather(losses, loss)
        saved[name] = {"loss": torch.stack(losses).mean(), "grad_w": grad_w, "grad_b": grad_b}
    torch.save(saved, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # leave together, DDP before the group (see tests/test_distributed.py)
    del ddp
    gc.collect()  # DDP sits in reference cycles: free its reducer before the group (test_distributed)
    selfsup.distributed.shutdown()  # gc first: DDP's reducer must go before the group


def _matches(r, ref):
    loss, grad_w, grad_b = ref
    return (abs(float(r["loss"]) - float(loss)) <= TOL * max(1.0, abs(float(loss)))
            and torch.allclose(r["grad_w"], grad_w, atol=TOL, rtol=TOL)
            and torch.allclose(r["grad_b"], grad_b, atol=TOL, rtol=TOL))


def test_two_processes_equal_one_for_every_metric_loss(tmp_path):
    model = _data()[-1]
    reference = _run(model, model, slice(None))
    mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    for rank in range(WORLD):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert set(got) == set(reference)
        checked = [name for name in reference if name != "local_only_nt_xent"]
        wrong = [name for name in checked if not _matches(got[name], reference[name])]
        assert not wrong, f"rank {rank}: 2 processes differ from 1 for {wrong}"
        # the control: without a gather the loss (and gradient) of 2 half batches is not the whole batch's
        assert not _matches(got["local_only_nt_xent"], reference["local_only_nt_xent"])
        assert abs(float(got["local_only_nt_xent"]["loss"]) - float(reference["local_only_nt_xent"][0])) > 1e-2
