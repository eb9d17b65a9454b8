"""Several species: the twin's correlated species, a store of several, each species selected
for training and sampling, and the errors that name the file and the variable."""
import json

import numpy as np
import pandas as pd
import pytest
import torch
import xarray as xr

from fastds.data.readers import DataError
from fastds.data.store import open_store, prepare
from fastds.data.synthetic import TwinSpec, _write_nc, make_twin, write_twin
from fastds.metrics.species import correlation_bias, species_correlation

SPECIES = ("DUEXTTAU", "SSEXTTAU", "SUEXTTAU")
SPEC = TwinSpec(coarse_start="2005-01-01", coarse_end="2005-12-31", fine_start="2005-05-16",
                fine_end="2005-08-31", seed=4, species=SPECIES, total="TOTEXTTAU")
BOX = ",".join(map(str, SPEC.region.as_tuple()))


@pytest.fixture(scope="module")
def twin():
    return make_twin(SPEC)


@pytest.fixture(scope="module")
def twin_dir(tmp_path_factory, twin):
    out = tmp_path_factory.mktemp("species")
    write_twin(out, SPEC, twin=twin, native_days=4)
    return out


def _anomaly_corr(a, b):
    a = np.log10(a) - np.log10(a).mean(0)
    b = np.log10(b) - np.log10(b).mean(0)
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _lag1(a):
    a = np.log10(a) - np.log10(a).mean(0)
    return float((a[1:] * a[:-1]).mean() / (a * a).mean())


def test_species_twin_shares_transport_keeps_own_lifetimes_and_sums_to_its_total(twin):
    assert list(twin.species.values) == [*SPECIES, "TOTEXTTAU"]
    f, c = twin["fine_truth"], twin["coarse"]
    # the total is the species' sum on both grids (the coarse one: cell means are linear)
    np.testing.assert_allclose(f.sel(species="TOTEXTTAU"), f.sel(species=list(SPECIES)).sum("species"), rtol=1e-5)
    np.testing.assert_allclose(c.sel(species="TOTEXTTAU"), c.sel(species=list(SPECIES)).sum("species"), rtol=1e-5)
    summer = f.sel(time=slice("2005-06-01", "2005-08-31"))
    # dust and sulfate share the transport pattern and peak in summer: clearly correlated
    assert _anomaly_corr(summer.sel(species="DUEXTTAU").values, summer.sel(species="SUEXTTAU").values) > 0.4
    # sulfate lives longer than sea salt: its own pattern persists more from day to day
    assert _lag1(summer.sel(species="SUEXTTAU").values) > _lag1(summer.sel(species="SSEXTTAU").values)
    # each species has its own level
    means = np.log10(f).mean(("time", "lat", "lon")).values
    assert len(np.unique(np.round(means, 2))) == len(means)


def test_single_variable_twin_is_unchanged_by_the_species_option():
    one = TwinSpec(coarse_start="2005-01-01", coarse_end="2005-03-31", fine_start="2005-02-01",
                   fine_end="2005-02-28", seed=4)
    a = make_twin(one)
    assert "species" not in a.dims and one.variables == ("DUEXTTAU",)
    # the generator streams of the one-variable twin are not touched by the species code
    b = make_twin(TwinSpec(**{**one.__dict__}))
    np.testing.assert_array_equal(a["fine_truth"].values, b["fine_truth"].values)


def test_prepare_several_species_from_native_files(twin, twin_dir, tmp_path, monkeypatch):
    from fastds.data import readers
    opened, real = [], readers._open_nc
    monkeypatch.setattr(readers, "_open_nc", lambda path, what: opened.append(path) or real(path, what))
    out = prepare(coarse=twin_dir / "coarse_daily.nc", fine=twin_dir / "fine", region=BOX,
                  out=tmp_path / "s.zarr", variables=SPEC.variables, allow_gaps=True, block=1)
    # every native file is opened once for all four species (the first once more, for the grid)
    files = sorted((twin_dir / "fine").glob("*.nc4"))
    assert sorted(opened) == sorted(files + files[:1])
    st = open_store(out)
    assert st.variables == SPEC.variables and st.variable is None
    with pytest.raises(DataError, match="holds 4 species .*choose one"):
        st.fine
    for v in SPEC.variables:
        sv = st.select(v)
        got = sv.fine.dropna("time", how="all")
        assert len(got.time) == 4
        np.testing.assert_allclose(got.values, twin["fine_truth"].sel(species=v, time=got.time).values, rtol=2e-6)
        np.testing.assert_array_equal(sv.coarse.values, twin["coarse"].sel(species=v).values)
    # each species is normalised on its own
    lo = {v: st.norms_x[v].lo[3] for v in SPEC.variables}
    assert len(set(np.round(list(lo.values()), 4))) == len(lo)
    # and carries its own CF metadata
    assert "sea_salt" in st.select("SSEXTTAU").attrs["standard_name"]
    assert st.select("TOTEXTTAU").attrs["standard_name"] == \
        "atmosphere_optical_thickness_due_to_ambient_aerosol_particles"
    with pytest.raises(DataError, match="has no variable 'BCEXTTAU'; it holds DUEXTTAU"):
        st.select("BCEXTTAU")


