"""RCDM-style conditional diffusion decoder (cookbook §3.7.4) against closed forms and known-answer toy data."""

import math

import pytest
import torch
from PIL import Image

from selfsup.evaluate.decoder import (
    ConditionalDecoder,
    cosine_alpha_bar,
    ddim_timesteps,
    decoder_grid,
    q_sample,
    sample_decoder,
    sample_diversity,
    sample_rmse,
    train_decoder,
)

pytestmark = pytest.mark.usefixtures("one_thread")


def patterns(size: int = 8) -> torch.Tensor:
    """4 uint8 (1, size, size) images: pattern k is bright (230) in quadrant k, dark (20) elsewhere."""
    x = torch.full((4, 1, size, size), 20, dtype=torch.uint8)
    h = size // 2
    for k in range(4):
        r, c = divmod(k, 2)
        x[k, :, r * h:(r + 1) * h, c * h:(c + 1) * h] = 230
    return x


def toy_data(n: int = 256):
    """One-hot conditioning that fully determines the image (a known answer for the decoder)."""
    labels = torch.arange(n) % 4
    return torch.eye(4)[labels], patterns()[labels]


def train_toy(cond, images):
    return train_decoder(cond, images, steps=400, batch_size=32, lr=1e-2, widths=(16, 16), log_every=0, seed=0)


@pytest.fixture(scope="module")
def toy_model():
    torch.set_num_threads(1)
    cond, images = toy_data()
    return train_toy(cond, images)


def mse_to_patterns(samples: torch.Tensor) -> torch.Tensor:
    """(M, 4): mean squared error (in [0, 1] units) of each conditioning's samples to each of the 4 patterns."""
    s = samples.double() / 255  # (M, n, 1, 8, 8)
    p = patterns().double() / 255  # (4, 1, 8, 8)
    return ((s[:, :, None] - p[None, None]) ** 2).mean(dim=(1, 3, 4, 5))


# ---------------------------------------------------------------------------------------------- schedule
def test_cosine_alpha_bar_matches_nichol_dhariwal_eq17_and_is_monotone():
    abar = cosine_alpha_bar(1000)
    f = [math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2 for t in range(1001)]
    for t in (1, 10, 250, 500, 900, 990):  # beta_t < 0.999 here, so no clipping: alpha_bar_t = f(t) / f(0)
        assert abar[t - 1].item() == pytest.approx(f[t] / f[0], rel=1e-10)
    assert abar.shape == (1000,)
    assert bool((abar > 0).all()) and bool((abar < 1).all())
    assert bool((abar[1:] < abar[:-1]).all())  # strictly decreasing: more noise at every step
    # the last step is clipped: beta_T = 0.999 instead of 1 (f(T) = 0), so alpha_bar_T = 0.001 alpha_bar_{T-1}
    assert abar[-1].item() == pytest.approx(abar[-2].item() * 0.001, rel=1e-10)


def test_q_sample_matches_closed_form_mean_and_variance():
    abar = cosine_alpha_bar(1000)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.tensor([-0.8, 0.0, 0.5, 1.0], dtype=torch.float64)
    n = 200_000
    for t in (0, 300, 700, 999):
        noise = torch.randn(n, 4, generator=gen, dtype=torch.float64)
        xt = q_sample(x0.expand(n, 4), torch.full((n,), t), abar, noise)
        mean, var = math.sqrt(abar[t].item()) * x0, 1 - abar[t].item()
        se = math.sqrt(var / n)  # standard error of the empirical mean
        assert torch.allclose(xt.mean(0), mean, atol=5 * se + 1e-12)
        # variance of the sample variance of a Gaussian: 2 var^2 / (n - 1)
        assert torch.allclose(xt.var(0), torch.full((4,), var, dtype=torch.float64),
                              atol=5 * var * math.sqrt(2 / (n - 1)) + 1e-12)


def test_q_sample_uses_each_rows_own_timestep():
    abar = cosine_alpha_bar(1000)
    x0, noise = torch.ones(2, 1, 2, 2), torch.zeros(2, 1, 2, 2)
    xt = q_sample(x0, torch.tensor([0, 999]), abar, noise)
    assert xt[0].flatten().tolist() == pytest.approx([math.sqrt(abar[0].item())] * 4)
    assert xt[1].flatten().tolist() == pytest.approx([math.sqrt(abar[999].item())] * 4)


def test_ddim_timesteps_are_an_even_descending_subsequence():
    assert ddim_timesteps(1000, 5).tolist() == [999, 749, 500, 250, 0]
    assert ddim_timesteps(10, 10).tolist() == list(range(9, -1, -1))
    with pytest.raises(ValueError, match="sampling steps"):
        ddim_timesteps(1000, 0)


