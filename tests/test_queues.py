"""Queues and memory banks: FIFO order, one write per commit (gradient accumulation), resume, and equality of a
2-process run with a 1-process run on the whole batch."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from test_distributed import _free_port

import selfsup.distributed
from selfsup.nn.queues import FeatureQueue, MemoryBank


def test_queue_is_fifo_and_wraps_around():
    q = FeatureQueue(5, 2, init="empty")
    assert q.filled().shape == (0, 2) and not q.full
    q.stage(torch.tensor([[1.0, 1], [2, 2], [3, 3]]))
    assert q.commit() == 3 and q.filled()[:, 0].tolist() == [1, 2, 3] and int(q.ptr) == 3
    q.stage(torch.tensor([[4.0, 4], [5, 5], [6, 6]]))
    q.commit()
    assert q.full and q.features[:, 0].tolist() == [6, 2, 3, 4, 5] and int(q.ptr) == 1  # 6 replaced the oldest, 1
    q.stage(torch.arange(14.0).view(7, 2))  # more rows than the queue: the newest 5 stay
    q.commit()
    assert sorted(q.features[:, 0].tolist()) == [4, 6, 8, 10, 12]
    assert q.commit() == 0  # nothing staged: nothing written


def test_queue_writes_once_per_commit_whatever_the_micro_batches():
    one, acc = FeatureQueue(8, 3, init="empty"), FeatureQueue(8, 3, init="empty")
    rows = torch.randn(6, 3)
    one.stage(rows)
    for part in rows.split(2):  # 3 micro-batches of one optimizer step
        acc.stage(part)
    assert int(acc.count) == 0  # staging writes nothing
    one.commit(), acc.commit()
    assert torch.equal(one.features, acc.features) and int(acc.ptr) == 6


def test_random_queue_starts_full_of_unit_vectors_and_resumes_exactly():
    q = FeatureQueue(16, 4, init="random", seed=3)
    assert q.full and torch.allclose(q.features.norm(dim=1), torch.ones(16), atol=1e-6)
    q.stage(torch.randn(5, 4))
    q.commit()
    restored = FeatureQueue(16, 4, init="random", seed=99)
    restored.load_state_dict(q.state_dict())
    assert torch.equal(restored.features, q.features) and int(restored.ptr) == 5 and int(restored.count) == 16


def test_queue_rejects_bad_rows_and_sizes():
    with pytest.raises(ValueError, match="size >= 1"):
        FeatureQueue(0, 4)
    with pytest.raises(ValueError, match=r"\(n, 4\)"):
        FeatureQueue(8, 4).stage(torch.randn(2, 3))


def test_memory_bank_update_follows_its_formula():
    bank = MemoryBank(10, 3, momentum=0.5, seed=0)
    before = bank.bank.clone()
    idx, x = torch.tensor([2, 7]), torch.randn(2, 3, dtype=torch.float32)
    bank.stage(idx, x)
    assert bank.commit() == 2
    want = F.normalize(0.5 * before[idx] + 0.5 * F.normalize(x, dim=1), dim=1)
    assert torch.allclose(bank.bank[idx], want, atol=1e-6)
    untouched = [i for i in range(10) if i not in (2, 7)]
    assert torch.equal(bank.bank[untouched], before[untouched])
    with pytest.raises(ValueError, match="out of range"):
        bank.stage(torch.tensor([10]), torch.randn(1, 3))
    with pytest.raises(ValueError, match="Views.index"):
        bank.stage(None, torch.randn(1, 3))



def test_memory_bank_first_visit_write_stores_the_embedding_then_mixes():
    bank = MemoryBank(6, 3, momentum=0.5, seed=0, first_visit="write")
    start = bank.bank.clone()
    g = torch.Generator().manual_seed(3)
    x1, x2 = torch.randn(2, 3, generator=g), torch.randn(2, 3, generator=g)
    bank.stage(torch.tensor([1, 4]), x1)
    bank.commit()
    # first visit: the random start is gone, the row is the normalized embedding
    assert torch.allclose(bank.bank[[1, 4]], F.normalize(x1, dim=1), atol=1e-6)
    assert torch.equal(bank.bank[[0, 2, 3, 5]], start[[0, 2, 3, 5]])
    assert bank.written.tolist() == [False, True, False, False, True, False]
    # second visit of row 1 mixes with momentum 0.5, first visit of row 2 writes
    bank.stage(torch.tensor([1, 2]), x2)
    bank.commit()
    want1 = F.normalize(0.5 * F.normalize(x1[0], dim=0) + 0.5 * F.normalize(x2[0], dim=0), dim=0)
    assert torch.allclose(bank.bank[1], want1, atol=1e-6)
    assert torch.allclose(bank.bank[2], F.normalize(x2[1], dim=0), atol=1e-6)
    # "mix" (the reference's rule) keeps a share of the random start on the first visit
    mix = MemoryBank(6, 3, momentum=0.5, seed=0)
    mix.stage(torch.tensor([1, 4]), x1)
    mix.commit()
    assert not torch.allclose(mix.bank[[1, 4]], F.normalize(x1, dim=1), atol=1e-3)
    # which rows hold data is state: a restored bank mixes where the original would
    restored = MemoryBank(6, 3, momentum=0.5, seed=9, first_visit="write")
    restored.load_state_dict(bank.state_dict())
    for b in (bank, restored):
        b.stage(torch.tensor([2, 3]), x1)
        b.commit()
    assert torch.equal(restored.bank, bank.bank) and torch.equal(restored.written, bank.written)
    assert "written" not in MemoryBank(6, 3).state_dict()  # "mix" banks keep their checkpoint keys
    with pytest.raises(ValueError, match="first_visit"):
        MemoryBank(6, 3, first_visit="zero")


def _steps():
    """3 optimizer steps of 8 rows each (2 micro-batches of 4 per step on one process)."""
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(8, 4, generator=g), torch.randperm(20, generator=g)[:8]) for _ in range(3)]


def _run(world: int, rank: int):
    q, bank = FeatureQueue(12, 4, init="random", seed=1), MemoryBank(20, 4, seed=2)
    for rows, idx in _steps():
        n = rows.shape[0] // world
        mine, mine_idx = rows[rank * n:(rank + 1) * n], idx[rank * n:(rank + 1) * n]
        for part, part_idx in zip(mine.split(2), mine_idx.split(2)):  # accumulation on each process
            q.stage(part)
            bank.stage(part_idx, part)
        q.commit(), bank.commit()
    return {"queue": q.features, "ptr": q.ptr, "bank": bank.bank}


def _worker(rank, world, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.save(_run(world, rank), os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    selfsup.distributed.shutdown()  # gc first: DDP's reducer must go before the group


def test_two_processes_fill_queue_and_bank_as_one_process_does(tmp_path):
    one = _run(1, 0)
    mp.spawn(_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    for rank in range(2):
        got = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        for key in one:  # the same rows written in the same order: bit-identical copies, no arithmetic differs
            assert torch.equal(got[key], one[key]), (rank, key)