def test_prepare_species_store_equals_single_species_stores(twin_dir, tmp_path):
    kw = dict(coarse=twin_dir / "coarse_daily.nc", fine=twin_dir / "fine_daily.nc", region=BOX,
              elevation=twin_dir / "elevation.nc")
    both = open_store(prepare(out=tmp_path / "both.zarr", variables="DUEXTTAU,SSEXTTAU", **kw))
    for v in ("DUEXTTAU", "SSEXTTAU"):
        one = open_store(prepare(out=tmp_path / f"{v}.zarr", variable=v, **kw))
        assert one.variables == (v,) and one.variable == v
        sel = both.select(v)
        np.testing.assert_array_equal(sel.fine.values, one.fine.values)
        np.testing.assert_array_equal(sel.coarse.values, one.coarse.values)
        assert sel.norm_x.to_dict() == one.norm_x.to_dict() and sel.norm_y.to_dict() == one.norm_y.to_dict()
        assert sel.attrs == one.attrs


def test_a_species_named_twice_or_missing_from_a_file_is_refused_and_nothing_is_written(twin, twin_dir, tmp_path):
    kw = dict(coarse=twin_dir / "coarse_daily.nc", region=BOX)
    with pytest.raises(ValueError, match="variable SSEXTTAU is named twice"):
        prepare(out=tmp_path / "a.zarr", fine=twin_dir / "fine_daily.nc",
                variables=["DUEXTTAU", "SSEXTTAU", "SSEXTTAU"], **kw)
    # one native fine file of a day lacks sea salt: the error names that file and the variable
    fine = tmp_path / "fine"
    fine.mkdir()
    for f in sorted((twin_dir / "fine").glob("*.nc4")):
        (fine / f.name).symlink_to(f)
    bad = sorted(fine.glob("*20050517_1200z.nc4"))[0]
    bad.unlink()
    day = twin["fine_truth"].sel(time="2005-05-17")
    _write_nc(bad, {"DUEXTTAU": day.sel(species="DUEXTTAU").values[None]}, np.array([0]),
              twin.lat.values, twin.lon.values, time_units="minutes since 2005-05-17 12:00:00",
              lat_descending=False, lon_360=False)
    with pytest.raises(DataError, match=f"{bad.name}.* has no variable 'SSEXTTAU'"):
        prepare(out=tmp_path / "b.zarr", fine=fine, variables=["DUEXTTAU", "SSEXTTAU"],
                allow_gaps=True, block=1, **kw)
    assert not (tmp_path / "a.zarr").exists() and not (tmp_path / "b.zarr").exists()
    assert not list(tmp_path.glob(".*.tmp-*"))


def test_an_unknown_variable_keeps_its_own_metadata_and_no_standard_name(twin_dir, tmp_path):
    c = xr.open_dataset(twin_dir / "coarse_daily.nc")
    f = xr.open_dataset(twin_dir / "fine_daily.nc")
    c["MYAOD"] = c["SUEXTTAU"].assign_attrs(units="1", long_name="my own AOD")
    f["MYAOD"] = f["SUEXTTAU"].assign_attrs(units="1", long_name="my own AOD")
    st = open_store(prepare(coarse=c, fine=f, region=BOX, out=tmp_path / "s.zarr",
                            variables=["DUEXTTAU", "MYAOD"]))
    assert st.select("MYAOD").attrs == {"units": "1", "long_name": "my own AOD"}
    assert "dust" in st.select("DUEXTTAU").attrs["standard_name"]


