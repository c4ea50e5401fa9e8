"""srun-launched jobs: the rank, world size and local rank from SLURM_*, and the rendezvous (MASTER_ADDR/PORT, which
srun does not set) derived from the node list and the job id; two processes launched that way join one group."""

from __future__ import annotations

import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import selfsup.distributed
from selfsup.distributed import first_host, init_distributed, slurm_rendezvous


@pytest.mark.parametrize("nodelist, host", [("node01", "node01"), ("node[01-04]", "node01"),
                                            ("gpu[3,5-7],cpu1", "gpu3"), ("gpu[09-12],login[1-2]", "gpu09"),
                                            ("rack[1-2]-n[08-09]", "rack1-n08"), ("a,b", "a")])
def test_first_host(nodelist, host):
    assert first_host(nodelist) == host


def test_rendezvous_from_the_node_list_and_the_job_id():
    env = {"SLURM_JOB_NODELIST": "gpu[03-06]", "SLURM_JOB_ID": "123456", "SLURM_NTASKS": "8", "SLURM_PROCID": "5"}
    assert slurm_rendezvous(env) == {"MASTER_ADDR": "gpu03", "MASTER_PORT": str(15000 + 123456 % 20000)}
    assert slurm_rendezvous({**env, "MASTER_ADDR": "h", "MASTER_PORT": "1"}) == {}  # the user's own win
    assert slurm_rendezvous({**env, "WORLD_SIZE": "8", "RANK": "5"}) == {}  # torchrun inside an allocation decides
    assert slurm_rendezvous({"WORLD_SIZE": "2"}) == {}  # not SLURM


def _free_port_a_job_id_maps_to() -> int:
    """A free port in 15000-34999 (the job id's range): below Linux's ephemeral range, so one is found at once."""
    for port in torch.randperm(20000, generator=torch.Generator().manual_seed(os.getpid())).add(15000).tolist():
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 15000-34999")


def _srun_worker(procid, ntasks, job_id, out):
    for key in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE", "RANK", "LOCAL_RANK"):
        os.environ.pop(key, None)
    os.environ.update(SLURM_PROCID=str(procid), SLURM_NTASKS=str(ntasks), SLURM_LOCALID=str(procid),
                      SLURM_JOB_NODELIST="localhost", SLURM_JOB_ID=str(job_id))
    info = init_distributed("cpu")
    x = torch.tensor([float(info.rank + 1)])
    dist.all_reduce(x)
    torch.save({"rank": info.rank, "world": info.world_size, "local": info.local_rank, "sum": float(x),
                "addr": os.environ["MASTER_ADDR"]}, os.path.join(out, f"{procid}.pt"))
    dist.barrier()
    selfsup.distributed.shutdown()  # gc first: DDP's reducer must go before the group


def test_two_srun_processes_join_one_group(tmp_path):
    port = _free_port_a_job_id_maps_to()
    mp.spawn(_srun_worker, args=(2, port - 15000, str(tmp_path)), nprocs=2, join=True)
    got = [torch.load(tmp_path / f"{r}.pt") for r in range(2)]
    assert [(g["rank"], g["world"], g["local"]) for g in got] == [(0, 2, 0), (1, 2, 1)]
    assert all(g["sum"] == 3.0 and g["addr"] == "localhost" for g in got)
