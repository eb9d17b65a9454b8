import os

import numpy as np
import pytest
import torch

from fastds.diffusion.schedule import Diffusion, squaredcos_cap_v2
from fastds.sampling.samplers import alpha_bar_for, make_plan, run_plan, sample_ddim, sample_ddpm, sample_dpmpp
from fastds.sampling.steps import (ddim_step_ref, ddpm_step_ref, dpmpp_step_ref, fused_step,
                                   fused_step_ref, leading_timesteps)

from conftest import TRITON_DEVICE, requires_triton_run

diffusers = pytest.importorskip("diffusers")


class ToyModel(torch.nn.Module):
    """A fixed nonlinear function of (x, t, cond): enough to make trajectories differ."""

    def forward(self, x, t, cond):
        assert t.dtype == torch.long and t.shape == (x.shape[0],)
        return torch.tanh(0.7 * x + 0.001 * t.float()[:, None, None, None] + (0 if cond is None else cond))


def _diffusers_ddpm(model, x, T, steps, prediction, clip, cond, seed):
    sched = diffusers.DDPMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2",
                                    prediction_type={"v": "v_prediction"}.get(prediction, prediction), clip_sample=clip is not None,
                                    clip_sample_range=clip or 1.0, variance_type="fixed_small",
                                    timestep_spacing="leading")
    sched.set_timesteps(steps or T)
    g = torch.Generator().manual_seed(seed)
    for t in sched.timesteps:
        m = model(x, torch.full((x.shape[0],), int(t), dtype=torch.long), cond)
        x = sched.step(m, t, x, generator=g).prev_sample
    return x


@pytest.mark.parametrize("prediction", ["sample", "epsilon", "v"])
@pytest.mark.parametrize("clip", [None, 1.0])
@pytest.mark.parametrize("steps", [None, 37])
def test_ddpm_matches_diffusers_trajectory(prediction, clip, steps):
    T = 200
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 9, 11, generator=g)
    cond = 0.1 * torch.randn(2, 1, 9, 11, generator=g)
    model = ToyModel()
    ours = sample_ddpm(model, x, T=T, steps=steps, prediction=prediction, clip=clip, cond=cond,
                       generator=torch.Generator().manual_seed(5))
    theirs = _diffusers_ddpm(model, x, T, steps, prediction, clip, cond, 5)
    err = (ours - theirs).abs().max().item()
    scale = theirs.abs().max().item()
    print(f"max abs diff {err:.3g} (scale {scale:.3g})")
    assert err <= 1e-4 * max(scale, 1.0)


def test_schedule_matches_diffusers():
    s = diffusers.DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    np.testing.assert_allclose(squaredcos_cap_v2(1000), s.betas.double().numpy(), rtol=1e-6)
    ts, prev = leading_timesteps(1000, 7)
    s.set_timesteps(7)
    np.testing.assert_array_equal(ts, s.timesteps.numpy())


@pytest.mark.parametrize("prediction", ["sample", "epsilon", "v"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim", "dpmpp"])
@pytest.mark.parametrize("clip", [None, 1.0])
def test_plans_match_step_refs(prediction, sampler, clip):
    """The coefficient tables reproduce each sampler's update written the paper's way."""
    T = 300
    ab = alpha_bar_for(T)
    plan = make_plan(sampler, T=T, steps=12, prediction=prediction, eta=0.6)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 1, 7, 13, generator=g, dtype=torch.float64)
    x0_prev = None
    for i in range(len(plan)):
        t, tp = int(plan.timesteps[i]), int(plan.timesteps[i]) - T // 12
        m = torch.tanh(x + 0.3)
        z = torch.randn(x.shape, generator=g, dtype=x.dtype)
        fused, x0 = fused_step_ref(m, x, plan.coef[i], noise=z if plan.noisy[i] else None,
                                   x0_prev=x0_prev if plan.coef[i][4] else None, clip=clip)
        if sampler == "ddpm":
            ref = ddpm_step_ref(m, x, t, tp, ab, prediction=prediction, clip=clip, noise=z)
        elif sampler == "ddim":
            ref = ddim_step_ref(m, x, t, tp, ab, prediction=prediction, clip=clip, eta=0.6, noise=z)
        else:
            ref, _ = dpmpp_step_ref(m, x, t, tp, ab, prediction=prediction, clip=clip,
                                    x0_prev=x0_prev if 0 < i and tp >= 0 else None,
                                    t_before=int(plan.timesteps[i - 1]) if i else None)
        torch.testing.assert_close(fused, ref, rtol=1e-9, atol=1e-9)
        x, x0_prev = ref, x0


SHAPES = [(3, 1, 17, 19), (1, 1, 1000, 3), (2, 4, 33, 5)]


STEP_CASES = [
    pytest.param(shape, backend, dtype, extras, marks=[requires_triton_run] if backend == "triton" else [])
    for shape in SHAPES for backend in ("torch", "cpu", "triton")
    for dtype in (torch.float32, torch.float64) for extras in ("none", "noise+clip", "prev+x0")
    # float64 through the Triton interpreter once per shape keeps the suite fast
    if not (backend == "triton" and dtype == torch.float64 and extras != "none")
]


@pytest.mark.parametrize("shape,backend,dtype,extras", STEP_CASES)
def test_fused_step_backends_match_ref(shape, backend, dtype, extras):
    g = torch.Generator().manual_seed(2)
    dev = TRITON_DEVICE if backend == "triton" else "cpu"
    m, x, z, xp = (torch.randn(shape, generator=g, dtype=dtype).to(dev) for _ in range(4))
    coef = make_plan("dpmpp" if extras == "prev+x0" else "ddpm", T=100, steps=10,
                     prediction="epsilon").coef[4]
    kw = {}
    if extras == "noise+clip":
        kw = dict(noise=z, clip=0.9)
    elif extras == "prev+x0":
        kw = dict(x0_prev=xp)
    x0_out = torch.empty_like(x)
    out = fused_step(m, x, coef, x0_out=x0_out, backend=backend, **kw)
    ref, x0 = fused_step_ref(m, x, coef, **kw)
    tol = 1e-5 if dtype == torch.float32 else 1e-12
    print("max diff", (out - ref).abs().max().item())
    torch.testing.assert_close(out, ref, rtol=tol, atol=tol)
    torch.testing.assert_close(x0_out, x0, rtol=tol, atol=tol)


@requires_triton_run
def test_triton_device_tables_and_rng():
    """Graph-style call: coefficients from a table indexed by a device step counter, noise
    drawn in the kernel from one 64-bit trajectory seed and a step·n + i counter (what CUDA
    graph replay uses)."""
    plan = make_plan("ddpm", T=100, steps=10, prediction="sample")
    x = torch.randn(4, 1, 40, 40).to(TRITON_DEVICE)
    m = torch.randn_like(x)
    table = torch.tensor(plan.coef, dtype=torch.float32, device=TRITON_DEVICE)
    seed = torch.tensor([2 ** 62 + 12345], dtype=torch.int64, device=TRITON_DEVICE)
    step = lambda i: torch.tensor([i], device=TRITON_DEVICE)  # noqa: E731
    for s in (2, 5):
        out = fused_step(m, x, table, step=step(s), seed=seed, backend="triton")
        mean, _ = fused_step_ref(m, x, plan.coef[s])
        z = (out - mean) / plan.coef[s][5]
        assert abs(z.mean().item()) < 0.05 and abs(z.std().item() - 1) < 0.05
    a = fused_step(m, x, table, step=step(2), seed=seed, backend="triton")
    b = fused_step(m, x, table, step=step(2), seed=seed, backend="triton")
    c = fused_step(m, x, table, step=step(3), seed=seed, backend="triton")
    d = fused_step(m, x, table, step=step(2), seed=seed + 1, backend="triton")
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c) and not torch.allclose(a, d)
    # noise of different steps of one trajectory is uncorrelated (its own counter range)
    za = (a - fused_step_ref(m, x, plan.coef[2])[0]) / plan.coef[2][5]
    zc = (c - fused_step_ref(m, x, plan.coef[3])[0]) / plan.coef[3][5]
    assert abs(torch.corrcoef(torch.stack([za.ravel(), zc.ravel()]))[0, 1].item()) < 0.05