def test_a_version_1_store_still_opens(twin_dir, tmp_path):
    """Stores written before species (no species dim, one variable) open as one species."""
    st = open_store(prepare(out=tmp_path / "v2.zarr", coarse=twin_dir / "coarse_daily.nc",
                            fine=twin_dir / "fine_daily.nc", region=BOX, variable="SUEXTTAU"))
    old = st.ds.isel(species=0, drop=True)
    old["coarse"].attrs = dict(st.attrs)
    old["fine"].attrs = dict(st.attrs)
    old.attrs = {**old.attrs, "variable": "SUEXTTAU", "fastds_store_version": 1,
                 "norm_x": json.dumps(st.norm_x.to_dict()), "norm_y": json.dumps(st.norm_y.to_dict())}
    for k in ("variables", "species_attrs"):
        old.attrs.pop(k)
    for v in old.variables.values():
        v.encoding = {}
    old.to_zarr(tmp_path / "v1.zarr", consolidated=False)
    v1 = open_store(tmp_path / "v1.zarr")
    assert v1.variables == ("SUEXTTAU",) and v1.variable == "SUEXTTAU"
    np.testing.assert_array_equal(v1.fine.values, st.fine.values)
    assert v1.norm_y.to_dict() == st.norm_y.to_dict() and v1.attrs == st.attrs


def test_species_correlation_is_xarray_corr_of_log_fields_per_member(rng):
    t, y, x = 40, 3, 4
    base = rng.normal(size=(t, y, x))
    truth = {"A": 10 ** (base + 0.3 * rng.normal(size=(t, y, x))),
             "B": 10 ** (0.5 * base + rng.normal(size=(t, y, x)))}
    da = {k: xr.DataArray(v, dims=("time", "lat", "lon")) for k, v in truth.items()}
    r = species_correlation(da)
    assert r.dims == ("pair", "lat", "lon") and list(r.pair.values) == ["A~B"]
    la, lb = np.log10(truth["A"][:, 1, 2]), np.log10(truth["B"][:, 1, 2])
    assert float(r.isel(pair=0, lat=1, lon=2)) == pytest.approx(np.corrcoef(la, lb)[0, 1], abs=1e-12)
    # members: the mean of each member's map; identical members give the truth's map, no bias
    ens = {k: v.expand_dims(member=3, axis=1) for k, v in da.items()}
    cb = correlation_bias(ens, da)
    assert cb.bias.abs().max() < 1e-12 and cb.corr_truth.iloc[0] == pytest.approx(float(r.mean()), abs=1e-12)
    # independent members of independent species: the bias is minus the truth's correlation
    noise = {k: xr.DataArray(10 ** rng.normal(size=(t, 8, y, x)), dims=("time", "member", "lat", "lon"))
             for k in da}
    assert correlation_bias(noise, da).bias.iloc[0] == pytest.approx(-float(r.mean()), abs=0.15)
    with pytest.raises(ValueError, match="species differ"):
        correlation_bias({"A": da["A"], "C": da["B"]}, da)


@pytest.fixture(scope="module")
def species_runs(twin_dir, tmp_path_factory, tiny_config):
    """A store of the twin's species and two runs (sea salt, sulfate): Stage A and the U-Net."""
    import dataclasses

    from fastds.training.stages import pretrain, train
    root = tmp_path_factory.mktemp("species-runs")
    store = prepare(out=root / "s.zarr", coarse=twin_dir / "coarse_daily.nc",
                    fine=twin_dir / "fine_daily.nc", region=BOX, variables=SPEC.variables)
    runs = {}
    for v in ("SSEXTTAU", "SUEXTTAU"):
        cfg = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, variable=v))
        pretrain(data=store, run=root / v, config=cfg, progress=False)
        # the run remembers its species: train needs no data.variable
        train(data=store, run=root / v, config=tiny_config, model="unet", progress=False)
        runs[v] = root / v
    return store, runs


def test_a_species_of_a_multi_species_store_trains_and_samples_under_its_own_name(species_runs, tmp_path,
                                                                                  tiny_config):
    import dataclasses

    from fastds.sampling.pipeline import sample
    from fastds.training.stages import pretrain, train
    store, runs = species_runs
    with pytest.raises(DataError, match="choose one"):
        pretrain(data=store, run=tmp_path / "r0", config=tiny_config, progress=False)
    other = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, variable="DUEXTTAU"))
    with pytest.raises(ValueError, match="pretrained on SSEXTTAU"):
        train(data=store, run=runs["SSEXTTAU"], config=other, model="unet", progress=False)
    ds = sample(run=runs["SSEXTTAU"], start="2005-08-20", end="2005-08-21", model="unet", members=1,
                mode="lenient")
    assert list(ds.data_vars) == ["SSEXTTAU"]
    assert "sea_salt" in ds["SSEXTTAU"].attrs["standard_name"]
    assert pd.DatetimeIndex(ds.time.values)[0] == pd.Timestamp("2005-08-20")