# ---------------------------------------------------------------------------------------------- known answer
def test_samples_match_the_pattern_their_conditioning_determines(toy_model):
    samples = sample_decoder(toy_model, torch.eye(4), 4, steps=20, seed=1)
    assert samples.shape == (4, 4, 1, 8, 8) and samples.dtype == torch.uint8
    err = mse_to_patterns(samples)
    for k in range(4):
        others = torch.cat([err[k, :k], err[k, k + 1:]])
        assert err[k, k] < 0.01, err  # close to the right pattern (pixels differ by < 0.1 on average) ...
        assert err[k, k] < others.min() / 10, err  # ... and far closer to it than to the 3 others


def test_shuffled_conditioning_gives_a_worse_match(toy_model):
    perm = torch.tensor([1, 2, 3, 0])
    matched = mse_to_patterns(sample_decoder(toy_model, torch.eye(4), 2, steps=20, seed=2))
    shuffled = mse_to_patterns(sample_decoder(toy_model, torch.eye(4)[perm], 2, steps=20, seed=2))
    right = torch.arange(4)
    assert shuffled[right, right].mean() > 10 * matched[right, right].mean()
    assert shuffled[right, perm].mean() < 0.01  # it draws the pattern of the conditioning it was given


def test_uninformative_conditioning_leaves_more_freedom(toy_model):
    """RCDM's reading: a representation that encodes less gives more varied samples (Bordes et al., 2022b)."""
    cond, images = toy_data()
    blind = train_toy(torch.zeros_like(cond), images)  # constant conditioning: the decoder must guess the pattern
    informed = sample_decoder(toy_model, torch.eye(4), 8, steps=20, seed=3)
    guessed = sample_decoder(blind, torch.zeros(4, 4), 8, steps=20, seed=3)
    assert sample_diversity(guessed) > 3 * sample_diversity(informed)
    assert sample_rmse(patterns(), guessed) > 2 * sample_rmse(patterns(), informed)


def test_sampling_is_deterministic_per_seed_and_changes_with_the_seed(toy_model):
    a = sample_decoder(toy_model, torch.eye(4), 2, steps=10, seed=5)
    b = sample_decoder(toy_model, torch.eye(4), 2, steps=10, seed=5)
    c = sample_decoder(toy_model, torch.eye(4), 2, steps=10, seed=6)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    ddim_a = sample_decoder(toy_model, torch.eye(4), 2, steps=10, eta=0.0, seed=5)
    assert torch.equal(ddim_a, sample_decoder(toy_model, torch.eye(4), 2, steps=10, eta=0.0, seed=5))
    # DDIM draws only x_T, in the same order whatever the chunking: chunks of 3 images give the same samples
    chunked = sample_decoder(toy_model, torch.eye(4), 2, steps=10, eta=0.0, seed=5, batch_size=3)
    assert (chunked.int() - ddim_a.int()).abs().max() <= 1


def test_training_is_reproducible_for_a_seed():
    cond, images = toy_data(32)
    a = train_decoder(cond, images, steps=3, batch_size=8, widths=(8, 8), log_every=0, seed=4)
    b = train_decoder(cond, images, steps=3, batch_size=8, widths=(8, 8), log_every=0, seed=4)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=True))


# ---------------------------------------------------------------------------------------------- conditioning
def test_conditioning_is_standardized_with_stored_train_statistics():
    torch.manual_seed(0)
    cond = torch.randn(50, 3, dtype=torch.float64) * torch.tensor([1.0, 10.0, 0.1]) + 5
    cond[:, 2] = 7.0  # a constant dimension must not divide by zero
    model = ConditionalDecoder(3, 1, 8, 8, widths=(8, 8))
    torch.manual_seed(1)
    for p in model.parameters():  # the zero-initialised output convs would hide the conditioning's effect
        if not p.any():
            torch.nn.init.normal_(p, std=0.3)
    model.set_cond_stats(cond)
    assert torch.allclose(model.cond_mean, cond.mean(0).float())
    assert torch.allclose(model.cond_std, torch.tensor([cond[:, 0].std(), cond[:, 1].std(), 1.0]).float())
    plain = ConditionalDecoder(3, 1, 8, 8, widths=(8, 8))
    plain.load_state_dict({**model.state_dict(), "cond_mean": torch.zeros(3), "cond_std": torch.ones(3)})
    x, t = torch.randn(4, 1, 8, 8), torch.tensor([0, 10, 500, 999])
    raw = cond[:4].float()
    expected = plain(x, t, (raw - model.cond_mean) / model.cond_std)
    assert torch.allclose(model(x, t, raw), expected, atol=1e-5)
    assert not torch.allclose(plain(x, t, raw), expected, atol=1e-3)  # the statistics do change the output


