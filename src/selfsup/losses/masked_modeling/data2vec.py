"""data2vec 2.0 (Baevski et al. 2022; cookbook §2.5): regress, at the masked positions, the average of the EMA
teacher's top-K block outputs on the unmasked input.

Pure functions; the reference is fairseq ``examples/data2vec/models/data2vec2.py`` (``make_targets``, ``d2v_loss``
and the ``cls_loss`` term of ``forward``) with the image config ``config/v2/base_images_only_task.yaml``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def data2vec_targets(layer_outputs: list[torch.Tensor] | tuple[torch.Tensor, ...], k: int, extra_tokens: int = 1,
                     layer_norm: bool = True) -> torch.Tensor:
    """The contextualized targets y (B, N, D) from the teacher's block outputs, each (B, extra_tokens + N, D):

        y_t = LN( (1/K) * sum_{l = L-K+1..L} IN(a^l)_t ),   IN(a)_{t,d} = (a_{t,d} - mu_d) / sqrt(sigma_d^2 + 1e-5)

    over the last ``k`` of the listed layers, where mu_d and sigma_d^2 are the mean and (biased) variance of channel d
    over the N patch tokens of one image (``F.instance_norm`` on (B, D, N): the reference's
    ``instance_norm_target_layer: true``) and LN is a LayerNorm over D without affine parameters
    (``layer_norm_targets: true``; ``layer_norm=False`` leaves it out). The first ``extra_tokens`` tokens ([CLS])
    are dropped before normalizing: the targets are patch tokens only (``lr[:, extra_tokens:]`` in the reference).
    Computed in float32, without gradient.
    """
    if not 1 <= k <= len(layer_outputs):
        raise ValueError(f"average_top_k_layers={k} needs 1..{len(layer_outputs)} layers, got {len(layer_outputs)}")
    with torch.no_grad():
        normed = [F.instance_norm(a[:, extra_tokens:].float().transpose(1, 2)).transpose(1, 2)
                  for a in layer_outputs[-k:]]
        y = torch.stack(normed).mean(dim=0)
        return F.layer_norm(y, y.shape[-1:]) if layer_norm else y


def data2vec_regression(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor,
                        scale: float | None = None) -> torch.Tensor:
    """The regression term, squared error on the MASKED tokens only (``loss_beta: 0`` = L2):

        L_reg = (1 / M) * sum_{b, t: m_bt = 1} s * ||f_bt - y_bt||^2,   s = 1 / sqrt(D) unless ``scale`` is given

    ``pred``, ``target``: (B, N, D); ``mask``: (B, N) bool, True = masked; M = the number of masked tokens. The
    reference sums ``F.mse_loss(reduction="none") * loss_scale`` (``loss_scale: None`` -> 1/sqrt(D)) and fairseq
    divides by the sample size, which is M. Visible tokens never enter the loss.
    """
    s = 1.0 / math.sqrt(pred.shape[-1]) if scale is None else scale
    per_token = (pred.float() - target.float()).pow(2).sum(dim=-1) * s
    m = mask.float()
    return (per_token * m).sum() / m.sum().clamp_min(1.0)


def data2vec_cls_term(cls_pred: torch.Tensor, target: torch.Tensor, weight: float,
                      scale: float | None = None) -> torch.Tensor:
    """The [CLS] term (``cls_loss: 0.01`` in the image config): the student's final [CLS] output regresses the mean of
    the image's patch targets,

        L_cls = w * sum_b s * ||c_b - (1/N) sum_t y_bt||^2,   s = 1 / sqrt(D)

    ``cls_pred`` (B, D), ``target`` (B, N, D). A SUM over the images (clones) of the batch, as in the reference: its
    term is ``d2v_loss(...) * cls_loss * sample_size`` and fairseq then divides everything by the sample size.
    """
    s = 1.0 / math.sqrt(cls_pred.shape[-1]) if scale is None else scale
    return weight * s * (cls_pred.float() - target.float().mean(dim=1)).pow(2).sum()


def data2vec_loss(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor, cls_pred: torch.Tensor | None = None,
                  cls_weight: float = 0.0, scale: float | None = None) -> torch.Tensor:
    """data2vec 2.0's objective L = L_reg + L_cls (see :func:`data2vec_regression` and :func:`data2vec_cls_term`);
    the [CLS] term only when ``cls_pred`` is given and ``cls_weight`` > 0."""
    loss = data2vec_regression(pred, target, mask, scale)
    if cls_pred is not None and cls_weight > 0:
        loss = loss + data2vec_cls_term(cls_pred, target, cls_weight, scale)
    return loss
