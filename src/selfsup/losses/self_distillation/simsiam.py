"""SimSiam (Chen and He 2021; cookbook §2.3, eq. (11)): BYOL's regression with the teacher replaced by a stop-gradient
of the online network itself."""

from __future__ import annotations

import torch

from selfsup.losses.self_distillation.byol import renorm


def simsiam_loss(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """Cookbook eq. (11): E || renorm(p) - sg(renorm(z)) ||_2^2, mean over the batch.

    `p` is the predictor's output for one view, `z` the same network's projection of the other view; `z` is detached
    here (the stop-gradient is the method). Since renorm gives unit vectors, ||renorm(p) - renorm(z)||^2
    = 2 - 2 cos(p, z) = 2 + 2 D(p, z), with D = -cos the negative cosine of Chen and He (2021, eq. 1). Their
    symmetrized loss D(p1, z2)/2 + D(p2, z1)/2 is therefore (simsiam_loss(p1, z2) + simsiam_loss(p2, z1)) / 4 - 1:
    the method uses that quarter-sum so its gradient, hence the paper's learning rate, is the paper's.
    """
    return (renorm(p.float()) - renorm(z.detach().float())).pow(2).sum(dim=-1).mean()