def test_sample_species_writes_one_variable_per_species_equal_to_each_run(species_runs, tmp_path):
    from fastds.cli import main
    from fastds.sampling.pipeline import sample, sample_species
    _, runs = species_runs
    kw = dict(start="2005-08-20", end="2005-08-22", model="unet", members=1, mode="lenient")
    out = tmp_path / "both.nc"
    ds = sample_species(runs=list(runs.values()), out=out, **kw)
    assert sorted(ds.data_vars) == ["SSEXTTAU", "SUEXTTAU"] and ds.attrs["species"] == "SSEXTTAU,SUEXTTAU"
    assert not (tmp_path / "both.nc.species").exists()
    for v, run in runs.items():
        one = sample(run=run, **kw)[v]
        np.testing.assert_array_equal(ds[v].values, one.values)
        assert ds[v].attrs["standard_name"] == one.attrs["standard_name"]
    with pytest.raises(ValueError, match="two runs are of SSEXTTAU"):
        sample_species(runs=[runs["SSEXTTAU"], runs["SSEXTTAU"]], **kw)
    # the CLI: --run once per species, one Zarr output
    z = tmp_path / "both.zarr"
    assert main(["sample", "--run", str(runs["SSEXTTAU"]), "--run", str(runs["SUEXTTAU"]), "--start",
                 "2005-08-20", "--end", "2005-08-22", "--model", "unet", "--members", "1", "--mode",
                 "lenient", "--out", str(z), "--quiet"]) == 0
    got = xr.open_zarr(z, consolidated=False)
    for v in runs:
        np.testing.assert_array_equal(got[v].values, ds[v].values)


def test_species_latents_are_shared_or_independent_as_asked(species_runs):
    """A null ensemble's noise shows the latents: shared, member k of every species draws the
    same standard normal field; independent, the first species draws as before and the
    others their own."""
    from fastds.sampling.pipeline import sample_species
    _, runs = species_runs
    kw = dict(start="2005-08-20", end="2005-08-21", model="unet+iid", members=2, mode="lenient")
    shared = sample_species(runs=list(runs.values()), noise="shared", **kw)
    indep = sample_species(runs=list(runs.values()), noise="independent", **kw)
    np.testing.assert_array_equal(shared["SSEXTTAU"].values, indep["SSEXTTAU"].values)
    assert not np.allclose(shared["SUEXTTAU"].values, indep["SUEXTTAU"].values)
    unet = sample_species(runs=list(runs.values()), noise="shared", **{**kw, "model": "unet", "members": 1})

    def z(ds, v):  # the standardised noise of member 0, day 0
        r = np.log10(ds[v].isel(time=0, member=0).values) - np.log10(unet[v].isel(time=0).values)
        return (r - r.mean()) / r.std()
    assert np.corrcoef(z(shared, "SSEXTTAU").ravel(), z(shared, "SUEXTTAU").ravel())[0, 1] > 0.99
    assert abs(np.corrcoef(z(indep, "SSEXTTAU").ravel(), z(indep, "SUEXTTAU").ravel())[0, 1]) < 0.1
    with pytest.raises(ValueError, match="noise must be one of"):
        sample_species(runs=list(runs.values()), noise="joint", **kw)


