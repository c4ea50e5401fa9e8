"""2 processes holding half the batch each must give the loss and gradients of 1 process on the whole batch, for every
canonical-correlation loss (cookbook §3.8.1, DESIGN.md §3). One spawn runs them all, through a DDP-wrapped Linear.
"""

import gc
import os

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import _free_port
from torch.nn.parallel import DistributedDataParallel as DDP

import selfsup.distributed
from selfsup.losses.canonical_correlation import (
    barlow_twins_loss,
    sinkhorn_knopp,
    swav_loss,
    vicreg_covariance,
    vicreg_invariance,
    vicreg_loss,
    vicreg_variance,
    wmse_loss,
)

# float64 throughout: 1 and 2 processes differ only in summation order (observed gaps ~1e-15); 1e-8 (absolute and
# relative) is far below the gaps the negative controls open (> 1e-2)
TOL = 1e-8
WORLD, BATCH, QUEUE = 2, 16, 6



def _data():
    g = torch.Generator().manual_seed(0)
    xs = [torch.randn(BATCH, 6, generator=g, dtype=torch.float64) for _ in range(3)]  # 2 global crops + 1 local
    queue = [torch.randn(QUEUE, 4, generator=g, dtype=torch.float64) for _ in range(2)]  # queued SwAV scores
    model = torch.nn.Linear(6, 4).double()
    with torch.no_grad():
        model.weight.copy_(0.3 * torch.randn(4, 6, generator=g, dtype=torch.float64))  # stds near 1: hinge active
        model.bias.copy_(torch.randn(4, generator=g, dtype=torch.float64))
    return xs, queue, model


def _barlow_without_gather(z1, z2, lambd=5e-3, eps=1e-5):
    """Negative control: Barlow Twins on this process's samples only, as if nothing were gathered."""
    n1 = (z1 - z1.mean(0)) / torch.sqrt(z1.var(0, unbiased=False) + eps)
    n2 = (z2 - z2.mean(0)) / torch.sqrt(z2.var(0, unbiased=False) + eps)
    c = n1.T @ n2 / z1.shape[0]
    off = c - torch.diag(torch.diagonal(c))
    return (torch.diagonal(c) - 1).pow(2).sum() + lambd * off.pow(2).sum()


def _cases(f, xs, queue):
    """name -> loss of this process's samples; `f` is the (DDP-wrapped) model."""
    wmse_generator = lambda: torch.Generator().manual_seed(3)  # noqa: E731  the same draw on every process
    return {
        "vicreg": lambda: vicreg_loss(f(xs[0]), f(xs[1])),
        "vicreg_invariance": lambda: vicreg_invariance(f(xs[0]), f(xs[1])),
        "vicreg_variance": lambda: vicreg_variance(f(xs[0])),
        "vicreg_covariance": lambda: vicreg_covariance(f(xs[1])),
        "barlow": lambda: barlow_twins_loss(f(xs[0]), f(xs[1])),
        "wmse": lambda: wmse_loss([f(x) for x in xs], w=8, iterations=2, generator=wmse_generator()),
        "swav": lambda: swav_loss([f(x) for x in xs], n_global=2),
        "swav_queue": lambda: swav_loss([f(x) for x in xs], n_global=2, temperature=0.2, epsilon=0.1,
                                        queue_scores=queue),
        # negative controls: batch statistics of the local half only must NOT reproduce the whole batch
        "control_vicreg_local": lambda: (vicreg_variance(f(xs[0]), gather=False)
                                         + vicreg_covariance(f(xs[0]), gather=False)),
        "control_barlow_local": lambda: _barlow_without_gather(f(xs[0]), f(xs[1])),
    }


def _run(model, f, xs, queue):
    out = {}
    for name, loss_fn in _cases(f, xs, queue).items():
        model.zero_grad(set_to_none=True)
        loss = loss_fn()
        loss.backward()
        out[name] = {"loss": loss.detach(), "grad_w": model.weight.grad.clone(), "grad_b": model.bias.grad.clone()}
    with torch.no_grad():
        out["sinkhorn"] = {"codes": sinkhorn_knopp(model(xs[0]), epsilon=0.05, iterations=3)}
    return out


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    xs, queue, model = _data()
    n, m = BATCH // world, QUEUE // world
    ddp = DDP(model)
    local = _run(model, ddp, [x[rank * n:(rank + 1) * n] for x in xs], [q[rank * m:(rank + 1) * m] for q in queue])
    for r in local.values():
        if "loss" in r:
            losses = [torch.zeros((), dtype=torch.float64) for _ in range(world)]
            dist.all_gather(losses, r["loss"])
            r["loss"] = torch.stack(losses).mean()  # what DDP's gradient average corresponds to
    torch.save(local, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()  # leave together; DDP (its reducer holds the group) goes before the group, see test_distributed
    del ddp
    gc.collect()  # DDP sits in reference cycles: free its reducer before the group (test_distributed)
    selfsup.distributed.shutdown()  # gc first: DDP's reducer must go before the group


def _close(a, b):
    return torch.allclose(a, b, rtol=TOL, atol=TOL)


def test_two_processes_equal_one_for_every_canonical_loss(tmp_path):
    torch.set_num_threads(1)
    xs, queue, model = _data()
    whole = _run(model, model, xs, queue)
    mp.spawn(_worker, args=(WORLD, _free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(WORLD)]
    for name, ref in whole.items():
        if name == "sinkhorn":  # each process gets the rows of the whole-batch codes
            halves = torch.cat([r["sinkhorn"]["codes"] for r in ranks])
            assert _close(halves, ref["codes"]), "sinkhorn"
            continue
        for r in ranks:
            got = r[name]
            matches = [_close(got["loss"], ref["loss"]), _close(got["grad_w"], ref["grad_w"]),
                       _close(got["grad_b"], ref["grad_b"])]
            if name.startswith("control_"):
                gap = max((got["loss"] - ref["loss"]).abs().item(), (got["grad_w"] - ref["grad_w"]).abs().max().item())
                assert not all(matches) and gap > 1e-2, f"{name}: the local-only loss matched the whole batch"
            else:
                assert all(matches), f"{name}: loss/grad_w/grad_b match = {matches}"
