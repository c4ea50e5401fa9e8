"""NPID's non-parametric softmax over a memory bank (cookbook eq. (5); Wu, Xiong, Yu & Lin 2018)."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from selfsup.losses.metric_learning._common import check_embeddings, check_positive, upcast


def _check_index(index: torch.Tensor, n: int, n_data: int, fn: str) -> None:
    if index.shape != (n,) or index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise ValueError(f"{fn}: index must be an integer tensor of shape ({n},), one dataset index per sample, got "
                         f"{index.dtype} {tuple(index.shape)}")
    if n and (int(index.min()) < 0 or int(index.max()) >= n_data):
        raise ValueError(f"{fn}: index values must lie in [0, {n_data}) (the bank's rows), got "
                         f"[{int(index.min())}, {int(index.max())}]")


def npid_loss(z: torch.Tensor, index: torch.Tensor, bank: torch.Tensor, temperature: float = 0.07,
              proximal: float = 0.0) -> torch.Tensor:
    """Instance discrimination with a non-parametric softmax (cookbook eq. (5); Wu et al. 2018).

    Sample i (dataset index index[i]) is classified as itself among all N_data memory rows v:

        L = -1/B sum_i log( e^{cos(z_i, v_{index_i})/tau} / sum_{k=1}^{N_data} e^{cos(z_i, v_k)/tau} )
            + proximal * 1/B sum_i ||z_i - v_{index_i}||^2          (eq. (5)'s beta ||Z - Z^{(t-1)}||_F^2)

    with z_i L2-normalized here and `bank` (N_data, D) holding L2-normalized rows v = Z^{(t-1)} (no gradient flows to
    it). NPID itself does not compute this denominator in training: it approximates it with NCE and 4096 sampled
    negatives (Wu et al. 2018, NCE section; lemniscate.pytorch --nce-k 4096); we compute the exact softmax over the
    whole bank, which is what eq. (5) states and is affordable for the data sets this library trains on.
    `temperature=0.07`: Wu et al. 2018 and the reference code (lemniscate.pytorch, --nce-t 0.07).
    `proximal=0.0`: NPID's proximal regularization is off by default (we could not confirm its coefficient); the
    bank's momentum update (`npid_bank_update`) is what keeps the targets slow.

    Distributed: a per-sample loss against a bank that every process holds identically (update it from gathered
    z and index, see `npid_bank_update`); no gather is needed and the mean over processes is the one-process loss.
    """
    fn = "npid_loss"
    check_embeddings(z, fn)
    check_positive(temperature, "temperature", fn)
    if bank.ndim != 2 or bank.shape[1] != z.shape[1]:
        raise ValueError(f"{fn}: bank must be (N_data, {z.shape[1]}) to match z's dimension, got {tuple(bank.shape)}")
    _check_index(index, z.shape[0], bank.shape[0], fn)
    z = F.normalize(upcast(z), dim=1)
    bank = bank.detach().to(z.dtype)
    index = index.to(z.device).long()
    loss = F.cross_entropy(z @ bank.T / temperature, index)
    if proximal:
        loss = loss + proximal * (z - bank[index]).pow(2).sum(1).mean()
    return loss


@torch.no_grad()
def npid_bank_update(bank_rows: torch.Tensor, z: torch.Tensor, momentum: float = 0.5) -> torch.Tensor:
    """New memory rows: v <- normalize(momentum * v + (1 - momentum) * normalize(z)) (Wu et al. 2018's memory bank).

    `momentum=0.5`: the NPID reference code (lemniscate.pytorch, --nce-m 0.5). Pure: returns the rows, the caller
    writes them (`bank[index] = npid_bank_update(bank[index], z, 0.5)`; with repeated indices the last write wins).
    Under DDP call it with gathered z and index so that every process's bank stays identical.
    """
    fn = "npid_bank_update"
    check_embeddings(z, fn)
    if bank_rows.shape != z.shape:
        raise ValueError(f"{fn}: bank_rows and z must have the same shape, got {tuple(bank_rows.shape)} and "
                         f"{tuple(z.shape)}")
    if not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{fn}: momentum must lie in [0, 1], got {momentum}")
    mixed = momentum * bank_rows + (1.0 - momentum) * F.normalize(z.detach().to(bank_rows.dtype), dim=1)
    return F.normalize(mixed, dim=1)