def test_species_scaled_to_their_total_keep_their_ratios_and_meet_its_cells(species_runs):
    from fastds.sampling.consistency import cell_means
    from fastds.sampling.pipeline import _projection, sample_species
    store, runs = species_runs
    kw = dict(start="2005-08-20", end="2005-08-21", model="unet+iid", members=2, mode="lenient")
    raw = sample_species(runs=list(runs.values()), **kw)
    ds = sample_species(runs=list(runs.values()), total="TOTEXTTAU", **kw)
    assert sorted(ds.data_vars) == ["SSEXTTAU", "SUEXTTAU", "TOTEXTTAU"] and ds.attrs["total"] == "TOTEXTTAU"
    assert "SSEXTTAU, SUEXTTAU" in ds["TOTEXTTAU"].attrs["long_name"]
    np.testing.assert_allclose(ds["TOTEXTTAU"], ds["SSEXTTAU"] + ds["SUEXTTAU"], rtol=1e-5)
    # the species keep their ratio at every pixel
    np.testing.assert_allclose(ds["SSEXTTAU"] / ds["SUEXTTAU"], raw["SSEXTTAU"] / raw["SUEXTTAU"], rtol=1e-4)
    # and their sum meets the total's cell targets, every day and member
    st = open_store(store, variable="TOTEXTTAU")
    proj = _projection(st)
    n = int(np.prod(proj.shape_c))
    for i, day in enumerate(pd.DatetimeIndex(ds.time.values)):
        target = proj.target(st.coarse.sel(time_c=day).values, 3).ravel()
        got = cell_means(ds["TOTEXTTAU"].isel(time=i).values, proj.ids, proj.weights, n)
        np.testing.assert_allclose(got, np.broadcast_to(target, got.shape), rtol=1e-4)
    with pytest.raises(ValueError, match="also one of the runs' species"):
        sample_species(runs=list(runs.values()), total="SSEXTTAU", **kw)
    with pytest.raises(DataError, match="has no variable 'NOPE'"):
        sample_species(runs=list(runs.values()), total="NOPE", **kw)


def test_coupled_latents_take_the_species_residual_correlation(species_runs):
    """``noise="coupled"``: species k draws x_T = Σ_j L[k, j] z_j with L the Cholesky factor of
    the species' validation-residual correlation; the first species keeps its own latents."""
    from fastds.config import SampleConfig
    from fastds.sampling.pipeline import null_stats, sample_species, species_latent_mix
    store, runs = species_runs
    days = pd.date_range("2005-08-20", "2005-08-21")
    mix = species_latent_mix(list(runs.values()), SampleConfig(), days)
    assert mix[0] == (1.0,) and len(mix[1]) == 2
    banks = [null_stats(r, open_store(store, variable=v), 3, SampleConfig()).bank.ravel() for v, r in runs.items()]
    c = np.corrcoef(banks[0], banks[1])[0, 1]
    assert 0.05 < abs(c) < 0.99
    assert mix[1][0] == pytest.approx(c, abs=1e-6) and mix[1][0] ** 2 + mix[1][1] ** 2 == pytest.approx(1, abs=1e-6)
    ds = sample_species(runs=list(runs.values()), noise="coupled", start="2005-08-20", end="2005-08-21",
                        model="unet", members=1, mode="lenient")
    assert set(ds.data_vars) == {"SSEXTTAU", "SUEXTTAU"}


def test_latent_mix_draws_the_weighted_sum_of_the_member_streams():
    from fastds.sampling.day import LATENT_STREAM_STRIDE, _Latents, member_draws
    lat = _Latents((0.6, 0.8), seed=3, day_key=5, member0=2, members=2, antithetic=True, device="cpu")
    gens, signs = member_draws(3, 5, 2, 2, antithetic=True)
    other, _ = member_draws(3 + LATENT_STREAM_STRIDE, 5, 2, 2, antithetic=True)
    got = lat.draw(1, (2, 1, 4, 4), gens[1], signs[1])
    g0, g1 = member_draws(3, 5, 2, 2, antithetic=True)[0][1], other[1]
    want = signs[1] * (0.6 * torch.randn((2, 1, 4, 4), generator=g0) + 0.8 * torch.randn((2, 1, 4, 4), generator=g1))
    assert torch.equal(got, want)
    # no mix: the member's own draw, as before
    plain = _Latents((), seed=3, day_key=5, member0=2, members=2, antithetic=True, device="cpu")
    g = member_draws(3, 5, 2, 2, antithetic=True)[0][0]
    assert torch.equal(plain.draw(0, (3,), g, 1.0), torch.randn((3,), generator=member_draws(3, 5, 2, 2, antithetic=True)[0][0]))


def test_a_unit_latent_mix_samples_exactly_the_default(trained_run):
    from fastds.sampling.pipeline import sample
    kw = dict(start="2005-08-20", end="2005-08-21", members=2, mode="lenient")
    a = sample(run=trained_run, **kw)["DUEXTTAU"].values
    b = sample(run=trained_run, latent_mix=(1.0,), **kw)
    np.testing.assert_array_equal(a, b["DUEXTTAU"].values)
    assert b.attrs["latent_mix"] == "[1.0]"
    c = sample(run=trained_run, latent_mix=(0.0, 1.0), **kw)["DUEXTTAU"].values
    assert not np.allclose(a, c)


