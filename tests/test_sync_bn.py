"""GlobalBatchNorm: 2 gloo processes, each with half the batch, normalize, back-propagate and update running statistics
exactly as 1 process with nn.BatchNorm on the whole batch; per-process BN (the old CPU behaviour) does not."""

from __future__ import annotations

import gc
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from test_distributed import _free_port
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

import selfsup.distributed
from selfsup.nn.sync_bn import GlobalBatchNorm, convert_global_batchnorm

TOL = 1e-10  # float64 throughout; the two paths differ only in summation order


def _net() -> nn.Module:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                        nn.Linear(4 * 5 * 5, 6), nn.BatchNorm1d(6), nn.Linear(6, 2)).double()
    with torch.no_grad():  # non-trivial affine parameters, so their gradients and the normalization both matter
        for m in net.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.weight.uniform_(0.5, 1.5)
                m.bias.uniform_(-0.5, 0.5)
    return net


def _batch(n: int = 12):
    g = torch.Generator().manual_seed(1)
    return torch.randn(n, 3, 5, 5, generator=g, dtype=torch.float64) * 3 + 2, torch.randn(n, 2, generator=g,
                                                                                         dtype=torch.float64)


def _step(net, x, target, weights=None):
    """Forward, a loss that is a mean over the rows (as the methods' are; or weighted by ``weights``), backward."""
    out = net(x)
    per_row = ((out - target) ** 2).sum(1)
    loss = per_row.mean() if weights is None else (per_row * weights).sum()
    loss.backward()
    return out.detach(), x.grad.detach()


CASES = {"sync": (True, (6, 6)), "uneven": (True, (4, 8)), "per_process": (False, (6, 6))}


def _worker(rank, world, port, out_dir):
    """Every case in one process group (a spawn costs seconds): the synchronized BN on even and uneven halves, and
    per-process BN (the old CPU behaviour) on even halves."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    for name, (sync, sizes) in CASES.items():
        net = _net()
        if sync:
            net = convert_global_batchnorm(net)
        model = DDP(net)
        x, t = _batch(sum(sizes))
        lo = sum(sizes[:rank])
        xs = x[lo:lo + sizes[rank]].clone().requires_grad_(True)
        out, gx = _step(model, xs, t[lo:lo + sizes[rank]])
        state = {k: v.clone() for k, v in net.state_dict().items()}
        grads = {k: p.grad.clone() for k, p in net.named_parameters()}
        torch.save({"out": out, "gx": gx, "state": state, "grads": grads},
                   os.path.join(out_dir, f"{name}{rank}.pt"))
        del model
    dist.barrier()
    gc.collect()  # DDP sits in reference cycles: free its reducer before the group (test_distributed)
    selfsup.distributed.shutdown()  # gc first: DDP's reducer must go before the group


@pytest.fixture(scope="module")
def two_process_results(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync_bn")
    mp.spawn(_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return {name: [torch.load(out / f"{name}{r}.pt", weights_only=True) for r in range(2)] for name in CASES}


def _reference(sizes):
    """1 process, nn.BatchNorm, the whole batch, and the objective the 2 processes optimize together: DDP averages
    the gradients of their losses (each a mean over its own rows), i.e. rows of process p weigh 1 / (2 n_p)."""
    net = _net()
    x, t = _batch(sum(sizes))
    x = x.clone().requires_grad_(True)
    weights = torch.cat([torch.full((s,), 1 / (len(sizes) * s), dtype=torch.float64) for s in sizes])
    out, gx = _step(net, x, t, weights)
    return out, gx, net.state_dict(), {k: p.grad for k, p in net.named_parameters()}


@pytest.mark.parametrize("case", ["sync", "uneven"])
def test_two_processes_equal_one_process_on_the_whole_batch(two_process_results, case):
    """Outputs, input gradients, parameter gradients (after DDP's averaging) and running statistics; (4, 8): uneven
    halves, where only a count carried through the all-reduce gives the right mean."""
    out, gx, state, grads = _reference(CASES[case][1])
    r = two_process_results[case]
    torch.testing.assert_close(torch.cat([r[0]["out"], r[1]["out"]]), out, atol=TOL, rtol=0)
    # an input's gradient is that of the SUM of both processes' losses (DDP averages parameter gradients only)
    torch.testing.assert_close(torch.cat([r[0]["gx"], r[1]["gx"]]) / 2, gx, atol=TOL, rtol=0)
    for k, v in state.items():
        for rank in range(2):
            torch.testing.assert_close(r[rank]["state"][k], v, atol=TOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")
    for k, g in grads.items():
        torch.testing.assert_close(r[0]["grads"][k], g, atol=TOL, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


def test_per_process_batch_norm_differs(two_process_results):
    """Without the synchronization the same test fails: the check above can tell the two apart."""
    out, _, state, _ = _reference((6, 6))
    r = two_process_results["per_process"]
    assert not torch.allclose(torch.cat([r[0]["out"], r[1]["out"]]), out, atol=1e-3)
    assert not torch.allclose(r[0]["state"]["1.running_mean"], state["1.running_mean"], atol=1e-3)


def test_conversion_keeps_parameters_buffers_and_state_dict_keys():
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    params = list(net.parameters())
    conv = convert_global_batchnorm(net)
    assert isinstance(conv[1], GlobalBatchNorm) and isinstance(conv[5], GlobalBatchNorm)
    assert list(conv.parameters()) == params  # the same Parameter objects: an optimizer built before still holds them
    assert conv.state_dict().keys() == before.keys()
    x, _ = _batch()
    conv.eval()
    ref = _net().eval()
    torch.testing.assert_close(conv(x), ref(x), atol=0, rtol=0)  # eval and one process: nn.BatchNorm's computation