def test_philox_stream_is_tritons_randn4x():
    """The noise stream's numpy reference, the C++ draw (csrc/step.h) and Triton's own
    tl.randn4x agree on counters with high words set and on a 64-bit seed."""
    import triton
    import triton.language as tl
    from fastds import _backend
    from fastds.sampling.steps import philox_normal4_ref

    @triton.jit
    def randn4x_kernel(out_ptr, seed, c0, BLOCK: tl.constexpr):
        i = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        a, b, c, d = tl.randn4x(seed, c0 + i)
        tl.store(out_ptr + 4 * i, a)
        tl.store(out_ptr + 4 * i + 1, b)
        tl.store(out_ptr + 4 * i + 2, c)
        tl.store(out_ptr + 4 * i + 3, d)

    seed, c0, n = 2 ** 62 + 12345, 2 ** 33 + 7, 1024
    counters = c0 + np.arange(n, dtype=np.int64)
    ref = philox_normal4_ref(seed, counters)
    cpp = _backend.cpu_ext().philox_normal4(seed, counters)
    np.testing.assert_allclose(cpp, ref, atol=3e-6, rtol=0)
    if os.environ.get("TRITON_INTERPRET") == "1" or torch.cuda.is_available():
        dev = TRITON_DEVICE
        out = torch.empty(4 * n, device=dev)
        randn4x_kernel[(n // 256,)](out, seed, c0, BLOCK=256)
        np.testing.assert_allclose(out.cpu().numpy().reshape(n, 4), ref, atol=3e-6, rtol=0)
    big = _backend.cpu_ext().philox_normal4(3, np.arange(250_000, dtype=np.int64)).ravel()
    assert abs(big.mean()) < 0.01 and abs(big.std() - 1) < 0.01
    assert abs(np.corrcoef(big[:-1], big[1:])[0, 1]) < 0.01


@pytest.mark.parametrize("n", [1, 7, 1030, 4099])
def test_in_kernel_noise_is_one_stream_on_every_backend(n):
    """fused_step(seed=, step=) draws the same noise on cpu, torch, ref and triton (the CPU
    eager twin of a graphed GPU trajectory), for sizes that are not multiples of 4 or of a
    block, and step s of one seed is independent of step s + 1."""
    from fastds.sampling.steps import step_noise_ref
    g = torch.Generator().manual_seed(0)
    m, x = torch.randn(n, generator=g), torch.randn(n, generator=g)
    coef = [0.9, 0.1, 0.6, 0.3, 0.0, 0.8]
    seed = 2 ** 63 - 5
    mean, _ = fused_step_ref(m, x, coef)
    want = mean + 0.8 * torch.from_numpy(step_noise_ref(seed, 3, n))
    for backend in ("cpu", "torch", "ref", "triton"):
        dev = TRITON_DEVICE if backend == "triton" else "cpu"
        if dev == "cuda" and not torch.cuda.is_available():
            continue
        got = fused_step(m.to(dev), x.to(dev), coef, seed=seed, step=3, backend=backend)
        torch.testing.assert_close(got.cpu(), want, atol=5e-6, rtol=1e-6, msg=backend)
    if n > 1000:
        z3 = step_noise_ref(seed, 3, n)
        z4 = step_noise_ref(seed, 4, n)
        assert abs(np.corrcoef(z3, z4)[0, 1]) < 0.1


def test_seed_is_refused_where_noise_cannot_be_drawn():
    x = torch.randn(2, 8)
    with pytest.raises(ValueError, match="give noise= or seed=, not both"):
        fused_step(x, x, [1, 0, 1, 0, 0, 1], noise=x, seed=1, backend="cpu")
    if torch.cuda.is_available():
        with pytest.raises(ValueError, match="backend 'cuda' cannot"):
            fused_step(x.cuda(), x.cuda(), [1, 0, 1, 0, 0, 1], seed=1, backend="cuda")


def test_samplers_run_and_are_deterministic():
    model = ToyModel()
    x = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    for fn in (sample_ddim, sample_dpmpp):
        a = fn(model, x, T=1000, steps=10)
        b = fn(model, x, T=1000, steps=10)
        torch.testing.assert_close(a, b)
        assert torch.isfinite(a).all()
    a = sample_ddim(model, x, T=1000, steps=10, eta=1.0, generator=torch.Generator().manual_seed(3))
    b = sample_ddim(model, x, T=1000, steps=10, eta=1.0, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("backend", ["ref", "torch", "cpu"])
@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_mirrored_plan_is_the_antithetic_trajectory(sampler, backend):
    """With a network odd in x_t, the mirrored plan from −x_T and the same generator retraces
    the trajectory exactly negated (every noise draw negated); with a network that is not
    odd the twin differs from −x_0 but stays a sample of the same plan."""
    plan = make_plan(sampler, T=200, steps=20, prediction="sample", eta=1.0)
    twin = plan.mirrored()
    assert twin.noisy.tolist() == plan.noisy.tolist() and plan.coef[plan.noisy, 5].min() > 0
    np.testing.assert_array_equal(twin.coef[:, 5], -plan.coef[:, 5])
    np.testing.assert_array_equal(twin.coef[:, :5], plan.coef[:, :5])
    x = torch.randn(3, 1, 7, 9, generator=torch.Generator().manual_seed(0))
    odd = lambda x, t, c: 0.7 * x
    a = run_plan(odd, x, plan, generator=torch.Generator().manual_seed(5), backend=backend)
    b = run_plan(odd, -x, twin, generator=torch.Generator().manual_seed(5), backend=backend)
    torch.testing.assert_close(b, -a, rtol=0, atol=0)
    shifted = lambda x, t, c: 0.7 * x + 0.3
    a = run_plan(shifted, x, plan, generator=torch.Generator().manual_seed(5), backend=backend)
    b = run_plan(shifted, -x, twin, generator=torch.Generator().manual_seed(5), backend=backend)
    assert not torch.allclose(a, -b) and torch.corrcoef(torch.stack([a.ravel(), b.ravel()]))[0, 1] < -0.5


def test_member_draws_pairs_and_independence_of_placement():
    from fastds.sampling.pipeline import member_draws
    gens, signs = member_draws(3, 11, 0, 5, antithetic=True)
    assert signs == [1.0, -1.0, 1.0, -1.0, 1.0]
    draws = [torch.randn(4, generator=g) for g in gens]
    assert torch.equal(draws[0], draws[1]) and torch.equal(draws[2], draws[3])
    assert not torch.equal(draws[0], draws[2])
    plain, psigns = member_draws(3, 11, 0, 3)
    assert psigns == [1.0] * 3
    pdraws = [torch.randn(4, generator=g) for g in plain]
    # member 0 draws the same either way; pair k shares plain member k's draws
    assert torch.equal(draws[0], pdraws[0]) and torch.equal(draws[2], pdraws[1])
    assert torch.equal(draws[4], pdraws[2])
    # a worker sampling member 3 alone draws what the whole ensemble's member 3 does
    (g3,), (s3,) = member_draws(3, 11, 3, 1, antithetic=True)
    assert s3 == -1.0 and torch.equal(torch.randn(4, generator=g3), draws[3])


def test_inflate_residuals_widens_pairs_around_their_mean():
    from fastds.sampling.pipeline import inflate_residuals
    rng = np.random.default_rng(0)
    r = rng.standard_normal((5, 3, 4))
    np.testing.assert_array_equal(inflate_residuals(r, 1.0, antithetic=True), r)
    w = inflate_residuals(r, 1.5, antithetic=True)
    for a in (0, 2):  # pairs: means kept, half-differences widened by α
        np.testing.assert_allclose(w[a] + w[a + 1], r[a] + r[a + 1], rtol=1e-12)
        np.testing.assert_allclose(w[a] - w[a + 1], 1.5 * (r[a] - r[a + 1]), rtol=1e-12)
    np.testing.assert_allclose(w[4], 1.5 * r[4], rtol=1e-12)  # member 4's partner is absent
    np.testing.assert_allclose(inflate_residuals(r, 1.5), 1.5 * r, rtol=1e-12)  # independent
    # numbered from member 1: (1, 2) and (3, 4) are not pairs, (2, 3) is
    v = inflate_residuals(r[:4], 1.5, member0=1, antithetic=True)
    np.testing.assert_allclose(v[0], 1.5 * r[0], rtol=1e-12)
    np.testing.assert_allclose(v[1] + v[2], r[1] + r[2], rtol=1e-12)
    np.testing.assert_allclose(v[3], 1.5 * r[3], rtol=1e-12)
    r32 = r.astype(np.float32)
    assert inflate_residuals(r32, 1.5, antithetic=True).dtype == np.float32


def test_ddim_eta1_full_steps_equals_ddpm_in_distribution():
    """η=1 DDIM with all steps has DDPM's posterior variance: same noise, same result."""
    model = ToyModel()
    x = torch.randn(1, 1, 6, 6, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    a = sample_ddpm(model, x, T=50, generator=torch.Generator().manual_seed(9))
    b = sample_ddim(model, x, T=50, steps=50, eta=1.0, generator=torch.Generator().manual_seed(9))
    torch.testing.assert_close(a, b, rtol=1e-7, atol=1e-7)


def test_diffusion_loss_and_q_sample():
    d = Diffusion(100, "v")
    x0 = torch.rand(8, 1, 4, 4)
    noise = torch.randn_like(x0)
    t = torch.arange(8) * 12
    xt = d.q_sample(x0, t, noise)
    # v-target inverts to x0 through predict_x0
    torch.testing.assert_close(d.predict_x0(d.target(x0, noise, t), xt, t), x0, rtol=1e-4, atol=1e-4)
    loss = d.loss(lambda x, t, c: torch.zeros_like(x), x0, None, generator=torch.Generator().manual_seed(0))
    assert loss.item() > 0


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("steps", [5, 20])
def test_trailing_ddim_matches_diffusers_trajectory(prediction, steps):
    """sample.spacing = "trailing": the timesteps and the deterministic DDIM trajectory of
    diffusers' DDIMScheduler(timestep_spacing="trailing"), whose first step starts at t = T-1.
    (Step counts that divide T: diffusers' DDIM steps to t − T//n, which for other counts is
    not the next trailing timestep; fastds steps to the next one.)"""
    from fastds.sampling.steps import trailing_timesteps
    T = 1000
    sched = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2",
                                    prediction_type={"v": "v_prediction"}.get(prediction, prediction),
                                    timestep_spacing="trailing", set_alpha_to_one=True, clip_sample=False)
    sched.set_timesteps(steps)
    ts, prev = trailing_timesteps(T, steps)
    assert ts.tolist() == sched.timesteps.tolist() and ts[0] == T - 1 and prev[-1] == -1
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 9, 11, generator=g, dtype=torch.float64)
    cond = 0.1 * torch.randn(2, 1, 9, 11, generator=g, dtype=torch.float64)
    model = ToyModel()
    ours = run_plan(model, x, make_plan("ddim", T=T, steps=steps, prediction=prediction,
                                        spacing="trailing"), cond=cond, backend="ref")
    theirs = x.clone()
    for t in sched.timesteps:
        m = model(theirs, torch.full((2,), int(t), dtype=torch.long), cond)
        theirs = sched.step(m, t, theirs, eta=0.0).prev_sample
    err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), (err, scale)  # diffusers keeps ᾱ in float32
    with pytest.raises(ValueError, match="spacing must be one of"):
        make_plan("ddim", T=T, steps=steps, spacing="linear")


@pytest.mark.parametrize("prediction", ["epsilon", "v"])
@pytest.mark.parametrize("steps", [4, 5, 7])
@pytest.mark.parametrize("spacing", ["leading", "linspace", "karras-linear"])
def test_dpmpp_matches_diffusers_trajectory(spacing, prediction, steps):
    """The DPM-Solver++(2M) plan (the shipped sampler) retraces diffusers'
    DPMSolverMultistepScheduler given the same timesteps (midpoint 2M, first order at the
    first and the last step, ending at σ = 0), on the leading steps, on sample.spacing =
    "linspace", whose timesteps are diffusers' DDIMScheduler(timestep_spacing="linspace") ones
    (t = T−1 down to 0 in even steps), and on "karras-linear" (uneven steps, so the 2M
    correction's step ratio r varies)."""
    from fastds.sampling.steps import linspace_timesteps, timesteps
    T = 1000
    ts, prev = timesteps(T, steps, spacing, alpha_bar_for(T))
    assert ts[-1] == 0 and prev[:-1].tolist() == ts[1:].tolist() and prev[-1] < 0  # < 0: ᾱ = 1
    if spacing == "linspace":
        ddim = diffusers.DDIMScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2",
                                       timestep_spacing="linspace")
        ddim.set_timesteps(steps)
        assert ts.tolist() == ddim.timesteps.tolist() and ts[0] == T - 1
        assert linspace_timesteps(T, 1)[0].tolist() == [T - 1]
        with pytest.raises(ValueError, match="steps must be in 1..T=1000"):
            linspace_timesteps(T, 0)
    sched = diffusers.DPMSolverMultistepScheduler(
        num_train_timesteps=T, beta_schedule="squaredcos_cap_v2", final_sigmas_type="zero",
        prediction_type={"v": "v_prediction"}.get(prediction, prediction))
    sched.set_timesteps(timesteps=ts.tolist())
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 1, 9, 11, generator=g, dtype=torch.float64)
    cond = 0.1 * torch.randn(2, 1, 9, 11, generator=g, dtype=torch.float64)
    model = ToyModel()
    plan = make_plan("dpmpp", T=T, steps=steps, prediction=prediction, spacing=spacing)
    ours = run_plan(model, x, plan, cond=cond, backend="ref")
    theirs = x.clone()
    for t in sched.timesteps:
        theirs = sched.step(model(theirs, torch.full((2,), int(t), dtype=torch.long), cond),
                            t, theirs).prev_sample
    err, scale = (ours - theirs).abs().max().item(), theirs.abs().max().item()
    assert err <= 1e-4 * max(scale, 1.0), (err, scale)  # diffusers keeps ᾱ in float32
    for backend in ("torch", "cpu"):  # the fused steps on the same plan
        torch.testing.assert_close(run_plan(model, x, plan, cond=cond, backend=backend), ours)