@pytest.fixture(scope="module")
def joint_run(species_runs, tmp_path_factory):
    """A joint model of sea salt and sulfate over the species runs' U-Nets."""
    from fastds.training.joint import train_joint
    _, runs = species_runs
    run = tmp_path_factory.mktemp("joint")
    best = train_joint(runs=[runs["SSEXTTAU"], runs["SUEXTTAU"]], run=run, progress=False)
    return run, best


def test_joint_model_trains_only_its_denoiser_and_calibrates_each_species(joint_run, species_runs):
    from fastds.runs import load_checkpoint, load_trained
    _, runs = species_runs
    run, best = joint_run
    ck = load_checkpoint(best[0])
    assert ck["kind"] == "joint" and ck["species"] == ["SSEXTTAU", "SUEXTTAU"]
    model, _ = load_trained(run, 3, "joint")
    # the species' U-Nets are frozen: no gradient, no optimizer slot; the denoiser alone trains
    assert not any(p.requires_grad for p in model.means.parameters())
    n_trained = sum(1 for p in model.parameters() if p.requires_grad)
    assert n_trained == len(list(model.net.parameters()))
    last = load_checkpoint(run / "season3" / "joint.pt")
    assert sum(len(g["params"]) for g in last["optimizer"]["param_groups"]) == n_trained
    # each mean is its species' trained U-Net, bit for bit
    for k, v in enumerate(("SSEXTTAU", "SUEXTTAU")):
        unet, _ = load_trained(runs[v], 3, "unet")
        for (name, a), b in zip(model.means[k].state_dict().items(), unet.state_dict().values()):
            assert torch.equal(a, b), name
    cal = ck["calibration"]
    assert [len(c["crps_fair"]) for c in cal["species"]] == [len(cal["species"][0]["inflations"])] * 2
    assert model.regression_inflation.shape == (2,) and model.regression_bands.shape[0] == 2
    assert (model.regression_scale > 0).all()


def test_joint_day_means_are_each_species_unet_and_its_residual_has_every_channel(joint_run, species_runs):
    """On one day with true lags, channel k of the joint model's mean is species k's U-Net
    prediction (the same patches, the conditioning computed once for mean and residual)."""
    import dataclasses

    from fastds.runs import fine_days, load_trained, run_config
    from fastds.sampling.day import DayInputs, downscale_day
    store, runs = species_runs
    run, _ = joint_run
    model, conf = load_trained(run, 3, "joint")
    cfg = dataclasses.replace(conf.sample, mean_stride=0, members=2, precision="fp32")
    fds, e = [], None
    for v in ("SSEXTTAU", "SUEXTTAU"):
        from fastds.data.store import open_store
        fd = fine_days(open_store(store, variable=v), run_config(runs[v]), 3,
                       anchor=load_trained(runs[v], 3, "unet")[0].anchor)
        fds.append(fd)
    e = int(np.flatnonzero(fds[0].test_free_window())[-1])
    t = conf.data.t_lag
    inputs = DayInputs(np.concatenate([fd.coarse_on_fine(e) for fd in fds]), fds[0].covariates(e),
                       np.concatenate([fd.y[e - t:e] for fd in fds])[None])
    means, res = downscale_day(model, inputs, cfg=cfg, T=conf.diffusion.T, members=2,
                               prediction=conf.diffusion.prediction, day_key=e, parts=True)
    assert means.shape == res.shape == (2, 2) + fds[0].shape
    for k, (v, fd) in enumerate(zip(("SSEXTTAU", "SUEXTTAU"), fds)):
        unet, _ = load_trained(runs[v], 3, "unet")
        one = DayInputs(fd.coarse_on_fine(e), fd.covariates(e), fd.y[e - t:e][None])
        ref = downscale_day(unet, one, kind="unet", cfg=cfg)[0]
        np.testing.assert_allclose(means[0, k], ref, rtol=1e-5, atol=1e-5)
        assert res[:, k].std() > 0 and np.isfinite(res[:, k]).all()
    # the two members are an antithetic pair when the run samples pairs
    if cfg.antithetic:
        assert not np.allclose(res[0], res[1])
    # sample.compile's twin: its denoiser compiled once (FixedBatch pads the partial
    # batches), the eager day to float rounding
    import copy
    graphs = []
    twin = copy.deepcopy(model).compile_for_sampling(backend=lambda gm, ex: graphs.append(ex) or gm.forward)
    small = dataclasses.replace(cfg, batch=5)
    kw = dict(cfg=small, T=conf.diffusion.T, members=2, prediction=conf.diffusion.prediction, day_key=e)
    for got, want in zip(downscale_day(twin, inputs, **kw), downscale_day(model, inputs, **kw)):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert len(graphs) == 1 and twin.net.rows == 5