@pytest.mark.parametrize("shape", [(1, 28, 28), (3, 32, 32), (3, 28, 28)])
def test_trains_and_samples_every_supported_image_shape(shape):
    images = torch.randint(0, 256, (6, *shape), dtype=torch.uint8)
    model = train_decoder(torch.randn(6, 5), images, steps=2, batch_size=3, widths=(8, 16), log_every=0)
    samples = sample_decoder(model, torch.randn(2, 5), 3, steps=2)
    assert samples.shape == (2, 3, *shape) and samples.dtype == torch.uint8
    twin = ConditionalDecoder(**model.config)  # config + state_dict rebuild the decoder
    twin.load_state_dict(model.state_dict())
    assert torch.equal(sample_decoder(twin, torch.ones(1, 5), 2, steps=2), sample_decoder(model, torch.ones(1, 5), 2,
                                                                                           steps=2))


# ---------------------------------------------------------------------------------------------- measures, figure
def test_sample_diversity_and_rmse_by_hand():
    samples = torch.zeros(2, 2, 1, 1, 2, dtype=torch.uint8)
    samples[0, 1] = 255  # conditioning 0: one black and one white sample -> unbiased std sqrt(0.5)
    # conditioning 1: two black samples -> std 0
    assert sample_diversity(samples) == pytest.approx(math.sqrt(0.5) / 2)
    real = torch.zeros(2, 1, 1, 2, dtype=torch.uint8)
    # squared errors: conditioning 0 -> 0 and 1 on 2 pixels each, conditioning 1 -> 0: mean 2 / 8
    assert sample_rmse(real, samples) == pytest.approx(math.sqrt(2 / 8))
    with pytest.raises(ValueError, match="at least 2 samples"):
        sample_diversity(samples[:, :1])


def test_decoder_grid_writes_one_row_per_image(tmp_path):
    real = patterns()[:3]
    samples = patterns()[:3, None].expand(3, 4, 1, 8, 8).contiguous()
    small = Image.open(decoder_grid(real[:2], samples[:2], tmp_path / "two.png"))
    big = Image.open(decoder_grid(real, samples, tmp_path / "sub" / "three.png", title="t"))
    assert small.format == "PNG" and big.format == "PNG"
    assert big.size[0] == small.size[0] and big.size[1] > small.size[1]
    rgb = torch.randint(0, 256, (2, 3, 8, 8), dtype=torch.uint8)
    assert Image.open(decoder_grid(rgb, rgb[:, None].repeat(1, 2, 1, 1, 1), tmp_path / "rgb.png")).format == "PNG"
    with pytest.raises(ValueError, match="do not match"):
        decoder_grid(real[:2], samples, tmp_path / "bad.png")


# ---------------------------------------------------------------------------------------------- errors
def test_bad_inputs_are_refused_with_actionable_errors():
    cond, images = toy_data(8)
    with pytest.raises(ValueError, match="2-D"):
        train_decoder(cond[0], images, steps=1)
    with pytest.raises(ValueError, match="floating point"):
        train_decoder(cond.long(), images, steps=1)
    with pytest.raises(ValueError, match="NaN"):
        train_decoder(cond.masked_fill(cond > 0, float("nan")), images, steps=1)
    with pytest.raises(ValueError, match="uint8"):
        train_decoder(cond, images.float() / 255, steps=1)
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        train_decoder(cond, images[:, 0], steps=1)
    with pytest.raises(ValueError, match="one representation per image"):
        train_decoder(cond[:5], images, steps=1)
    with pytest.raises(ValueError, match="even"):
        train_decoder(cond, images[:, :, :7, :7].contiguous(), steps=1)
    with pytest.raises(ValueError, match="positive"):
        train_decoder(cond, images, steps=0)
    with pytest.raises(ValueError, match="precision"):
        train_decoder(cond, images, steps=1, precision="fp16")
    model = ConditionalDecoder(4, 1, 8, 8, widths=(8, 8))
    with pytest.raises(ValueError, match="4-dimensional"):
        sample_decoder(model, torch.ones(2, 3))
    with pytest.raises(ValueError, match="n_samples and batch_size"):
        sample_decoder(model, torch.ones(2, 4), 0)
    with pytest.raises(ValueError, match="eta"):
        sample_decoder(model, torch.ones(2, 4), eta=-1)
    with pytest.raises(ValueError, match="uint8 \\(M, n_samples"):
        sample_diversity(torch.zeros(2, 2, 1, 8, 8))