def test_band_split_sums_back_and_separates_scales():
    """Bands sum to the field; white noise puts most variance in the finest bands, a smooth
    field in the coarsest; one gain per band scales exactly that band."""
    from fastds.sampling.spread import BAND_SIGMAS, band_split, filter_bands
    rng = np.random.default_rng(3)
    white = rng.standard_normal((37, 53))
    b = band_split(white)
    assert b.shape == (len(BAND_SIGMAS) + 1, 37, 53)
    np.testing.assert_allclose(b.sum(0), white, atol=1e-12)
    var = b.var(axis=(1, 2))
    assert var[:2].sum() > 0.3 * white.var() and np.argmax(var) <= 1  # the finest bands
    y, x = np.mgrid[:37, :53]
    smooth = np.sin(x / 15.0) + np.cos(y / 12.0)
    assert np.argmax(band_split(smooth).var(axis=(1, 2))) == len(BAND_SIGMAS)
    g = np.array([3.0] + [1.0] * len(BAND_SIGMAS))
    np.testing.assert_allclose(filter_bands(white, g), white + 2.0 * b[0], atol=1e-12)
    with pytest.raises(ValueError, match="one per band"):
        filter_bands(white, np.ones(3))


def test_widen_parts_match_widen():
    """widen(r, a·g) = base + a·spread for pairs and independent members; gains of 1 change
    nothing; a scalar α widens as inflate_residuals always did."""
    from fastds.sampling.pipeline import inflate_residuals
    from fastds.sampling.spread import widen, widen_parts
    r = np.random.default_rng(4).standard_normal((4, 20, 24))
    g = np.array([2.0, 1.8, 1.4, 1.1, 0.9, 0.7])
    for anti in (False, True):
        base, spread = widen_parts(r, g, antithetic=anti)
        np.testing.assert_allclose(widen(r, gains=1.3 * g, antithetic=anti), base + 1.3 * spread, atol=1e-12)
        np.testing.assert_allclose(widen(r, gains=np.ones(len(g)), antithetic=anti), r, atol=1e-12)
        np.testing.assert_array_equal(widen(r, 1.5, antithetic=anti), inflate_residuals(r, 1.5, antithetic=anti))
    w = widen(r, gains=g, antithetic=True)
    np.testing.assert_allclose(w[0] + w[1], r[0] + r[1], atol=1e-12)  # pair means kept


