"""Visual evaluation: a small conditional diffusion decoder on frozen representations (cookbook §3.7.4).

RCDM (Bordes, Balestriero & Vincent, 2022b, "High fidelity visualization of what your self-supervised
representation knows about") trains a diffusion model that generates images *conditioned on* a frozen SSL
representation. Samples drawn for one representation share what it encodes and differ in what it does not: a
representation that keeps every pixel gives near-identical samples, one that keeps only the class gives
different garments of the same class. Comparing the backbone with the projector output shows the projector's
extra invariance (cookbook Fig. 14).

This is a CPU-sized version of that idea, in pure PyTorch:

- noise schedule: the cosine schedule of Nichol & Dhariwal (2021, "Improved DDPM", eq. 17, ``s = 0.008``,
  betas clipped at 0.999), ``T = 1000`` steps as in Ho et al. (2020);
- objective: epsilon prediction with the plain MSE ("L_simple", Ho et al., 2020, eq. 14);
- network: a 2-resolution UNet (conv / GroupNorm / SiLU residual blocks, sinusoidal time embedding) whose
  residual blocks use adaptive GroupNorm ``GN(h) * (1 + scale) + shift`` (ADM's "scale-shift norm", Dhariwal &
  Nichol, 2021) with ``(scale, shift)`` computed from the sum of the time embedding and an MLP of the
  standardized representation -- conditioning through the normalization layers, as RCDM does;
- weights: an exponential moving average of the trained weights is what the decoder keeps (Ho et al., 2020);
- sampling: ancestral DDPM sampling (Ho et al., 2020, Alg. 2) on an evenly spaced sub-sequence of the 1000
  steps (Nichol & Dhariwal, 2021, §4 "re-spacing"), written as DDIM's update (Song et al., 2021, eq. 12) with
  ``eta = 1``, the predicted x_0 clipped to the pixel range (Ho et al., 2020; ADM). Why ancestral and not
  deterministic DDIM (``eta = 0``, also available): with a decoder trained for minutes on a CPU, DDIM's ODE
  carries the network's errors through to the image -- measured here on Fashion-MNIST, 1500 training steps,
  50 sampling steps: DDIM gave speckled, noisy images for roughly a quarter of the samples, ancestral clean
  garments -- whereas the fresh noise of each ancestral step corrects them (cf. Karras et al., 2022, §4 on the
  error-correcting role of stochasticity). Each sample also starts from its own noise ``x_T``.

Conditioning vectors are standardized per dimension with the training set's mean and std, stored in the model.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from selfsup.runtime import autocast, autocast_dtype

T_STEPS = 1000  # Ho et al. (2020) and Nichol & Dhariwal (2021)
COSINE_S = 0.008  # Nichol & Dhariwal (2021), eq. 17
MAX_BETA = 0.999  # Nichol & Dhariwal (2021): clip beta_t to avoid a singularity at t = T


# ------------------------------------------------------------------------------------------------ schedule
def cosine_alpha_bar(timesteps: int = T_STEPS, s: float = COSINE_S, max_beta: float = MAX_BETA) -> Tensor:
    """``alpha_bar_t`` for t = 1..T (float64, index t-1): ``f(t) / f(0)`` with ``f(t) = cos^2((t/T + s)/(1 + s)
    * pi/2)`` (Nichol & Dhariwal, 2021, eq. 17), through ``beta_t = 1 - alpha_bar_t / alpha_bar_{t-1}`` clipped at
    ``max_beta`` so alpha_bar_T stays positive. Strictly decreasing in (0, 1)."""
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}.")
    t = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
    f = torch.cos((t + s) / (1 + s) * math.pi / 2) ** 2
    abar = f / f[0]
    betas = (1 - abar[1:] / abar[:-1]).clamp(max=max_beta)
    return torch.cumprod(1 - betas, dim=0)


def q_sample(x0: Tensor, t: Tensor, alpha_bar: Tensor, noise: Tensor) -> Tensor:
    """Forward noising ``x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps`` (Ho et al., 2020, eq. 4):
    a draw of ``q(x_t | x_0) = N(sqrt(alpha_bar_t) x_0, (1 - alpha_bar_t) I)``. ``t`` holds 0-based indices."""
    ab = alpha_bar[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return ab.sqrt() * x0 + (1 - ab).sqrt() * noise


# ------------------------------------------------------------------------------------------------ network
def _groups(channels: int) -> int:
    return math.gcd(8, channels)  # 8 groups where possible; small widths in tests still divide


def timestep_embedding(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps (Vaswani et al., 2017; Ho et al., 2020)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=1)
    return F.pad(emb, (0, dim % 2))


class ResBlock(nn.Module):
    """GN -> SiLU -> conv -> adaptive GN (scale, shift from the embedding) -> SiLU -> conv, plus a skip (ADM)."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(_groups(in_ch), in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.film = nn.Linear(emb_dim, 2 * out_ch)
        self.norm2 = nn.GroupNorm(_groups(out_ch), out_ch, affine=False)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        nn.init.zeros_(self.conv2.weight)  # each block starts as the identity (ADM's zero_module)
        nn.init.zeros_(self.conv2.bias)
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        scale, shift = self.film(F.silu(emb))[:, :, None, None].chunk(2, dim=1)
        h = self.norm2(h) * (1 + scale) + shift
        return self.skip(x) + self.conv2(F.silu(h))