def test_joint_rollout_writes_one_variable_per_species_through_zarr_and_the_cli(joint_run, tmp_path):
    from fastds.cli import main
    from fastds.sampling.pipeline import sample
    run, _ = joint_run
    kw = dict(start="2005-08-28", end="2005-08-31", members=2, mode="strict")
    ds = sample(run=run, model="joint", progress=False, **kw)
    assert sorted(ds.data_vars) == ["SSEXTTAU", "SUEXTTAU"] and ds.attrs["species"] == "SSEXTTAU,SUEXTTAU"
    assert ds["SSEXTTAU"].dims == ("time", "member", "lat", "lon") and ds.sizes["time"] == 4
    assert "sea_salt" in ds["SSEXTTAU"].attrs["standard_name"]
    assert "sulfate" in ds["SUEXTTAU"].attrs["standard_name"]
    for v in ds.data_vars:
        assert np.isfinite(ds[v].values).all() and (ds[v].values > 0).all()
    # the species are not copies of each other, and the members differ
    assert not np.allclose(ds["SSEXTTAU"].values, ds["SUEXTTAU"].values)
    assert not np.allclose(ds["SSEXTTAU"].values[:, 0], ds["SSEXTTAU"].values[:, 1])
    # a Zarr output, filled day by day, holds the same days; the CLI the same again
    z = tmp_path / "joint.zarr"
    got = sample(run=run, model="joint", out=z, progress=False, **kw)
    for v in ds.data_vars:
        np.testing.assert_array_equal(got[v].values, ds[v].values)
    nc = tmp_path / "joint.nc"
    assert main(["sample", "--run", str(run), "--model", "joint", "--start", kw["start"], "--end", kw["end"],
                 "--members", "2", "--mode", "strict", "--out", str(nc), "--quiet"]) == 0
    back = xr.open_dataset(nc)
    for v in ds.data_vars:
        np.testing.assert_array_equal(back[v].values, ds[v].values)
    back.close()


def test_joint_model_refuses_what_it_cannot_do(joint_run, species_runs, trained_run, tmp_path):
    from fastds.sampling.pipeline import sample
    from fastds.training.joint import train_joint
    _, runs = species_runs
    run, _ = joint_run
    with pytest.raises(ValueError, match="two runs are of SSEXTTAU"):
        train_joint(runs=[runs["SSEXTTAU"], runs["SSEXTTAU"]], run=tmp_path / "j", progress=False)
    with pytest.raises(ValueError, match="at least two species"):
        train_joint(runs=[runs["SSEXTTAU"]], run=tmp_path / "j", progress=False)
    with pytest.raises(ValueError, match="different stores"):
        train_joint(runs=[runs["SSEXTTAU"], trained_run], run=tmp_path / "j", progress=False)
    import dataclasses
    from fastds.runs import run_config
    from fastds.training.joint import _check_configs
    base = run_config(runs["SSEXTTAU"])
    for name in ("calibration_rollouts", "state_rollouts"):  # the joint widening has no rollout refit
        cfg = dataclasses.replace(base, train=dataclasses.replace(base.train, **{name: 1}))
        with pytest.raises(ValueError, match=f"train.{name} > 0 is not supported"):
            _check_configs([], [], cfg)
    for cov in ("events", "sources"):  # per-species maps: the joint model's channels share one set
        cfg = dataclasses.replace(base, data=dataclasses.replace(base.data, covariates=cov))
        with pytest.raises(ValueError, match=f"data.covariates='{cov}' differ per species"):
            _check_configs([], [], cfg)
    _check_configs([], [], base)
    with pytest.raises(ValueError, match="one process"):
        sample(run=run, model="joint", start="2005-08-28", end="2005-08-29", segments=2)
    with pytest.raises(ValueError, match="names no species runs"):
        sample(run=runs["SSEXTTAU"], model="joint", start="2005-08-28", end="2005-08-29")
    assert not (tmp_path / "j").exists()
    from fastds.cli import main
    assert main(["train", "--run", str(tmp_path / "j"), "--model", "unet", "--quiet"]) == 2  # no --data
    assert main(["train", "--run", str(tmp_path / "j"), "--model", "ddpm", "--data", "x",
                 "--species-run", str(runs["SSEXTTAU"]), "--quiet"]) == 2


