"""Distilled few-step sampling: the student's training target is the teacher's sample from the
same latents on the student's own DDIM grid, the student trains and samples through the run
(frozen parts untouched), and its calibration uses its own sampler."""
import dataclasses
import shutil

import numpy as np
import pytest
import torch

from fastds.runs import distill_settings, load_checkpoint, load_trained, season_dir
from fastds.training.distill import trajectory_loss as _distill_loss
from fastds.training.stages import training_sets


def _batch(trained_run, store_path, config, n=8):
    from torch.utils.data import default_collate

    from fastds.data.store import open_store
    train_set, _ = training_sets(open_store(store_path), 3, config)
    return default_collate([train_set[i] for i in range(n)])


def _with(config, **sample):
    return dataclasses.replace(config, sample=dataclasses.replace(config.sample, **sample))


def test_a_student_equal_to_a_one_step_teacher_has_zero_loss(trained_run, store_path, tiny_config):
    """With the teacher's sampler on the student's own grid (1 trailing DDIM step), the
    teacher's sample from x_T is its own x0 prediction at τ = T - 1: a student with the
    teacher's weights meets its target exactly. With the shipped 5-step DPM-Solver++ teacher
    it does not, and the loss is the squared gap between the two samplers' outputs."""
    teacher, config = load_trained(trained_run, 3, "ddpm")
    b = _batch(trained_run, store_path, config)
    one_step = _with(config, sampler="ddim", steps=1, spacing="trailing", eta=0.0)
    loss = _distill_loss(teacher, one_step)(teacher, b, torch.Generator().manual_seed(0))
    assert float(loss) < 1e-10
    from fastds.sampling.samplers import make_plan, run_plan
    shipped = _distill_loss(teacher, config)(teacher, b, torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        cond = teacher.cond(b["coarse"], b["covariates"], b["lags"], b.get("drop"))
        x_T = torch.randn(b["target"].shape, generator=g)
        sc, d = config.sample, config.diffusion
        want = run_plan(teacher, x_T, make_plan(sc.sampler, T=d.T, steps=sc.steps, prediction=d.prediction,
                                                spacing=sc.spacing), cond=cond)
        got = run_plan(teacher, x_T, make_plan("ddim", T=d.T, steps=1, prediction=d.prediction,
                                               spacing="trailing"), cond=cond)
    assert float(shipped) == pytest.approx(float(torch.mean((got - want) ** 2)), rel=1e-4)
    assert float(shipped) > 1e-4
    with pytest.raises(ValueError, match="distill_steps must be >= 1"):
        _distill_loss(teacher, dataclasses.replace(config, train=dataclasses.replace(config.train, distill_steps=0)))


@pytest.fixture(scope="module")
def distilled(trained_run, store_path, tiny_config, tmp_path_factory):
    from fastds.training.stages import train
    run = tmp_path_factory.mktemp("distill") / "run"
    shutil.copytree(trained_run, run)
    config = dataclasses.replace(tiny_config, train=dataclasses.replace(tiny_config.train, distill_steps=2,
                                                                        distill_epochs=1))
    before = load_checkpoint(season_dir(run, 3) / "ddpm.best.pt")["ema"]
    train(data=store_path, run=run, config=config, model="distill", progress=False)
    return run, config, before


def test_the_student_trains_from_the_teacher_and_leaves_its_frozen_parts(distilled):
    run, config, before = distilled
    teacher, _ = load_trained(run, 3, "ddpm")
    student, sconf = load_trained(run, 3, "distill")
    assert sconf.train.distill_steps == 2
    # the teacher's checkpoint is untouched
    for k, v in load_checkpoint(season_dir(run, 3) / "ddpm.best.pt")["ema"].items():
        assert torch.equal(v, before[k]), k
    ts, ss = teacher.state_dict(), student.state_dict()
    frozen = [k for k in ts if k.startswith(("transfer.", "regression.")) or k == "regression_scale"]
    assert frozen and all(torch.equal(ts[k], ss[k]) for k in frozen)
    moved = [k for k in ts if k.startswith("net.") and not torch.equal(ts[k], ss[k])]
    assert moved, "the student's network did not train"
    ck = load_checkpoint(season_dir(run, 3) / "distill.best.pt")
    assert ck["kind"] == "distill"
    cal = ck["calibration"]
    assert cal["sampler"]["sampler"] == "ddim" and cal["sampler"]["steps"] == 2
    assert cal["sampler"]["spacing"] == "trailing"


def test_the_student_samples_on_its_own_grid_through_the_rollout(distilled):
    from fastds.sampling.pipeline import sample
    run, config, _ = distilled
    kw = dict(start="2005-08-20", end="2005-08-21", members=2, mode="lenient", model="distill")
    a = sample(run=run, **kw)
    assert a.attrs["sampler"] == "ddim" and a.attrs["steps"] == 2 and a.attrs["spacing"] == "trailing"
    v = a["DUEXTTAU"].values
    assert np.isfinite(v).all() and (v > 0).all()
    np.testing.assert_array_equal(v, sample(run=run, **kw)["DUEXTTAU"].values)
    # a different network from the teacher's, on the same latents
    t = sample(run=run, **{**kw, "model": "ddpm"})["DUEXTTAU"].values
    assert not np.allclose(v, t)
    assert distill_settings(config.sample, config).steps == 2


def test_recalibrate_refits_the_student_with_its_own_sampler(distilled):
    """``recalibrate(model="distill")`` refits the student's widening with the student's
    grid and leaves the teacher's calibration alone; a non-diffusion model is refused."""
    from fastds.training.stages import recalibrate
    run, config, _ = distilled
    teacher_cal = load_checkpoint(season_dir(run, 3) / "ddpm.best.pt")["calibration"]
    before = load_checkpoint(season_dir(run, 3) / "distill.best.pt")["calibration"]
    out = recalibrate(run, season=3, model="distill")
    after = load_checkpoint(season_dir(run, 3) / "distill.best.pt")["calibration"]
    assert after["sampler"]["sampler"] == "ddim" and after["sampler"]["steps"] == 2
    assert out[3]["inflation"] == pytest.approx(after["inflation"])
    # the same student, data and seeds: the refit reproduces the fit made at training time
    assert after["inflation"] == pytest.approx(before["inflation"])
    assert load_checkpoint(season_dir(run, 3) / "ddpm.best.pt")["calibration"] == teacher_cal
    with pytest.raises(ValueError, match="model='unet'"):
        recalibrate(run, season=3, model="unet")


def test_progressive_rounds_halve_the_grid_down_to_the_student(tiny_config):
    from fastds.training.distill import distill_rounds

    def rounds(first, steps):
        return distill_rounds(dataclasses.replace(tiny_config, train=dataclasses.replace(
            tiny_config.train, distill_teacher_steps=first, distill_steps=steps)))
    assert rounds(8, 1) == [(8, 4), (4, 2), (2, 1)]
    assert rounds(8, 2) == [(8, 4), (4, 2)]
    assert rounds(2, 1) == [(2, 1)]
    for first, steps in ((6, 1), (1, 1), (8, 8), (12, 4)):
        with pytest.raises(ValueError, match="distill_teacher_steps"):
            rounds(first, steps)
    with pytest.raises(ValueError, match="distill_steps must be >= 1"):
        rounds(8, 0)


def test_progressive_target_is_where_one_student_step_meets_two_teacher_steps():
    """The target x̃ puts the student's one deterministic DDIM step (t -> end) exactly where
    the teacher's two (t -> mid -> end) land, for any teacher; a teacher whose x̂0 is the same
    everywhere is its own one-step student (x̃ = that x̂0)."""
    from fastds.training.distill import _ddim, progressive_target
    g = torch.Generator().manual_seed(3)
    z = torch.randn(5, 1, 6, 7, generator=g, dtype=torch.float64)
    ab_t = torch.tensor([0.01, 0.2, 0.5, 1e-4, 0.3], dtype=torch.float64).view(-1, 1, 1, 1)
    ab_mid = torch.tensor([0.3, 0.5, 0.8, 0.2, 0.6], dtype=torch.float64).view(-1, 1, 1, 1)
    ab_end = torch.tensor([0.7, 1.0, 0.95, 1.0, 0.9], dtype=torch.float64).view(-1, 1, 1, 1)

    def teacher(x, which):  # any nonlinear x̂0, different at the two times
        return torch.tanh(x) * 0.5 + 0.1 * which + 0.2 * x ** 2

    target = progressive_target(teacher, z, ab_t, ab_mid, ab_end)
    mid = _ddim(z, teacher(z, 0), ab_t, ab_mid)
    two_steps = _ddim(mid, teacher(mid, 1), ab_mid, ab_end)
    torch.testing.assert_close(_ddim(z, target, ab_t, ab_end), two_steps, rtol=1e-9, atol=1e-9)
    c = torch.randn(5, 1, 6, 7, generator=g, dtype=torch.float64)
    torch.testing.assert_close(progressive_target(lambda x, i: c, z, ab_t, ab_mid, ab_end), c,
                               rtol=1e-9, atol=1e-9)


def test_progressive_distillation_trains_round_by_round(trained_run, store_path, tiny_config, tmp_path):
    """``distill_method="progressive"``: the DDPM on 4 DDIM steps, a 2-step round
    (``distill-r0``), then the 1-step student (``distill``) from it; each round starts from its
    teacher and keeps the DDPM's frozen parts; the student samples on its own grid."""
    from fastds.sampling.pipeline import sample
    from fastds.training.stages import train
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    config = dataclasses.replace(tiny_config, train=dataclasses.replace(
        tiny_config.train, distill_method="progressive", distill_teacher_steps=4, distill_steps=1,
        distill_epochs=1))
    train(data=store_path, run=run, config=config, model="distill", progress=False)
    r0 = load_checkpoint(season_dir(run, 3) / "distill-r0.best.pt")
    final = load_checkpoint(season_dir(run, 3) / "distill.best.pt")
    assert r0["kind"] == "distill-r0" and final["kind"] == "distill"
    assert final["calibration"]["sampler"]["steps"] == 1
    teacher, _ = load_trained(run, 3, "ddpm")
    middle, _ = load_trained(run, 3, "distill-r0")
    student, _ = load_trained(run, 3, "distill")
    ts, ms, ss = teacher.state_dict(), middle.state_dict(), student.state_dict()
    frozen = [k for k in ts if k.startswith(("transfer.", "regression.")) or k == "regression_scale"]
    assert frozen and all(torch.equal(ts[k], ss[k]) and torch.equal(ts[k], ms[k]) for k in frozen)
    nets = [k for k in ts if k.startswith("net.")]
    assert any(not torch.equal(ts[k], ms[k]) for k in nets) and any(not torch.equal(ms[k], ss[k]) for k in nets)
    v = sample(run=run, start="2005-08-20", end="2005-08-20", members=2, mode="lenient",
               model="distill")["DUEXTTAU"].values
    assert np.isfinite(v).all() and (v > 0).all()
    with pytest.raises(ValueError, match="train.distill_method"):
        train(data=store_path, run=run, progress=False, model="distill", config=dataclasses.replace(
            config, train=dataclasses.replace(config.train, distill_method="consistency")))