class ConditionalDecoder(nn.Module):
    """epsilon(x_t, t, r): a 2-resolution UNet conditioned on a representation ``r`` by adaptive GroupNorm.

    Holds everything needed to sample: the conditioning mean/std (``cond_mean``, ``cond_std`` buffers), the
    image shape, and the noise schedule (``alpha_bar``). ``config`` rebuilds an empty twin for
    ``load_state_dict``: ``ConditionalDecoder(**model.config)``.
    """

    def __init__(self, cond_dim: int, channels: int, height: int, width: int, *,
                 widths: tuple[int, int] = (32, 64), timesteps: int = T_STEPS):
        super().__init__()
        if height % 2 or width % 2:
            raise ValueError(f"image height and width must be even for the UNet's one down-sampling, got "
                             f"{height}x{width}; crop or pad the images by one pixel first.")
        if len(widths) != 2 or min(widths) < 1:
            raise ValueError(f"widths must be two positive channel counts (full, half resolution), got {widths}.")
        self.config = dict(cond_dim=cond_dim, channels=channels, height=height, width=width,
                           widths=tuple(widths), timesteps=timesteps)
        self.image_shape = (channels, height, width)
        c1, c2 = widths
        emb = 2 * c2  # ADM: embedding width 4 x base channels, = 2 x the half-resolution width when c2 = 2 c1
        self.register_buffer("alpha_bar", cosine_alpha_bar(timesteps))
        self.register_buffer("cond_mean", torch.zeros(cond_dim))
        self.register_buffer("cond_std", torch.ones(cond_dim))
        self.time_mlp = nn.Sequential(nn.Linear(c1, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.cond_mlp = nn.Sequential(nn.Linear(cond_dim, emb), nn.SiLU(), nn.Linear(emb, emb))
        self.conv_in = nn.Conv2d(channels, c1, 3, padding=1)
        self.down1 = ResBlock(c1, c1, emb)
        self.downsample = nn.Conv2d(c1, c1, 3, stride=2, padding=1)
        self.down2 = ResBlock(c1, c2, emb)
        self.mid = ResBlock(c2, c2, emb)
        self.up2 = ResBlock(2 * c2, c2, emb)
        self.upsample = nn.Conv2d(c2, c2, 3, padding=1)
        self.up1 = ResBlock(c2 + c1, c1, emb)
        self.norm_out = nn.GroupNorm(_groups(c1), c1)
        self.conv_out = nn.Conv2d(c1, channels, 3, padding=1)
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    @property
    def timesteps(self) -> int:
        return self.alpha_bar.shape[0]

    def set_cond_stats(self, cond: Tensor, eps: float = 1e-6) -> None:
        """Store the per-dimension mean and std of the training conditioning vectors (constant dims -> std 1)."""
        std = cond.std(dim=0) if cond.shape[0] > 1 else torch.ones(cond.shape[1], dtype=cond.dtype)
        self.cond_mean.copy_(cond.mean(dim=0))
        self.cond_std.copy_(torch.where(std > eps, std, torch.ones_like(std)))

    def forward(self, x: Tensor, t: Tensor, cond: Tensor) -> Tensor:
        """Predicted noise for ``x_t`` in [-1, 1] scale, 0-based timesteps ``t`` and raw conditioning ``cond``."""
        r = (cond - self.cond_mean) / self.cond_std
        emb = self.time_mlp(timestep_embedding(t, self.conv_in.out_channels)) + self.cond_mlp(r)
        h1 = self.down1(self.conv_in(x), emb)
        h2 = self.down2(self.downsample(h1), emb)
        h = self.mid(h2, emb)
        h = self.up2(torch.cat([h, h2], dim=1), emb)
        h = self.upsample(F.interpolate(h, scale_factor=2.0, mode="nearest"))
        h = self.up1(torch.cat([h, h1], dim=1), emb)
        return self.conv_out(F.silu(self.norm_out(h)))


# ------------------------------------------------------------------------------------------------ checks
def _check_cond(cond: Tensor, name: str = "cond") -> None:
    if not isinstance(cond, Tensor) or cond.ndim != 2:
        shape = tuple(cond.shape) if hasattr(cond, "shape") else type(cond).__name__
        raise ValueError(f"{name} must be a 2-D tensor (N, D) of representations, got {shape}; "
                         f"for a single vector use cond[None].")
    if not cond.is_floating_point():
        raise ValueError(f"{name} must be floating point (features), got dtype {cond.dtype}; "
                         f"one-hot or integer codes must be converted with .float().")
    if not bool(torch.isfinite(cond).all()):
        raise ValueError(f"{name} contains NaN or inf; check the encoder that produced the features.")


def _check_images(images: Tensor) -> None:
    if not isinstance(images, Tensor) or images.ndim != 4:
        shape = tuple(images.shape) if hasattr(images, "shape") else type(images).__name__
        raise ValueError(f"images must be a uint8 tensor (N, C, H, W), got {shape}; add the channel axis of "
                         f"grayscale (N, H, W) data with images[:, None].")
    if images.dtype != torch.uint8:
        raise ValueError(f"images must be uint8 in [0, 255], got dtype {images.dtype}; pass the raw pixels "
                         f"(the decoder scales them to [-1, 1] itself), e.g. (x * 255).round().to(torch.uint8).")


def _to_unit(images: Tensor) -> Tensor:
    return images.float() / 127.5 - 1.0


def _to_uint8(x: Tensor) -> Tensor:
    return ((x.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


# ------------------------------------------------------------------------------------------------ training
@torch.no_grad()
def _ema_update(ema: nn.Module, model: nn.Module, decay: float) -> None:
    for pe, pm in zip(ema.parameters(), model.parameters(), strict=True):
        pe.lerp_(pm, 1 - decay)


def train_decoder(
    cond: Tensor,
    images: Tensor,
    *,
    steps: int = 1500,
    batch_size: int = 64,
    lr: float = 2e-3,
    widths: tuple[int, int] = (32, 64),
    precision: str = "fp32",
    ema_decay: float = 0.999,
    seed: int = 0,
    device: str | torch.device = "cpu",
    log_every: int = 500,
    time_limit_s: float | None = None,
) -> ConditionalDecoder:
    """Train a :class:`ConditionalDecoder` to generate ``images`` (uint8 ``(N, C, H, W)``) from ``cond``
    (float ``(N, D)``, e.g. frozen features of the same images) and return its EMA weights in eval mode.

    Each step draws ``batch_size`` random pairs, a uniform timestep and Gaussian noise, and minimises the
    epsilon-prediction MSE (Ho et al., 2020, Alg. 1). AdamW at ``lr``, linear warm-up over ``min(100, steps / 10)``
    steps then cosine decay; EMA decay ``min(ema_decay, (1 + k) / (10 + k))`` at step k (the warm-up of
    TensorFlow's ExponentialMovingAverage, so a short run is not dominated by its random initialisation). The
    defaults (1500 steps of 64, lr 2e-3, widths 32/64) are this module's CPU-budget choices: recognisable
    Fashion-MNIST garments in a few minutes on 2 cores (benchmarks/decoder_fmnist.py), not values from RCDM.

    ``precision``: "fp32", "bf16" (autocast; ~1.6x faster per step on an AVX-512-BF16 CPU, measured there) or
    "auto" (:func:`selfsup.runtime.autocast_dtype`). ``time_limit_s`` stops training once that many seconds have
    passed (the cosine decay still assumes ``steps``); the returned model's ``trained_steps`` says how many ran.
    ``log_every`` > 0 prints the mean loss every that many steps.
    """
    _check_cond(cond)
    _check_images(images)
    if cond.shape[0] != images.shape[0]:
        raise ValueError(f"cond has {cond.shape[0]} rows but there are {images.shape[0]} images; pass one "
                         f"representation per image, in the same order.")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError(f"steps, batch_size and lr must be positive, got {steps}, {batch_size}, {lr}.")
    device = torch.device(device)
    if precision not in ("fp32", "bf16", "auto"):
        raise ValueError(f"precision must be 'fp32', 'bf16' or 'auto', got {precision!r}.")
    amp_dtype = autocast_dtype(precision, device)
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)  # parameter initialisation
    _, c, h, w = images.shape
    model = ConditionalDecoder(cond.shape[1], c, h, w, widths=widths)
    model.set_cond_stats(cond.double())
    model = model.to(device)
    ema = ConditionalDecoder(cond.shape[1], c, h, w, widths=widths).to(device)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    warmup = min(100, steps // 10)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda k: (k + 1) / warmup if k < warmup else 0.5 * (1 + math.cos(math.pi * k / steps)))
    cond_f, n = cond.float(), images.shape[0]
    start, running = time.perf_counter(), 0.0
    model.train()
    for k in range(steps):
        idx = torch.randint(n, (batch_size,), generator=gen)
        t = torch.randint(model.timesteps, (batch_size,), generator=gen)
        x0 = _to_unit(images[idx]).to(device)
        noise = torch.randn(x0.shape, generator=gen).to(device)
        t = t.to(device)
        with autocast(device, amp_dtype):
            pred = model(q_sample(x0, t, model.alpha_bar, noise), t, cond_f[idx].to(device))
        loss = F.mse_loss(pred.float(), noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        sched.step()
        _ema_update(ema, model, min(ema_decay, (1 + k) / (10 + k)))
        running += loss.item()
        if log_every > 0 and (k + 1) % log_every == 0:
            print(f"decoder step {k + 1}/{steps} loss {running / log_every:.4f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
            running = 0.0
        if time_limit_s is not None and time.perf_counter() - start > time_limit_s:
            print(f"decoder: time limit {time_limit_s:.0f}s reached after {k + 1} steps", flush=True)
            break
    ema.trained_steps = k + 1
    return ema.eval()


# ------------------------------------------------------------------------------------------------ sampling
def ddim_timesteps(timesteps: int, steps: int) -> Tensor:
    """``steps`` evenly spaced 0-based timesteps from T-1 down to 0 (DDIM's "linear" sub-sequence)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"sampling steps must be in 1..{timesteps}, got {steps}.")
    return torch.linspace(timesteps - 1, 0, steps).round().long()


def _sample_chunk(model: ConditionalDecoder, r: Tensor, ts: Tensor, eta: float, gen: torch.Generator) -> Tensor:
    """DDIM / ancestral update (Song et al., 2021, eq. 12) from x_T ~ N(0, I) down to x_0 for conditionings ``r``."""
    device = r.device
    x = torch.randn((r.shape[0], *model.image_shape), generator=gen).to(device)
    abar = model.alpha_bar.float()
    for i, t in enumerate(ts.tolist()):
        ab = abar[t]
        ab_prev = abar[ts[i + 1]] if i + 1 < len(ts) else torch.ones((), device=abar.device)
        eps = model(x, torch.full((x.shape[0],), t, device=device), r)
        x0 = ((x - (1 - ab).sqrt() * eps) / ab.sqrt()).clamp(-1, 1)
        eps = (x - ab.sqrt() * x0) / (1 - ab).sqrt()
        sigma = eta * ((1 - ab_prev) / (1 - ab) * (1 - ab / ab_prev)).clamp(min=0).sqrt()
        x = ab_prev.sqrt() * x0 + (1 - ab_prev - sigma**2).clamp(min=0).sqrt() * eps
        if eta > 0 and i + 1 < len(ts):
            x = x + sigma * torch.randn(x.shape, generator=gen).to(device)
    return x


@torch.no_grad()
def sample_decoder(
    model: ConditionalDecoder,
    cond: Tensor,
    n_samples: int = 4,
    *,
    steps: int = 100,
    eta: float = 1.0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    batch_size: int = 64,
) -> Tensor:
    """uint8 samples ``(M, n_samples, C, H, W)``: ``n_samples`` images for each row of ``cond`` ``(M, D)``.

    DDIM's update (Song et al., 2021, eq. 12) over ``steps`` of the model's timesteps, predicted x_0 clipped to
    [-1, 1] and epsilon re-derived from it (as ADM does). ``eta = 1`` (default, see the module docstring) is
    ancestral DDPM sampling on the re-spaced schedule; ``eta = 0`` is deterministic DDIM given x_T. ``steps = 100``:
    Nichol & Dhariwal (2021, Fig. 8) find re-spaced sampling close to the full 1000 steps at 100. Images are made
    ``batch_size`` at a time (per image, 256 at once ran 1.5x slower than 64 on one CPU thread). The noise comes
    from a CPU generator seeded with ``seed``: the result is reproducible for a given ``seed`` and ``batch_size``,
    and differs across seeds.
    """
    _check_cond(cond)
    if cond.shape[1] != model.cond_mean.shape[0]:
        raise ValueError(f"cond has {cond.shape[1]} dimensions but the decoder was trained on "
                         f"{model.cond_mean.shape[0]}-dimensional representations; pass features of the same "
                         f"encoder/layer it was trained on.")
    if n_samples < 1 or batch_size < 1:
        raise ValueError(f"n_samples and batch_size must be >= 1, got {n_samples} and {batch_size}.")
    if eta < 0:
        raise ValueError(f"eta must be >= 0 (0: DDIM, 1: ancestral DDPM), got {eta}.")
    device = torch.device(device)
    was_training = model.training
    model.eval().to(device)
    gen = torch.Generator().manual_seed(seed)
    ts = ddim_timesteps(model.timesteps, steps)
    r = cond.float().repeat_interleave(n_samples, dim=0).to(device)
    x = torch.cat([_sample_chunk(model, chunk, ts, eta, gen) for chunk in r.split(batch_size)])
    model.train(was_training)
    return _to_uint8(x).cpu().view(cond.shape[0], n_samples, *model.image_shape)


# ------------------------------------------------------------------------------------------------ measures
def _check_samples(samples: Tensor) -> None:
    if not isinstance(samples, Tensor) or samples.ndim != 5 or samples.dtype != torch.uint8:
        shape = tuple(samples.shape) if hasattr(samples, "shape") else type(samples).__name__
        raise ValueError(f"samples must be uint8 (M, n_samples, C, H, W) as returned by sample_decoder, got "
                         f"{shape} {getattr(samples, 'dtype', '')}.")


def sample_diversity(samples: Tensor) -> float:
    """Mean over conditionings and pixels of the std across the samples of one conditioning, in [0, 1] pixel
    units (unbiased std; needs >= 2 samples). 0 means the representation pins the image down completely; larger
    values mean more of the image is left free -- what RCDM reads off its sample grids (Bordes et al., 2022b)."""
    _check_samples(samples)
    if samples.shape[1] < 2:
        raise ValueError("sample_diversity needs at least 2 samples per conditioning (n_samples >= 2).")
    return float((samples.double() / 255).std(dim=1).mean())


def sample_rmse(real_images: Tensor, samples: Tensor) -> float:
    """Root-mean-square pixel distance (in [0, 1] units) between each sample and the image whose representation
    conditioned it, averaged over everything: how much of the image the representation reconstructs."""
    _check_samples(samples)
    _check_images(real_images)
    if real_images.shape[0] != samples.shape[0] or real_images.shape[1:] != samples.shape[2:]:
        raise ValueError(f"real_images {tuple(real_images.shape)} do not match samples {tuple(samples.shape)}: "
                         f"need (M, C, H, W) and (M, n, C, H, W) with the same M, C, H, W.")
    diff = (samples.double() - real_images.double()[:, None]) / 255
    return float(diff.pow(2).mean().sqrt())


# ------------------------------------------------------------------------------------------------ figure
def decoder_grid(real_images: Tensor, samples: Tensor, path: str | Path, title: str = "RCDM-style samples") -> Path:
    """Write one PNG: a row per conditioning image, the real image (left, "real") then its samples.

    Uses matplotlib's object API (no pyplot global state), like :mod:`selfsup.report.plots`.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    _check_samples(samples)
    _check_images(real_images)
    if real_images.shape[0] != samples.shape[0] or real_images.shape[1:] != samples.shape[2:]:
        raise ValueError(f"real_images {tuple(real_images.shape)} do not match samples {tuple(samples.shape)}: "
                         f"need (M, C, H, W) and (M, n, C, H, W) with the same M, C, H, W.")
    m, n = samples.shape[:2]
    fig = Figure(figsize=(1.2 * (n + 1) + 0.3, 1.2 * m + 0.6))
    FigureCanvasAgg(fig)
    axes = fig.subplots(m, n + 1, squeeze=False)
    for i in range(m):
        row = [real_images[i], *samples[i]]
        for j, img in enumerate(row):
            ax = axes[i, j]
            arr = img.permute(1, 2, 0).numpy()
            if arr.shape[2] == 1:
                ax.imshow(arr[:, :, 0], cmap="gray", vmin=0, vmax=255)
            else:
                ax.imshow(arr)
            ax.set_xticks([])
            ax.set_yticks([])
            if j == 0:
                for spine in ax.spines.values():
                    spine.set_edgecolor("tab:red")
                    spine.set_linewidth(2)
            if i == 0:
                ax.set_title("real" if j == 0 else f"sample {j}", fontsize=8)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    return path


def _query_index(labels: Tensor | None, n: int, total: int) -> Tensor:
    """The first image of each of the first ``n`` classes (varied content, same images for every run), or the
    first ``n`` images without labels."""
    if labels is None:
        return torch.arange(min(n, total))
    firsts = [(labels == c).nonzero()[:1, 0] for c in labels.unique(sorted=True)[:n].tolist()]
    return torch.cat(firsts)


def visualize_representations(
    reps_train: dict[str, Tensor],
    reps_query: dict[str, Tensor],
    train_images: Tensor,
    query_images: Tensor,
    out_dir: str | Path,
    *,
    query_labels: Tensor | None = None,
    n_images: int = 8,
    n_samples: int = 4,
    steps: int = 1500,
    sample_steps: int = 100,
    precision: str = "bf16",
    seed: int = 0,
    device: str | torch.device = "cpu",
    verbose: bool = True,
) -> dict:
    """RCDM-style figures for several representations of the same images: one decoder each, same query images.

    ``reps_train[name]`` (N, D) are frozen features of ``train_images`` (uint8 (N, C, H, W)); ``reps_query[name]``
    those of ``query_images``. For every name: train a decoder, draw ``n_samples`` images for ``n_images`` query
    images and write ``out_dir/decoder_<name>.png``. Returns ``{"grids": {name: file}, "diversity": {name: ...},
    "rmse_to_real": {...}, "seconds": {...}, "protocol": {...}}`` (diversity: mean per-pixel std across the samples
    of one image, in [0, 1] units; higher = less of the image is encoded). ``precision="bf16"``: 1.6x faster
    training steps on a 2-core AVX2 CPU (measured), the decoder's quality is not the point of the picture.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    idx = _query_index(query_labels, n_images, query_images.shape[0])
    real = query_images[idx]
    if not isinstance(real, Tensor):
        real = torch.from_numpy(real)
    result: dict = {"grids": {}, "diversity": {}, "rmse_to_real": {}, "seconds": {}}
    for name in reps_train:
        short = name.split(" ")[0]
        t0 = time.perf_counter()
        model = train_decoder(reps_train[name], train_images, steps=steps, precision=precision, seed=seed,
                              device=device, log_every=0)
        samples = sample_decoder(model, reps_query[name][idx], n_samples, steps=sample_steps, seed=seed,
                                 device=device)
        file = f"decoder_{short.replace('.', '_')}.png"
        decoder_grid(real, samples, out_dir / file, title=f"samples conditioned on {short} features "
                                                            f"({reps_train[name].shape[1]}-d): real | samples")
        result["grids"][short] = file
        result["diversity"][short] = round(sample_diversity(samples), 4)
        result["rmse_to_real"][short] = round(sample_rmse(real, samples), 4)
        result["seconds"][short] = round(time.perf_counter() - t0, 1)
        if verbose:
            print(f"  eval decoder ({short}): {result['seconds'][short]:.0f} s, sample diversity "
                  f"{result['diversity'][short]:.3f}", flush=True)
    result["protocol"] = {"train_steps": steps, "batch_size": 64, "sample_steps": sample_steps,
                          "sampler": "ancestral (DDIM eta=1)", "n_images": int(len(idx)), "n_samples": n_samples,
                          "precision": precision, "reference": "RCDM, Bordes et al. 2022b; cookbook §3.7.4"}
    return result
