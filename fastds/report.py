"""``evaluate``: predictions vs truth -> Table-3-style table, a JSON of every figure, PNG plots."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from ._io import atomic_path
from .data.regions import season_name, season_of
from .data.transforms import fit_minmax
from .metrics import (acf_pacf, crps, day_scores, lag_curves, power_spectrum, rank_histogram,
                      semivariogram, spread_skill, summarize, summarize_wasserstein,
                      wasserstein_by_day)
from .metrics.ensemble import antithetic_pairs
from .sampling.output import open_output

__all__ = ["rollout_drift", "evaluate", "format_table", "load_field"]

TABLE_SCORES = ("r2", "r2_nse", "rmse", "mae", "bias")


def load_field(path_or_obj, variable="DUEXTTAU") -> xr.DataArray:
    """A (time[, member], lat, lon) DataArray from a NetCDF or Zarr path, a Dataset or a DataArray."""
    if isinstance(path_or_obj, xr.DataArray):
        return path_or_obj
    if isinstance(path_or_obj, xr.Dataset):
        return _with_pairs(path_or_obj, path_or_obj[variable])
    path = Path(path_or_obj)
    if not path.exists():
        raise FileNotFoundError(f"evaluate: {path} does not exist")
    try:
        ds = open_output(path)  # a Zarr a run is still writing: the days written so far
    except Exception as err:
        raise ValueError(f"evaluate: cannot open {path} as NetCDF or Zarr ({type(err).__name__})") from None
    if variable not in ds:
        raise ValueError(f"evaluate: {path} has no variable {variable!r} (has: {', '.join(map(str, ds.data_vars))})")
    return _with_pairs(ds, ds[variable].load())


def _with_pairs(ds, da):
    """Carry a sample file's ``antithetic`` flag onto its variable (ensemble scores use it)."""
    if ds.attrs.get("antithetic") and "member" in da.dims and "antithetic" not in da.attrs:
        da = da.copy()
        da.attrs["antithetic"] = 1
    return da


def format_table(table: pd.DataFrame) -> str:
    """Markdown: one row per model x area x season, ``mean (sd)`` cells."""
    cols = [c for c in TABLE_SCORES if f"{c}_mean" in table]
    head = "| model | area | season | days | " + " | ".join(cols) + " | RMSE (phys.) |"
    lines = [head, "|" + "---|" * (5 + len(cols))]
    for _, r in table.iterrows():
        cells = [f"{r[f'{c}_mean']:.3f} ({r[f'{c}_sd']:.3f})" for c in cols]
        phys = f"{r['phys_rmse_mean']:.4f} ({r['phys_rmse_sd']:.4f})" if "phys_rmse_mean" in r else ""
        lines.append(f"| {r['model']} | {r['area']} | {r['season']} | {r['days']} | " + " | ".join(cells) + f" | {phys} |")
    return "\n".join(lines) + "\n"


def _log(a):
    return np.log10(np.maximum(np.asarray(a, float), 1e-6))


def _mean_variogram(field, days, max_km, bins):
    gs = []
    for d in days:
        c, g, _ = semivariogram(_log(field.sel(time=d).values), field.lat.values, field.lon.values,
                                max_km=max_km, bins=bins)
        gs.append(g)
    return c, np.nanmean(gs, axis=0)


def _mean_spectrum(field, days):
    ps = [power_spectrum(_log(field.sel(time=d).values), field.lat.values, field.lon.values) for d in days]
    return ps[0][0], np.mean([p for _, p in ps], axis=0)


def _curves(field, days, *, variogram_days, max_km, bins) -> dict:
    """Semivariogram and spectrum (means over up to ``variogram_days`` days spread over
    ``days``), plus ACF/PACF and lag curves once there are 6 days or more."""
    vdays = days[np.linspace(0, len(days) - 1, min(variogram_days, len(days))).astype(int)]
    out = {"variogram": dict(zip(("km", "gamma"), map(np.ndarray.tolist, _mean_variogram(field, vdays, max_km, bins)))),
           "spectrum": dict(zip(("k", "power"), map(np.ndarray.tolist, _mean_spectrum(field, vdays))))}
    if len(days) >= 6:
        a, pa = acf_pacf(field)
        out.update(acf=a.tolist(), pacf=pa.tolist(),
                   lag_curves={k: v.tolist() for k, v in lag_curves(field).items()})
    return out