def test_calibrate_to_spread_moves_the_common_factor_to_spread_skill_one():
    """``sample.calibrate_to="spread"``: the saved common factor (the fair-CRPS best) is
    replaced by the factor at which the saved validation spread/skill curve crosses 1, for
    the per-band gains and for the one-α widening; "crps" returns what was saved."""
    import dataclasses as dc
    from types import SimpleNamespace
    from fastds.config import SampleConfig
    from fastds.sampling.day import spread_widening
    infl = [1.0, 1.1, 1.2, 1.3]
    model = SimpleNamespace(
        regression_inflation=torch.tensor(1.3), regression_bands=torch.tensor([1.2, 2.4]),
        calibration={"inflations": infl, "band_factor": 1.2, "spread_skill_bands": [0.8, 0.9, 1.1, 1.2],
                     "inflation": 1.3, "spread_skill": [0.7, 0.8, 0.9, 1.0]})
    cfg = SampleConfig(calibrate_to="crps")
    a, g = spread_widening(model, cfg)
    assert a == 1.0 and np.allclose(g, [1.2, 2.4])
    a, g = spread_widening(model, dc.replace(cfg, calibrate_to="spread"))
    assert a == 1.0 and np.allclose(g, np.array([1.2, 2.4]) * 1.15 / 1.2)  # 1 is halfway 1.1..1.2
    a, g = spread_widening(model, dc.replace(cfg, calibrate_to="spread", calibrate_bands=False))
    assert g is None and a == pytest.approx(1.3)
    model.calibration = None  # a model saved without curves keeps its saved widening
    assert np.allclose(spread_widening(model, dc.replace(cfg, calibrate_to="spread"))[1], [1.2, 2.4])
    with pytest.raises(ValueError, match="calibrate_to"):
        spread_widening(model, dc.replace(cfg, calibrate_to="median"))


def test_calibrate_to_bands_takes_the_post_projection_gains():
    """``sample.calibrate_to="bands"`` (the default): the per-band gains fitted after the
    projection, with no common factor (α = 1); a calibration that predates them is an error
    naming the setting and the refit, not a silent fallback; one α (band gains off) takes
    the spread/skill-1 factor, as under "spread"."""
    import dataclasses as dc
    from types import SimpleNamespace
    from fastds.config import SampleConfig
    from fastds.sampling.day import spread_widening
    cal = {"inflations": [1.0, 1.1, 1.2], "band_factor": 1.1, "spread_skill_bands": [0.9, 1.1, 1.2],
           "inflation": 1.2, "spread_skill": [0.8, 1.0, 1.2], "final_band_gains": [0.7, 0.8, 1.5]}
    model = SimpleNamespace(regression_inflation=torch.tensor(1.2),
                            regression_bands=torch.tensor([1.2, 1.3, 2.4]), calibration=cal)
    assert SampleConfig().calibrate_to == "bands"  # the shipped default
    a, g = spread_widening(model, SampleConfig())
    assert a == 1.0 and np.array_equal(g, [0.7, 0.8, 1.5])
    a, g = spread_widening(model, SampleConfig(calibrate_bands=False))
    assert g is None and a == pytest.approx(1.1)
    assert spread_widening(model, SampleConfig(calibrate=False)) == (1.0, None)
    model.calibration = {k: v for k, v in cal.items() if k != "final_band_gains"}
    with pytest.raises(ValueError, match="calibrate_to='bands'.*--recalibrate.*calibrate_to=spread"):
        spread_widening(model, SampleConfig())
    a, g = spread_widening(model, dc.replace(SampleConfig(), calibrate_to="spread"))
    assert a == 1.0 and np.allclose(g, np.array([1.2, 1.3, 2.4]) * 1.05 / 1.1)
    # never calibrated (no validation days: training warned): the saved α, no band gains
    bare = SimpleNamespace(regression_inflation=torch.tensor(1.0), regression_bands=torch.zeros(0),
                           calibration=None)
    assert spread_widening(bare, SampleConfig()) == (1.0, None)


