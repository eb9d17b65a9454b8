"""Several species: the twin's correlated species, a store of several, each species selected
for training and sampling, and the errors that name the file and the variable."""
import json

import numpy as np
import pandas as pd
import pytest
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


def test_prepare_several_species_from_native_files(twin, twin_dir, tmp_path):
    out = prepare(coarse=twin_dir / "coarse_daily.nc", fine=twin_dir / "fine", region=BOX,
                  out=tmp_path / "s.zarr", variables=SPEC.variables, allow_gaps=True, block=1)
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


def test_a_species_of_a_multi_species_store_trains_and_samples_under_its_own_name(twin_dir, tmp_path, tiny_config):
    import dataclasses

    from fastds.sampling.pipeline import sample
    from fastds.training.stages import pretrain, train
    store = prepare(out=tmp_path / "s.zarr", coarse=twin_dir / "coarse_daily.nc",
                    fine=twin_dir / "fine_daily.nc", region=BOX, variables=SPEC.variables)
    with pytest.raises(DataError, match="choose one"):
        pretrain(data=store, run=tmp_path / "r0", config=tiny_config, progress=False)
    cfg = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, variable="SSEXTTAU"))
    run = tmp_path / "run"
    pretrain(data=store, run=run, config=cfg, progress=False)
    # the run remembers its species: train needs no data.variable, and refuses another one
    train(data=store, run=run, config=tiny_config, model="unet", progress=False)
    other = dataclasses.replace(tiny_config, data=dataclasses.replace(tiny_config.data, variable="DUEXTTAU"))
    with pytest.raises(ValueError, match="pretrained on SSEXTTAU"):
        train(data=store, run=run, config=other, model="unet", progress=False)
    ds = sample(run=run, start="2005-08-20", end="2005-08-21", model="unet", members=1, mode="lenient")
    assert list(ds.data_vars) == ["SSEXTTAU"]
    assert "sea_salt" in ds["SSEXTTAU"].attrs["standard_name"]
    assert pd.DatetimeIndex(ds.time.values)[0] == pd.Timestamp("2005-08-20")