def lead_table(leads: dict) -> pd.DataFrame:
    """{name: lead_scores frame} -> one frame indexed by lead, columns ``r2:NAME`` and
    ``rmse:NAME`` (ensemble mean) and, for ensembles, ``r2:NAME-member``."""
    cols = {}
    for name, f in leads.items():
        cols[f"r2:{name}"], cols[f"rmse:{name}"] = f["r2"], f["rmse"]
        if not np.allclose(f["r2"].values, f["r2_member"].values, equal_nan=True):
            cols[f"r2:{name}-member"] = f["r2_member"]
        cols[f"sd_ratio:{name}"] = f["sd_ratio"]
        if "sd" in f:
            cols[f"sd:{name}"] = f["sd"]
    return pd.DataFrame(cols)


def format_leads(lt: pd.DataFrame, metric="r2") -> str:
    """Markdown table of one metric per lead (rows) and model (columns), plus the mean and
    the slope of a linear fit over leads (drift per day)."""
    cols = [c for c in lt.columns if c.startswith(metric + ":")]
    names = [c.split(":", 1)[1] for c in cols]
    lines = ["| lead | " + " | ".join(names) + " |", "|" + "---|" * (1 + len(names))]
    for lead, row in lt[cols].iterrows():
        lines.append(f"| {lead} | " + " | ".join(f"{v:.3f}" for v in row.values) + " |")
    lines.append("| mean | " + " | ".join(f"{lt[c].mean():.3f}" for c in cols) + " |")
    x = lt.index.values.astype(float)
    slopes = [np.polyfit(x, lt[c].values, 1)[0] if len(x) > 1 else np.nan for c in cols]
    lines.append("| slope/day | " + " | ".join(f"{v:+.4f}" for v in slopes) + " |")
    return "\n".join(lines) + "\n"


def _ensemble_entry(p, t):
    """Ensemble statistics of (time, member, lat, lon) against (time, lat, lon); members in
    antithetic pairs (the sample's ``antithetic`` attribute) get the pair-aware CRPS and
    spread/skill."""
    pairs = antithetic_pairs(p)
    lp, lt = _log(p.transpose("time", "member", ...).values), _log(t.transpose("time", ...).values)
    sd_ratio = [np.nanstd(lp[i, 0]) / np.nanstd(lt[i]) for i in range(lt.shape[0])]
    c = crps(p, t, pairs=pairs)
    return {"members": int(p.sizes["member"]), "crps": c.tolist(), "crps_mean": float(np.mean(c)),
            "spread_skill": float(spread_skill(p, t, pairs=pairs)), "antithetic": pairs,
            "rank_histogram": rank_histogram(p, t).tolist(),
            "sd_ratio_member": float(np.mean(sd_ratio))}


def lead_scores(pred: xr.DataArray, truth: xr.DataArray, record_end) -> pd.DataFrame:
    """Per-lead skill of a rollout: rows indexed by lead (days after ``record_end``), columns
    r2, rmse (ensemble mean if ``member``), plus ``r2_member``, ``rmse_member`` (member 0) and
    ``sd_ratio`` (member 0's spatial sd of log10 over the truth's) for every prediction."""
    scores = day_scores(pred, truth)
    lead = (scores.index - pd.Timestamp(record_end)).days
    out = pd.DataFrame({"lead": lead, "r2": scores["r2"].values, "rmse": scores["rmse"].values})
    single = pred.isel(member=0) if "member" in pred.dims else pred
    one = day_scores(single, truth)
    out["r2_member"], out["rmse_member"] = one["r2"].values, one["rmse"].values
    drift = rollout_drift(single.sel(time=scores.index), record_end)
    out["sd"], out["region_mean"] = drift["sd"].values, drift["region_mean"].values
    out["sd_ratio"] = out["sd"].values / [np.nanstd(_log(truth.sel(time=d).values)) for d in scores.index]
    return out.set_index("lead")