def test_widening_fitted_for_another_sampler_warns_with_the_refit():
    """Sampling with other steps, spacing, fusion or projection than the widening was fitted
    for warns, naming both and the `--recalibrate --set` that refits it; the same sampler,
    or no record (an older calibration), is silent; a joint model's record is checked too."""
    import dataclasses as dc
    import warnings
    from types import SimpleNamespace
    from fastds.config import SampleConfig
    from fastds.sampling.day import spread_widening
    from fastds.sampling.spread import sampler_record
    fitted = SampleConfig(sampler="dpmpp", steps=5, spacing="leading")
    cal = {"final_band_gains": [0.7, 0.8, 1.5], "sampler": sampler_record(fitted)}
    model = SimpleNamespace(regression_inflation=torch.tensor(1.2),
                            regression_bands=torch.tensor([1.2, 1.3, 2.4]), calibration=cal)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        spread_widening(model, dc.replace(fitted, members=4, stride=8))  # not what the widening fits
        spread_widening(SimpleNamespace(**{**vars(model), "calibration": {"final_band_gains": [1.0] * 3}}),
                        dc.replace(fitted, spacing="karras"))
    with pytest.warns(UserWarning, match=r"fitted for spacing='leading' and is applied to "
                                         r"spacing='karras-linear'.*--recalibrate --set sample.spacing=karras-linear`") as seen:
        spread_widening(model, dc.replace(fitted, spacing="karras-linear"))
    # attributed to the line that asked for the sampling, not to fastds's internals, however
    # deep inside them the widening is looked up (a day's sampling reaches it four calls down)
    assert [w.filename for w in seen] == [__file__]
    from fastds.sampling.day import _widened
    flat = SimpleNamespace(regression_inflation=torch.tensor(1.0), regression_bands=torch.ones(6),
                           regression_scale=torch.tensor(1.0),
                           calibration={"final_band_gains": [1.0] * 6, "texture_gain": 1.0,
                                        "state_nodes": [0.0], "state_gains": [1.0],
                                        "sampler": sampler_record(fitted)})
    with pytest.warns(UserWarning, match="spacing='karras'") as seen:
        _widened(flat, np.zeros((2, 12, 12)), dc.replace(fitted, spacing="karras"), 0, 1, np.zeros((1, 12, 12)))
    assert [w.filename for w in seen] == [__file__]
    with pytest.warns(UserWarning, match=r"steps=5, projection=True .*steps=7, projection=False.*"
                                         r"--set sample.steps=7 --set sample.consistency=false"):
        spread_widening(model, dc.replace(fitted, steps=7, consistency=False))
    joint = SimpleNamespace(regression_inflation=torch.tensor([1.2, 1.1]), regression_bands=torch.zeros(0),
                            channels=2, calibration={"species": [None, None], "sampler": sampler_record(fitted)})
    with pytest.warns(UserWarning, match="spacing='leading'"):
        spread_widening(joint, dc.replace(fitted, spacing="trailing", calibrate_bands=False))


def test_spread_scale_multiplies_every_widening_and_never_the_calibration():
    """``sample.spread_scale`` multiplies what the calibration chose (every band gain, one α,
    or the α = 1 of an uncalibrated residual); the calibration itself always samples at 1, so
    a user's factor never feeds back into the fit."""
    import dataclasses as dc
    from types import SimpleNamespace
    from fastds.config import SampleConfig, load_config
    from fastds.sampling.day import spread_widening
    from fastds.training.stages import calibration_sampler
    cal = {"inflations": [1.0, 1.1, 1.2], "band_factor": 1.1, "spread_skill_bands": [0.9, 1.1, 1.2],
           "inflation": 1.2, "spread_skill": [0.8, 1.0, 1.2], "final_band_gains": [0.7, 0.8, 1.5]}
    model = SimpleNamespace(regression_inflation=torch.tensor(1.2),
                            regression_bands=torch.tensor([1.2, 1.3, 2.4]), calibration=cal)
    cfg = SampleConfig(spread_scale=0.8)
    a, g = spread_widening(model, cfg)
    assert a == pytest.approx(0.8) and np.allclose(g, 0.8 * np.array([0.7, 0.8, 1.5]))
    a, g = spread_widening(model, dc.replace(cfg, calibrate_bands=False))
    assert g is None and a == pytest.approx(0.8 * 1.1)
    a, g = spread_widening(model, dc.replace(cfg, calibrate=False))
    assert g is None and a == pytest.approx(0.8)
    conf = load_config("tiny")
    conf = dc.replace(conf, sample=dc.replace(conf.sample, spread_scale=0.5))
    assert calibration_sampler(conf).spread_scale == 1.0
    assert calibration_sampler(conf, kind="distill").spread_scale == 1.0
    from fastds.training.stages import _sample_cfg  # the U-Net's days inside training
    assert _sample_cfg(conf).spread_scale == 1.0


def _synthetic_calibration_days(rng, days, members=8, H=48, W=56):
    """Calibration days for the widening fits without a model: an identity anchor, no
    projection, independent members; zero U-Net means, white-noise truths and members.
    Returns (fd, cfg, pick, unit band gains, means, truths, members' residuals)."""
    from types import SimpleNamespace
    from fastds.sampling.spread import BAND_SIGMAS
    fd = SimpleNamespace(anchor=SimpleNamespace(inverse=lambda z, mu, season: z), cidx=np.arange(days),
                         mu_at=lambda c: None, season=3)
    # the coarse field on the fine grid: a smooth ramp in x, shifted day by day
    ramp = np.linspace(0.0, 1.0, W)[None].repeat(H, 0)
    fd.coarse_on_fine = lambda e: ((ramp + 0.1 * int(e)) % 1.3)[None]
    truth = [rng.standard_normal((H, W)) for _ in range(days)]
    noise = [rng.standard_normal((members, H, W)) for _ in range(days)]
    return (fd, SimpleNamespace(antithetic=False), np.arange(days), np.ones(len(BAND_SIGMAS) + 1),
            [np.zeros((H, W))] * days, truth, noise)


