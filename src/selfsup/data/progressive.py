"""Progressive resolution (FFCV, Leclerc et al. 2022; FFCV-SSL, Bordes et al. 2023a; cookbook §3.8.2): the global
crops are made at a lower side early in training and grow to ``views.size`` late, so the early steps cost less.

``views.min_size=S`` turns it on. The side of step ``t`` of ``T`` is

    side(t) = S                                       while t/T <= a
              S + (size - S) (t/T - a) / (b - a)      for a < t/T < b   (rounded to a multiple of m)
              size                                    from t/T >= b

with ``(a, b) = views.size_ramp``; ffcv-imagenet's ResNet-50 recipes (rn50_88_epochs.yaml: 160 -> 192 px, ramp from
epoch 65 to 76 of 88) give the default ramp (0.74, 0.86): low resolution for most of the run, full resolution for
its last seventh. ``m`` is the ViT's patch size (a side must hold whole patches; the position embedding is
interpolated to the smaller grid) and 4 px otherwise (few distinct shapes: each new shape costs ``torch.compile`` a
recompilation and cuDNN a new benchmark). Only the global crops change; multi-crop's local crops keep their side.

The side is a function of the step alone, so a resumed run makes the same crops as an uninterrupted one, and every
process the same side at the same step. Evaluation (kNN monitor, probes) always sees full-size images.
"""

from __future__ import annotations

import dataclasses

from selfsup.data.views import MultiView

RAMP = (0.74, 0.86)  # ffcv-imagenet rn50_88_epochs.yaml: start_ramp 65, end_ramp 76 of 88 epochs
MULTIPLE = 4


def side_at(fraction: float, min_size: int, size: int, ramp: tuple[float, float] = RAMP,
            multiple: int = MULTIPLE) -> int:
    """The global crops' side at ``fraction`` (step / total steps) of training: ``min_size`` before the ramp,
    ``size`` after it, linear in between, rounded to a multiple of ``multiple`` and kept in [min_size, size]."""
    start, end = ramp
    if fraction <= start:
        return min_size
    if fraction >= end:
        return size
    side = min_size + (size - min_size) * (fraction - start) / (end - start)
    return min(size, max(min_size, multiple * round(side / multiple)))


def check_schedule(min_size: int, size: int, ramp: tuple[float, float], multiple: int) -> None:
    """ValueError, with the fix, for a schedule that cannot run."""
    if not 0 < min_size <= size:
        raise ValueError(f"views.min_size={min_size} must be in (0, views.size={size}] (0 turns progressive "
                         f"resolution off)")
    if len(ramp) != 2 or not 0.0 <= ramp[0] <= ramp[1] <= 1.0:
        raise ValueError(f"views.size_ramp={list(ramp)} must be two fractions of training 0 <= a <= b <= 1 (the side "
                         f"grows from views.min_size at a to views.size at b)")
    if multiple > 1 and (min_size % multiple or size % multiple):
        raise ValueError(f"views.min_size={min_size} and views.size={size} must be multiples of the patch size "
                         f"{multiple}: a crop must hold whole patches")


def mean_step_cost(min_size: int, size: int, ramp: tuple[float, float], multiple: int, step_full: float,
                   step_min: float, points: int = 1000) -> float:
    """The mean step time over a run, from the step time timed at the full side and at ``min_size``, assuming a
    step's cost is affine in the crop's pixel count (convolutions and tokens are)."""
    span = size * size - min_size * min_size
    if span == 0:
        return step_full
    total = 0.0
    for i in range(points):
        side = side_at((i + 0.5) / points, min_size, size, ramp, multiple)
        total += step_min + (step_full - step_min) * (side * side - min_size * min_size) / span
    return total / points


class ProgressiveViews:
    """The view maker of each step: ``view_maker`` with its global crops at :func:`side_at`'s side (one copy per
    side, made once)."""

    def __init__(self, view_maker, min_size: int, ramp: tuple[float, float] = RAMP, multiple: int = MULTIPLE):
        if type(view_maker) is not MultiView:
            raise ValueError(f"progressive resolution (views.min_size) resizes plain crops; this method's view maker "
                             f"({type(view_maker).__name__}) draws masks or pretext labels tied to the crop size: "
                             f"set views.min_size=0")
        sides = {c.size for c in view_maker.global_cfgs}
        if len(sides) != 1:
            raise ValueError(f"progressive resolution needs global crops of one side, this method makes {sorted(sides)}: "
                             f"set views.min_size=0")
        self.full, self.size = view_maker, sides.pop()
        check_schedule(min_size, self.size, ramp, multiple)
        self.min_size, self.ramp, self.multiple = min_size, tuple(ramp), multiple
        self._made: dict[int, MultiView] = {self.size: view_maker}

    def side(self, fraction: float) -> int:
        return side_at(fraction, self.min_size, self.size, self.ramp, self.multiple)

    def at(self, fraction: float) -> MultiView:
        """The view maker for the step at ``fraction`` of training."""
        side = self.side(fraction)
        if side not in self._made:
            full = self.full
            self._made[side] = MultiView([dataclasses.replace(c, size=side) for c in full.global_cfgs],
                                         full.local_cfg, full.n_local)
        return self._made[side]

    def describe(self) -> str:
        a, b = self.ramp
        return (f"progressive resolution: global crops {self.min_size} px until {a:.0%} of training, growing to "
                f"{self.size} px by {b:.0%}")