def rollout_drift(pred: xr.DataArray, record_end, reference: xr.DataArray | None = None) -> pd.DataFrame:
    """Truth-free drift diagnostics of a rollout (time[, member], lat, lon), physical units:
    per lead (days after ``record_end``), member 0's spatial sd and region mean of log10.
    With ``reference`` (the fine record, (time, lat, lon)), adds ``sd_z`` and ``mean_z``:
    each day's values as z-scores against the reference's days of the same calendar month,
    so a drifting rollout shows a trend away from 0 without any truth on its days."""
    one = pred.isel(member=0) if "member" in pred.dims else pred
    v = _log(one.transpose("time", ...).values)
    flat = v.reshape(v.shape[0], -1)
    days = pd.DatetimeIndex(one.time.values)
    out = pd.DataFrame({"lead": (days - pd.Timestamp(record_end)).days,
                        "sd": np.nanstd(flat, axis=1), "region_mean": np.nanmean(flat, axis=1)})
    if reference is not None:
        r = _log(reference.transpose("time", ...).values)
        rf = r.reshape(r.shape[0], -1)
        rsd, rmean = np.nanstd(rf, axis=1), np.nanmean(rf, axis=1)
        months = pd.DatetimeIndex(reference.time.values).month
        sd_z, mean_z = [], []
        for d, a, b in zip(days, out["sd"], out["region_mean"]):
            m = months == d.month
            if m.sum() < 2:
                sd_z.append(np.nan)
                mean_z.append(np.nan)
                continue
            sd_z.append((a - rsd[m].mean()) / rsd[m].std())
            mean_z.append((b - rmean[m].mean()) / rmean[m].std())
        out["sd_z"], out["mean_z"] = sd_z, mean_z
    return out.set_index("lead")