def test_final_band_gains_match_each_bands_spread_to_its_error():
    """The post-projection band fit on synthetic days: truth white noise, members drawn alike
    but with their spread off. Spread off by one factor everywhere (2×): the fitted gains
    undo it (≈ 0.5, every band). Off by a different factor per band: each band's
    spread/skill ends near 1. A band the members cannot fill (their coarsest band removed,
    as a projection empties the coarse cell's mean): its gain stops at the upper limit."""
    from fastds.sampling.spread import band_split, filter_bands
    from fastds.training.stages import FINAL_BAND_LIMITS, final_band_gains
    fd, cfg, pick, ones, mean_z, truth, noise = _synthetic_calibration_days(np.random.default_rng(0), 12)

    def fit(res):
        return final_band_gains(fd, pick, mean_z, res, truth, ones, cfg, None, None, False)
    g, ratio = fit([2.0 * n for n in noise])
    # the coarsest band has few independent values per day: looser there
    np.testing.assert_allclose(g[:-1], 0.5, rtol=0.06)
    np.testing.assert_allclose(g[-1], 0.5, rtol=0.15)
    np.testing.assert_allclose(ratio, 1.0, atol=0.03)
    g, ratio = fit([filter_bands(n, [2.0, 1.5, 1.0, 0.6, 0.5, 1.0]) for n in noise])
    np.testing.assert_allclose(ratio[:-1], 1.0, atol=0.04)
    np.testing.assert_allclose(ratio[-1], 1.0, atol=0.1)
    assert g[0] < 0.7 and g[4] > 1.4  # undone the way round it was off
    g, _ = fit([n - band_split(n)[-1] for n in noise])
    assert g[-1] == FINAL_BAND_LIMITS[1] and (g >= FINAL_BAND_LIMITS[0]).all()


def test_grid_texture_is_the_radial_grid_scale_and_widen_scales_it():
    """grid_texture keeps a wave above the band's top, drops one below its bottom and takes
    the ramp's share between (on a 2-D wave of radial wavenumber k, whatever its direction:
    along an axis or diagonal), with no edge of its own on a non-periodic field; it is
    linear. widen(..., texture=κ) adds (κ − 1) times that part of the widened spread, keeps
    the antithetic pairs' means, and κ = 1 is the plain widening."""
    from fastds.sampling.spread import TEXTURE_BAND, filter_bands, grid_texture, widen
    H, W = 61, 74  # odd, and no wave below fits either side a whole number of times
    y, x = np.mgrid[0:H, 0:W].astype(np.float64)
    lo, hi = TEXTURE_BAND
    inner = (slice(6, -6), slice(6, -6))
    for k, share in ((0.48, 1.0), (0.2, 0.0), (0.5 * (lo + hi), 0.5)):
        for angle in (0.0, np.pi / 4, 0.3):
            wave = np.cos(2 * np.pi * k * (np.cos(angle) * x + np.sin(angle) * y) + 0.7)
            got = grid_texture(wave)
            # a plane wave of one wavenumber: the filter's gain at k (finite-window leakage aside)
            np.testing.assert_allclose(got[inner], share * wave[inner], atol=0.12)
    rng = np.random.default_rng(3)
    a, b = rng.standard_normal((2, 2, 30, 40))
    np.testing.assert_allclose(grid_texture(a + 2 * b), grid_texture(a) + 2 * grid_texture(b), atol=1e-12)
    assert grid_texture(np.ones((30, 40))).max() < 1e-12  # a constant has no texture, edges included
    r = rng.standard_normal((4, 30, 40))
    g = np.array([0.7, 0.65, 0.9, 1.8, 3.0, 4.0])
    plain = widen(r, gains=g, antithetic=True)
    np.testing.assert_array_equal(widen(r, gains=g, texture=1.0, antithetic=True), plain)
    w = widen(r, gains=g, texture=1.4, antithetic=True)
    np.testing.assert_allclose(w[0] + w[1], r[0] + r[1], atol=1e-12)  # pair means kept
    half = filter_bands(0.5 * (r[0] - r[1]), g)
    np.testing.assert_allclose(0.5 * (w[0] - w[1]), half + 0.4 * grid_texture(half), atol=1e-12)
    assert widen(r.astype(np.float32), gains=g, texture=1.4).dtype == np.float32


def test_texture_gain_matches_the_members_grid_scale_power_to_the_truths():
    """The texture fit on synthetic days: truth white noise, members drawn alike but with
    their grid-scale part at half its amplitude: κ ≈ 2, and the members' grid-scale power
    then matches the truth's; members with the truth's texture get κ ≈ 1."""
    from fastds.sampling.spread import grid_texture
    from fastds.training.stages import texture_gain
    fd, cfg, pick, ones, mean_z, truth, noise = _synthetic_calibration_days(np.random.default_rng(1), 6)
    truth[0][:3, :5] = np.nan  # unknown pixels: filled, not counted
    kappa, power = texture_gain(fd, pick, mean_z, [n - 0.5 * grid_texture(n) for n in noise], truth, ones, cfg,
                                None, None)
    assert abs(kappa - 2.0) < 0.1 and abs(power - 1.0) < 0.05
    kappa, _ = texture_gain(fd, pick, mean_z, noise, truth, ones, cfg, None, None)
    assert abs(kappa - 1.0) < 0.05


def test_texture_widening_reads_the_calibration_where_the_band_gains_apply():
    """texture_widening: the saved gain under the default settings (a joint model's per
    species), 1 when another widening is asked for or calibrate_texture is off, and 1 with a
    warning naming the refit for a calibration that predates it."""
    import dataclasses as dc
    from types import SimpleNamespace
    from fastds.config import SampleConfig
    from fastds.sampling.day import texture_widening
    cfg = SampleConfig()
    model = SimpleNamespace(calibration={"final_band_gains": [1.0] * 6, "texture_gain": 1.3})
    np.testing.assert_array_equal(texture_widening(model, cfg), [1.3])
    for off in ({"calibrate_texture": False}, {"calibrate_to": "spread"}, {"calibrate_bands": False},
                {"calibrate": False}):
        np.testing.assert_array_equal(texture_widening(model, dc.replace(cfg, **off)), [1.0])
    joint = SimpleNamespace(calibration={"species": [{"texture_gain": 1.2}, {"texture_gain": 0.9}]})
    np.testing.assert_array_equal(texture_widening(joint, cfg, 2), [1.2, 0.9])
    np.testing.assert_array_equal(texture_widening(SimpleNamespace(), cfg), [1.0])  # not calibrated
    old = SimpleNamespace(calibration={"final_band_gains": [1.0] * 6})
    with pytest.warns(UserWarning, match="--recalibrate"):
        np.testing.assert_array_equal(texture_widening(old, cfg), [1.0])