def test_joint_training_resumes_from_the_cli_without_rebuilding_a_finished_run(joint_run, species_runs,
                                                                              monkeypatch):
    import fastds.training.joint as joint
    from fastds.cli import main
    _, runs = species_runs
    run, best = joint_run
    stamp = best[0].stat().st_mtime_ns

    def rebuilt(*a, **k):
        raise AssertionError("a finished joint run was rebuilt")
    monkeypatch.setattr(joint, "prepared_sets", rebuilt)
    assert main(["train", "--model", "joint", "--run", str(run), "--species-run", str(runs["SSEXTTAU"]),
                 "--species-run", str(runs["SUEXTTAU"]), "--resume", "--quiet"]) == 0
    assert best[0].stat().st_mtime_ns == stamp


def test_joint_model_trains_as_long_as_the_separate_ddpms_together_unless_told(tiny_config):
    import dataclasses

    from fastds.training.joint import _joint_settings
    tc = tiny_config.train
    assert _joint_settings(tiny_config, 3)["epochs"] == 3 * tc.epochs * tc.ddpm_epoch_factor
    seven = dataclasses.replace(tiny_config, train=dataclasses.replace(tc, joint_epochs=7))
    assert _joint_settings(seven, 3)["epochs"] == 7
    with pytest.raises(ValueError, match="joint_epochs"):
        _joint_settings(dataclasses.replace(tiny_config, train=dataclasses.replace(tc, joint_epochs=-1)), 3)


def test_channel_mix_correlates_a_joint_models_latent_channels_and_refuses_a_wrong_size():
    from fastds.sampling.day import _Latents, member_draws
    gens = lambda: member_draws(0, 3, 0, 2, antithetic=True)  # noqa: E731
    plain = _Latents((), 0, 3, 0, 2, True, "cpu")
    same = _Latents((), 0, 3, 0, 2, True, "cpu", channel_mix=(1.0, 0.0, 0.0, 1.0))
    copy = _Latents((), 0, 3, 0, 2, True, "cpu", channel_mix=(1.0, 0.0, 1.0, 0.0))
    (g0, _), (g1, _), (g2, signs) = gens(), gens(), gens()
    a = plain.draw(1, (1, 2, 5, 7), g0[1], signs[1])
    assert torch.equal(same.draw(1, (1, 2, 5, 7), g1[1], signs[1]), a)  # the identity changes nothing
    c = copy.draw(1, (1, 2, 5, 7), g2[1], signs[1])
    assert torch.equal(c[:, 1], a[:, 0]) and torch.equal(c[:, 0], a[:, 0])  # channel 1 takes channel 0's draw
    with torch.autocast("cpu", dtype=torch.bfloat16):  # as the network calls run: x_T stays fp32
        assert copy.draw(1, (1, 2, 5, 7), gens()[0][1], signs[1]).dtype == torch.float32
    with pytest.raises(ValueError, match="channel_mix: needs 3 x 3"):
        same.draw(0, (1, 3, 5, 7), gens()[0][0], 1.0)


def test_a_joint_run_couples_its_channels_as_separate_species_runs_are_coupled(joint_run, species_runs):
    import pandas as pd

    from fastds.runs import sample_settings
    from fastds.sampling.pipeline import joint_channel_mix, sample, species_latent_mix
    _, runs = species_runs
    run, _ = joint_run
    cfg = sample_settings(run)
    days = pd.date_range("2005-08-28", "2005-08-29")
    m = np.asarray(joint_channel_mix(run, cfg, days)).reshape(2, 2)
    rows = species_latent_mix([runs["SSEXTTAU"], runs["SUEXTTAU"]], cfg, days)
    np.testing.assert_allclose(m, [[rows[0][0], 0.0], list(rows[1])])
    np.testing.assert_allclose(np.linalg.norm(m, axis=1), 1.0)
    kw = dict(start="2005-08-28", end="2005-08-29", members=2, mode="strict", progress=False)
    coupled = sample(run=run, model="joint", channel_mix=tuple(m.ravel()), **kw)
    plain = sample(run=run, model="joint", **kw)
    assert coupled.attrs["channel_mix"] and "channel_mix" not in plain.attrs
    # the first channel draws as before; the second takes part of the first's draw
    assert not np.allclose(coupled["SUEXTTAU"].values, plain["SUEXTTAU"].values)