def evaluate(preds, truth, *, out, coarse=None, area="area", map_days=None, max_km=600.0,
             bins=24, variogram_days=8, plots=True, variable="DUEXTTAU", record_end=None,
             same_days=True) -> dict:
    """Evaluate one or more predictions against the truth and write a report to ``out``.

    Parameters
    ----------
    preds : {name: DataArray or path} (or one DataArray/path, named "model"), each
        (time[, member], lat, lon) in physical units on the truth's grid.
    truth : DataArray/Dataset/path (time, lat, lon), or a store path (its ``fine`` record).
    coarse : optional (time, lat_c, lon_c) coarse field for maps and the Wasserstein analysis.
    record_end : the last day of the fine record, for a rollout: adds per-lead R²/RMSE and
        spatial-sd tables (``leads.csv``, ``leads.md``) and plots (``leads.png``).
    same_days : score every model on the days all of them share with the truth (default), so
        rows are comparable; False scores each on all of its own days.

    A prediction with a ``member`` dim (M > 1) gets two rows: ``NAME`` scores the ensemble
    mean (taken in the scored space: the geometric mean for log10 scores, the arithmetic
    mean for physical ones; see :func:`~fastds.metrics.day_scores`), ``NAME-member`` one
    member; its ``ensemble`` entry holds CRPS per day (log10), spread/skill with the
    √((M+1)/M) adjustment, the rank histogram and member 0's spatial sd over the truth's.
    Writes ``table.csv``, ``table.md``, ``metrics.json`` and PNG plots; returns the metrics
    dict.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    preds, truth, coarse = _load_inputs(preds, truth, coarse, variable)
    shared = _shared_days(preds, truth, same_days)
    tables, metrics, leads = [], {"models": {}}, {}
    for name, pred in preds.items():
        common = pd.DatetimeIndex(shared if same_days else
                                  np.intersect1d(pred.time.values, truth.time.values))
        rows, entry, lead = _score_model(name, pred, truth, common, area=area, record_end=record_end,
                                         curves=dict(variogram_days=variogram_days, max_km=max_km, bins=bins))
        tables += rows
        metrics["models"][name] = entry
        if lead is not None:
            leads[name] = lead
    # the truth's own curves, on the days of the first model
    first = next(iter(metrics["models"].values()))
    days = pd.DatetimeIndex(first["days"])
    metrics["truth"] = _curves(truth.sel(time=days), days, variogram_days=variogram_days,
                               max_km=max_km, bins=bins)
    if coarse is not None:
        metrics.update(_wasserstein_entry(coarse, truth, area))
    table = pd.concat(tables, ignore_index=True)
    metrics["table"] = table.to_dict(orient="records")
    if leads:
        common = pd.DatetimeIndex(shared) if same_days else days
        _write_leads(leads, truth.sel(time=common), record_end, metrics, out)
    with atomic_path(out / "table.csv") as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(out / "table.md") as tmp:
        tmp.write_text(format_table(table))
    with atomic_path(out / "metrics.json") as tmp:
        tmp.write_text(json.dumps(metrics, indent=1, default=float))
    if plots:
        _plots(preds, truth, coarse, metrics, out, map_days or list(days[:2]))
    return metrics


def _load_inputs(preds, truth, coarse, variable):
    """Predictions {name: DataArray}, the truth and the coarse field (or None), loaded."""
    if not isinstance(preds, dict):
        preds = {"model": preds}
    preds = {k: load_field(v, variable) for k, v in preds.items()}
    if isinstance(truth, (str, Path)) and Path(truth).is_dir():
        from .data.store import open_store
        st = open_store(truth)
        if len(st.variables) > 1:
            st = st.select(variable)
        truth = st.fine.load()
        if coarse is None:
            coarse = st.coarse.rename({"time_c": "time", "lat_c": "lat", "lon_c": "lon"})
    truth = load_field(truth, variable)
    if coarse is not None and not isinstance(coarse, xr.DataArray):
        coarse = load_field(coarse, variable)
    return preds, truth, coarse


def _shared_days(preds, truth, same_days):
    """The days every prediction shares with the truth (an error names a model with none)."""
    shared = truth.time.values
    for name, pred in preds.items():
        mine = np.intersect1d(pred.time.values, truth.time.values)
        if len(mine) == 0:
            raise ValueError(f"evaluate: {name} shares no day with the truth "
                             f"({pd.Timestamp(pred.time.values[0]):%Y-%m-%d}.. vs "
                             f"{pd.Timestamp(truth.time.values[0]):%Y-%m-%d}..)")
        shared = np.intersect1d(shared, mine)
    if same_days and len(shared) == 0:
        raise ValueError("evaluate: the predictions share no day with each other and the truth; "
                         "pass same_days=False to score each on its own days")
    return shared


def _score_model(name, pred, truth, common, *, area, record_end, curves):
    """One model on ``common`` days: (table rows, metrics entry, per-lead scores or None)."""
    p, t = pred.sel(time=common), truth.sel(time=common)
    if p.sizes["lat"] != t.sizes["lat"] or p.sizes["lon"] != t.sizes["lon"]:
        raise ValueError(f"evaluate: {name} grid {p.sizes['lat']}x{p.sizes['lon']} differs from the "
                         f"truth's {t.sizes['lat']}x{t.sizes['lon']}")
    t = t.assign_coords(lat=p.lat, lon=p.lon)
    scores = day_scores(p, t)
    rows = [_table_rows(p, scores, t, area, name)]
    ensemble = "member" in p.dims and p.sizes["member"] > 1
    if ensemble:
        one = p.isel(member=0)
        rows.append(_table_rows(one, day_scores(one, t), t, area, f"{name}-member"))
    # curves (variogram, spectra, ACF) describe one realisation: member 0, not the mean
    pm = p.isel(member=0) if "member" in p.dims else p
    entry = {"days": [d.strftime("%Y-%m-%d") for d in common],
             "scores": scores.reset_index().astype({"time": str}).to_dict(orient="list"),
             **_curves(pm, common, **curves)}
    if ensemble:
        entry["ensemble"] = _ensemble_entry(p, t)
    lead = None
    if record_end is not None:
        lead = lead_scores(p, t, record_end)
        entry["leads"] = lead.reset_index().to_dict(orient="list")
    return rows, entry, lead


def _table_rows(p, scores, t, area, name):
    """Log10 summary rows with the physical RMSE/MAE beside them."""
    phys = day_scores(p, t, space="physical")[["rmse", "mae"]].rename(
        columns={"rmse": "phys_rmse", "mae": "phys_mae"})
    return summarize(scores, area=area, model=name).merge(
        summarize(phys, area=area, model=name), on=["model", "area", "season", "days"])


def _wasserstein_entry(coarse, truth, area) -> dict:
    """Wasserstein domain similarity of the coarse and fine records on their shared days."""
    cd = pd.DatetimeIndex(np.intersect1d(coarse.time.values, truth.time.values))
    if not len(cd):
        return {}
    ones = np.ones(len(cd), bool)
    xv, yv = coarse.sel(time=cd).values, truth.sel(time=cd).values
    nx, ny = fit_minmax(xv, cd, ones), fit_minmax(yv, cd, ones)
    seasons = season_of(cd.month)
    xn = np.stack([nx.forward(xv[i], s) for i, s in enumerate(seasons)])
    yn = np.stack([ny.forward(yv[i], s) for i, s in enumerate(seasons)])
    w = wasserstein_by_day(xn, yn, cd)
    return {"wasserstein": {"by_day": w.tolist(), "days": [d.strftime("%Y-%m-%d") for d in cd],
                            "summary": summarize_wasserstein(w, area).to_dict(orient="records")}}


def _write_leads(leads, truth, record_end, metrics, out):
    """Per-lead table (with the truth's spatial sd) into ``metrics`` and leads.csv/.md."""
    lt = lead_table(leads)
    ref = rollout_drift(truth, record_end)["sd"]
    lt["sd:truth"] = ref.reindex(lt.index).values
    metrics["lead_table"] = lt.reset_index().to_dict(orient="list")
    with atomic_path(out / "leads.csv") as tmp:
        lt.to_csv(tmp)
    with atomic_path(out / "leads.md") as tmp:
        tmp.write_text(format_leads(lt) + "\nSpatial sd of log10 by lead (member 0; no truth needed):\n\n"
                       + format_leads(lt, "sd"))


def _plots(preds, truth, coarse, metrics, out, map_days):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    def save(fig, name):
        with atomic_path(out / name) as tmp:
            fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
        plt.close(fig)

    _plot_maps(plt, save, preds, truth, coarse, map_days)
    _plot_curves(plt, save, metrics)
    _plot_distributions(plt, save, metrics)


def _plot_maps(plt, save, preds, truth, coarse, map_days):
    """One figure per map day: truth, coarse input, each model (member 0) and its error."""
    extent = [float(truth.lon.min()), float(truth.lon.max()), float(truth.lat.min()), float(truth.lat.max())]
    for day in map_days:
        day = pd.Timestamp(day)
        panels = [("truth (G5NR-like)", _log(truth.sel(time=day).values), "viridis")]
        if coarse is not None and day in pd.DatetimeIndex(coarse.time.values):
            panels.append(("coarse input (MERRA-2-like)", _log(coarse.sel(time=day).values), "viridis"))
        for name, p in preds.items():
            if day in pd.DatetimeIndex(p.time.values):
                v = p.sel(time=day)
                v = v.isel(member=0) if "member" in v.dims else v
                panels.append((name, _log(v.values), "viridis"))
                panels.append((f"{name} − truth", _log(v.values) - _log(truth.sel(time=day).values), "RdBu_r"))
        vmin = np.nanpercentile(panels[0][1], 1)
        vmax = np.nanpercentile(panels[0][1], 99)
        ncols = min(4, len(panels))
        nrows = -(-len(panels) // ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(4.3 * ncols, 3.7 * nrows), squeeze=False,
                                 constrained_layout=True)
        for ax in axes.ravel()[len(panels):]:
            ax.set_visible(False)
        for ax, (title, img, cmap) in zip(axes.ravel(), panels):
            if cmap == "RdBu_r":
                lim = np.nanmax(np.abs(img))
                im = ax.imshow(img, origin="lower", extent=extent, cmap=cmap, vmin=-lim, vmax=lim)
            else:
                ext = extent
                if coarse is not None and title.startswith("coarse"):
                    c = coarse
                    ext = [float(c.lon.min()), float(c.lon.max()), float(c.lat.min()), float(c.lat.max())]
                im = ax.imshow(img, origin="lower", extent=ext, cmap=cmap, vmin=vmin, vmax=vmax)
            ax.set_title(title, fontsize=9)
            ax.set_xlabel("lon (°E)", fontsize=8)
            ax.set_ylabel("lat (°N)", fontsize=8)
            fig.colorbar(im, ax=ax, shrink=0.75, label="log10 AOD" if cmap != "RdBu_r" else "Δ log10 AOD")
        fig.suptitle(f"DUEXTTAU on {day:%Y-%m-%d} ({season_name(season_of(day.month))})")
        save(fig, f"map_{day:%Y%m%d}.png")


def _plot_curves(plt, save, metrics):
    """Semivariograms, spectra, ACF/PACF and lag curves: every model against the truth."""
    m = metrics["models"]
    fig, ax = plt.subplots(figsize=(5.5, 4))
    tv = metrics["truth"]["variogram"]
    ax.plot(tv["km"], tv["gamma"], "k-", lw=2, label="truth")
    for name, e in m.items():
        ax.plot(e["variogram"]["km"], e["variogram"]["gamma"], "o-", ms=3, label=name)
    ax.set(xlabel="great-circle distance (km)", ylabel="semivariance of log10 AOD", title="Semivariograms")
    ax.legend()
    save(fig, "semivariogram.png")

    fig, ax = plt.subplots(figsize=(5.5, 4))
    ts = metrics["truth"]["spectrum"]
    ax.loglog(ts["k"], ts["power"], "k-", lw=2, label="truth")
    for name, e in m.items():
        ax.loglog(e["spectrum"]["k"], e["spectrum"]["power"], label=name)
    ax.set(xlabel="wavenumber (cycles/km)", ylabel="power of log10 AOD", title="Radially averaged power spectra")
    ax.legend()
    save(fig, "spectra.png")

    if "acf" in metrics["truth"]:
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for key, ax in zip(("acf", "pacf"), axes):
            ax.plot(metrics["truth"][key], "k-", lw=2, label="truth")
            for name, e in m.items():
                if key in e:
                    ax.plot(e[key], "o-", ms=3, label=name)
            ax.axhline(0, color="grey", lw=0.5)
            ax.set(xlabel="lag (days)", ylabel=key.upper(), title=f"{key.upper()} of the region-mean series")
            ax.legend()
        save(fig, "acf_pacf.png")
        fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
        for key, ax, lab in zip(("rmse", "r2"), axes, ("RMSE (log10 AOD)", "R² (squared Pearson)")):
            tl = metrics["truth"]["lag_curves"]
            ax.plot(tl["k"], tl[key], "k-", lw=2, label="truth")
            for name, e in m.items():
                if "lag_curves" in e:
                    ax.plot(e["lag_curves"]["k"], e["lag_curves"][key], "o-", ms=3, label=name)
            ax.set(xlabel="lag k (days)", ylabel=lab, title=f"Day t vs day t−k: {lab}")
            ax.legend()
        save(fig, "lag_curves.png")


def _plot_distributions(plt, save, metrics):
    """Wasserstein by season, rollout scores by lead, rank histograms."""
    m = metrics["models"]
    if "wasserstein" in metrics:
        w = pd.Series(metrics["wasserstein"]["by_day"], index=pd.DatetimeIndex(metrics["wasserstein"]["days"]))
        fig, ax = plt.subplots(figsize=(5.5, 4))
        groups = [w[season_of(w.index.month) == s].values for s in (1, 2, 3, 4)]
        ax.boxplot([g for g in groups if len(g)], tick_labels=[season_name(s) for s, g in zip((1, 2, 3, 4), groups) if len(g)])
        ax.set(ylabel="Wasserstein distance (normalised)", title="Coarse vs fine distributions per day")
        save(fig, "wasserstein.png")
    if any("leads" in e for e in m.values()):
        fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
        for i, (name, e) in enumerate(m.items()):
            if "leads" not in e:
                continue
            L, color = e["leads"], f"C{i}"  # one colour per model in every panel
            axes[0].plot(L["lead"], L["r2"], "o-", ms=3, color=color, label=name)
            axes[1].plot(L["lead"], L["rmse"], "o-", ms=3, color=color, label=name)
            axes[2].plot(L["lead"], L["sd_ratio"], "o-", ms=3, color=color, label=name)
            if not np.allclose(L["r2"], L["r2_member"], equal_nan=True):
                axes[0].plot(L["lead"], L["r2_member"], ":", color=color, label=f"{name} (one member)")
        axes[2].axhline(1.0, color="k", lw=1)
        for ax, lab in zip(axes, ("R² (squared Pearson)", "RMSE (log10 AOD)", "spatial sd / truth's")):
            ax.set(xlabel="lead (days after the fine record)", ylabel=lab, title=f"Strict rollout: {lab}")
        axes[0].legend(fontsize=7)
        save(fig, "leads.png")
    for name, e in m.items():
        if "ensemble" in e:
            fig, ax = plt.subplots(figsize=(5, 3.5))
            h = e["ensemble"]["rank_histogram"]
            ax.bar(range(len(h)), h)
            ax.set(xlabel="rank of truth among members", ylabel="count", title=f"Rank histogram: {name}")
            save(fig, f"rank_histogram_{name}.png")