def test_state_gain_is_piecewise_linear_in_the_coarse_field_and_widen_applies_it_last():
    """state_nodes: the medians of equal-count bins, strictly increasing, ties merged (a
    constant field gets one node); state_bin: the nearest node; state_gain interpolates
    between the nodes and is flat beyond them. widen(..., state=s) multiplies the widened spread by s pixel by pixel,
    keeps the antithetic pairs' means and the dtype; a field of ones is the plain widening."""
    from fastds.sampling.spread import (STATE_BINS, filter_bands, grid_texture, state_bin, state_gain,
                                        state_nodes, widen)
    rng = np.random.default_rng(5)
    v = rng.uniform(0, 1, 5000)
    nodes = state_nodes(v)
    assert len(nodes) == STATE_BINS and np.diff(nodes).min() > 0
    np.testing.assert_allclose(nodes, [0.1, 0.3, 0.5, 0.7, 0.9], atol=0.03)
    np.testing.assert_allclose(np.bincount(state_bin(v, nodes)), 1000, rtol=0.06)  # about equal counts
    two = state_nodes(np.r_[np.zeros(70), np.ones(30)])
    assert two[0] == 0.0 and two[-1] == 1.0 and np.diff(two).min() > 0
    np.testing.assert_array_equal(state_bin([0.0, 0.2, 1.0], two), [0, 0, len(two) - 1])
    np.testing.assert_array_equal(state_nodes(np.full(10, 0.4)), [0.4])
    np.testing.assert_array_equal(state_bin([0.0, 3.0], [0.4]), [0, 0])
    np.testing.assert_allclose(state_gain(np.array([-1.0, 0.0, 0.5, 1.0, 3.0]), [0.0, 1.0], [2.0, 4.0]),
                               [2.0, 2.0, 3.0, 4.0, 4.0])
    assert state_gain(np.zeros((2, 3)), [0.4], [1.7]).tolist() == [[1.7] * 3] * 2
    r = rng.standard_normal((4, 30, 40))
    g = np.array([0.7, 0.65, 0.9, 1.8, 3.0, 4.0])
    s = 0.5 + rng.uniform(0, 1, (30, 40))
    plain = widen(r, gains=g, texture=1.3, antithetic=True)
    np.testing.assert_array_equal(widen(r, gains=g, texture=1.3, state=np.ones((30, 40)), antithetic=True), plain)
    w = widen(r, gains=g, texture=1.3, state=s, antithetic=True)
    np.testing.assert_allclose(w[2] + w[3], r[2] + r[3], atol=1e-12)  # pair means kept
    half = filter_bands(0.5 * (r[2] - r[3]), g)
    np.testing.assert_allclose(0.5 * (w[2] - w[3]), s * (half + 0.3 * grid_texture(half)), atol=1e-12)
    np.testing.assert_allclose(widen(r, 1.5, state=s), 1.5 * s * r, atol=1e-12)  # independent members
    assert widen(r.astype(np.float32), gains=g, state=s).dtype == np.float32


def test_state_gains_match_the_spread_to_the_error_in_each_coarse_bin():
    """The coarse-state fit on synthetic days: truth white noise, members whose spread grows
    with the coarse field (0.5 + c): the gains fall with c, about 1 / (0.5 + c) at the
    nodes, and every bin's spread/skill ends near 1; members that are right everywhere get
    gains near 1. Unknown truth pixels count in no bin."""
    from fastds.training.stages import state_gains
    fd, cfg, pick, ones, mean_z, truth, noise = _synthetic_calibration_days(np.random.default_rng(2), 10)
    truth[0][:4, :6] = np.nan
    res = [n * (0.5 + fd.coarse_on_fine(e)[0]) for e, n in zip(pick, noise)]
    nodes, g, ratio = state_gains(fd, pick, mean_z, res, truth, ones, 1.0, cfg, None, None, False)
    assert len(nodes) == 5 and np.diff(g).max() < 0
    np.testing.assert_allclose(g, 1.0 / (0.5 + nodes), rtol=0.08)
    np.testing.assert_allclose(ratio, 1.0, atol=0.04)
    _, g, _ = state_gains(fd, pick, mean_z, noise, truth, ones, 1.0, cfg, None, None, False)
    np.testing.assert_allclose(g, 1.0, atol=0.05)


def test_rollout_state_factors_reshape_the_spread_and_keep_its_total():
    """The rollout refit of the state gains on synthetic rolled-out days: truth white noise,
    members whose spread grows with the coarse field (0.5 + c). The factors fall as
    1 / (0.5 + c) at the nodes, up to one common factor that keeps the pooled spread what it
    was; members right everywhere get factors near 1. The returned spread/skill is the one
    before the refit."""
    from fastds.metrics.ensemble import calibrated_variance
    from fastds.sampling.spread import state_bin, state_gain, state_nodes
    from fastds.training.stages import rollout_state_factors
    fd, cfg, pick, _, mean_z, truth, noise = _synthetic_calibration_days(np.random.default_rng(4), 10)
    levels = [fd.coarse_on_fine(e)[0] for e in pick]
    nodes = state_nodes(np.concatenate(levels))
    record = [(e, m, n * (0.5 + c), t, c) for e, m, n, t, c in zip(pick, mean_z, noise, truth, levels)]
    f, before = rollout_state_factors(fd, record, nodes, cfg, None, None, False)
    np.testing.assert_allclose(before, 0.5 + nodes, rtol=0.08)
    shape = f * (0.5 + nodes)
    assert np.ptp(shape) / shape.mean() < 0.1 and np.diff(f).max() < 0
    pooled = lambda g: sum(calibrated_variance(r * state_gain(c, nodes, g)) for _, _, r, _, c in record)  # noqa: E731
    np.testing.assert_allclose(pooled(f), pooled(np.ones_like(f)), rtol=0.03)
    right = [(e, m, n, t, c) for e, m, n, t, c in zip(pick, mean_z, noise, truth, levels)]
    f, _ = rollout_state_factors(fd, right, nodes, cfg, None, None, False)
    np.testing.assert_allclose(f, 1.0, atol=0.05)
    assert len(np.unique(state_bin(np.concatenate(levels), nodes))) == len(nodes)


def test_state_widening_reads_the_calibration_where_the_texture_gain_applies():
    """state_widening: off by default; asked for, the saved gains on the day's coarse field
    (a joint model's per species, each on its own coarse channel); None when another
    widening is asked for or calibrate_state is off; None with a warning naming the refit
    for a calibration that has the texture gain but predates the state gains."""
    import dataclasses as dc
    from types import SimpleNamespace
    from fastds.config import SampleConfig
    from fastds.sampling.day import state_widening
    cfg = SampleConfig(calibrate_state=True)
    coarse = np.array([[[0.0, 0.5, 1.0]], [[1.0, 1.0, 0.0]]])  # (K, H, W)
    one = {"final_band_gains": [1.0] * 6, "texture_gain": 1.3, "state_nodes": [0.0, 1.0], "state_gains": [2.0, 1.0]}
    model = SimpleNamespace(calibration=one)
    assert state_widening(model, SampleConfig(), coarse[:1]) == [None]  # off by default
    np.testing.assert_allclose(state_widening(model, cfg, coarse[:1])[0], [[2.0, 1.5, 1.0]])
    for off in ({"calibrate_state": False}, {"calibrate_texture": False}, {"calibrate_to": "spread"},
                {"calibrate_bands": False}, {"calibrate": False}):
        assert state_widening(model, dc.replace(cfg, **off), coarse[:1]) == [None]
    other = dict(one, state_nodes=[0.0, 2.0], state_gains=[1.0, 3.0])
    joint = SimpleNamespace(calibration={"species": [one, other]})
    got = state_widening(joint, cfg, coarse)
    np.testing.assert_allclose(got[0], [[2.0, 1.5, 1.0]])
    np.testing.assert_allclose(got[1], [[2.0, 2.0, 1.0]])
    assert state_widening(SimpleNamespace(), cfg, coarse[:1]) == [None]  # not calibrated
    older = SimpleNamespace(calibration={"final_band_gains": [1.0] * 6})  # the texture gain's warning covers it
    assert state_widening(older, cfg, coarse[:1]) == [None]
    old = SimpleNamespace(calibration={"final_band_gains": [1.0] * 6, "texture_gain": 1.3})
    with pytest.warns(UserWarning, match="calibrate_state=false"):
        assert state_widening(old, cfg, coarse[:1]) == [None]


def test_precision_auto_follows_the_hardware(monkeypatch):
    """``sample.precision="auto"``: bf16 where the CPU has AVX512-BF16 or AMX-BF16 (a CUDA
    device: native bf16), fp32 elsewhere, with the reason; explicit settings stay."""
    from fastds import _backend
    for flags, want in (({"avx512f", "avx512_bf16"}, "bf16"), ({"amx_bf16"}, "bf16"), ({"avx2", "fma"}, "fp32")):
        monkeypatch.setattr(_backend, "_cpu_flags", lambda flags=flags: set(flags))
        _backend.bf16_native.cache_clear()
        assert _backend.resolve_precision("auto", "cpu") == want
        assert _backend.resolve_precision("fp32", "cpu") == "fp32"
        assert _backend.resolve_precision("bf16", "cpu") == "bf16"
    assert "AVX512-BF16" in _backend.bf16_native("cpu")
    _backend.bf16_native.cache_clear()


def test_cpuinfo_reader_serves_flags_and_model_from_the_first_processor(tmp_path, monkeypatch):
    """One reader of /proc/cpuinfo: the first processor's flags and model name (a later
    processor's differing lines are not mixed in); unreadable gives no flags and the model
    name ``platform`` knows."""
    import platform
    from fastds import _backend
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nmodel name\t: Test CPU 9000\nflags\t\t: fpu avx2 amx_bf16\n\n"
                    "processor\t: 1\nmodel name\t: Other CPU\nflags\t\t: fpu\n\n")
    assert _backend._cpuinfo(str(info)) == {"processor": "0", "model name": "Test CPU 9000",
                                            "flags": "fpu avx2 amx_bf16"}
    assert _backend._cpuinfo(str(tmp_path / "missing")) == {}
    real = _backend._cpuinfo
    monkeypatch.setattr(_backend, "_cpuinfo", lambda: real(str(info)))
    assert _backend._cpu_flags() == {"fpu", "avx2", "amx_bf16"} and _backend.cpu_model() == "Test CPU 9000"
    monkeypatch.setattr(_backend, "_cpuinfo", lambda: {})
    assert _backend._cpu_flags() == set()
    assert _backend.cpu_model() == (platform.processor() or platform.machine())


def test_karras_linear_is_karras_at_high_noise_then_even_in_t():
    """sample.spacing = "karras-linear": karras' steps while t ≥ T/2 (the same timesteps), then
    steps even in t (within rounding) from the last of them down to t = 0; 5 steps give
    991, 965, 802, 401, 0; refused where two steps would share a timestep."""
    from fastds.sampling.steps import karras_linear_timesteps, karras_timesteps, timesteps
    T = 1000
    ab = alpha_bar_for(T)
    assert karras_linear_timesteps(ab, 5)[0].tolist() == [991, 965, 802, 401, 0]
    assert karras_linear_timesteps(ab, 1)[0].tolist() == [991]  # one step: from σ_max to σ = 0
    for n in (2, 4, 5, 7, 10, 20):
        ts, prev = karras_linear_timesteps(ab, n)
        kt = karras_timesteps(ab, n)[0]
        high = kt[kt >= T // 2]
        assert len(ts) == n and ts[0] == 991 and ts[-1] == 0 and np.all(np.diff(ts) < 0)
        assert ts[:len(high)].tolist() == high.tolist() and prev.tolist() == ts[1:].tolist() + [-1]
        gaps = -np.diff(ts[len(high) - 1:])
        assert gaps.max() - gaps.min() <= 1, (n, ts)
        assert make_plan("dpmpp", T=T, steps=n, spacing="karras-linear").timesteps.tolist() == ts.tolist()
    with pytest.raises(ValueError, match="spacing 'karras' puts two of its 200 steps"):
        karras_linear_timesteps(ab, 200)  # karras' own steps collide first
    with pytest.raises(ValueError, match="needs the schedule's alpha_bar"):
        timesteps(T, 5, "karras-linear")


@pytest.mark.parametrize("spacing, flag", [("karras", "use_karras_sigmas"), ("logsnr", "use_lu_lambdas")])
@pytest.mark.parametrize("steps", [4, 5])
def test_noise_level_spacings_step_where_diffusers_does(spacing, flag, steps):
    """sample.spacing "karras" (EDM's σ^(1/7) ramp) and "logsnr" (Lu et al.'s uniform λ):
    uncapped, each of our integer timesteps is the nearest to the fractional t at which
    diffusers' DPMSolverMultistepScheduler puts its σ; as shipped they start at EDM's σ_max =
    80 (t = 991 on the cosine schedule), not at its capped last step (σ ≈ 2·10⁴, where
    uncapped spacings put their first steps on t = 999, 998, ... and collide from 10 steps),
    and the DPM-Solver++ plan steps on them."""
    from fastds.sampling.samplers import alpha_bar_for
    from fastds.sampling.steps import SIGMA_MAX, SPACINGS
    T = 1000
    sched = diffusers.DPMSolverMultistepScheduler(num_train_timesteps=T, beta_schedule="squaredcos_cap_v2",
                                                  **{flag: True})
    sched.set_timesteps(steps)
    theirs = np.log(sched.sigmas[:-1].double().numpy())
    ab = alpha_bar_for(T)
    log_sigma = 0.5 * (np.log1p(-ab) - np.log(ab))
    ts, prev = SPACINGS[spacing](ab, steps, sigma_max=np.inf)
    assert ts[0] == T - 1 and ts[-1] == 0 and prev[-1] == -1 and np.all(np.diff(ts) < 0)
    lo, hi = log_sigma[np.maximum(ts - 1, 0)], log_sigma[np.minimum(ts + 1, T - 1)]
    assert np.all((lo <= theirs + 1e-5) & (theirs <= hi + 1e-5)), (ts, np.exp(theirs))
    shipped, _ = SPACINGS[spacing](ab, steps)
    assert shipped[0] == round(float(np.interp(np.log(SIGMA_MAX), log_sigma, np.arange(T)))) == 991
    assert make_plan("dpmpp", T=T, steps=steps, spacing=spacing).timesteps.tolist() == shipped.tolist()
    for n in (10, 20):
        assert np.all(np.diff(SPACINGS[spacing](ab, n)[0]) < 0)
    with pytest.raises(ValueError, match=f"spacing '{spacing}' puts two of its 200 steps on one timestep"):
        SPACINGS[spacing](ab, 200)
