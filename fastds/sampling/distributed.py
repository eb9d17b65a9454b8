"""Long reconstructions spread over workers: ``dask.distributed``, or this process.

The work of ``sample(start..end)`` is cut into units: time segments x members.

- **Members** are independent when each keeps its own lag history
  (``sample.lag_history = "member"``): unit k samples member k with member k's seeds (with
  ``sample.antithetic``, pair k: partners are inflated around their pair mean), so the
  ensemble does not depend on where its members ran. With ``"mean"`` the members share one
  history, so a unit holds all of them.
- **Segments** (``sample.segments`` K > 1: parallel in time). Segment 0 starts like any
  rollout; segment j > 0 starts ``sample.burn_in`` days before its first kept day from a cold
  lag window (the anchor μ: no model, no predicted day) and discards the burn-in days, so
  segments need nothing from each other and run at the same time. With K = 1 the result is
  the sequential rollout's, bit for bit, whatever the number of workers.

Each unit is one :func:`~fastds.sampling.pipeline.sample` call writing its own
``OUT.units/seg{j}_m{k}.nc`` (its days written as they finish into ``.parts``), so a killed
worker's unit is re-run by dask (``retries``) or by a re-run of the command, and resumes
where it stopped. The pieces are assembled into ``OUT`` atomically at the end.
"""
from __future__ import annotations

import dataclasses
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import xarray as xr

from ..config import SampleConfig
from .output import open_output, write_output

__all__ = ["Unit", "plan_units", "sample_distributed"]


@dataclass(frozen=True)
class Unit:
    """One piece of work: days ``first..last`` kept, sampled from ``run_start`` (earlier by
    the burn-in for a cold segment), members ``member0 .. member0 + members - 1``."""
    segment: int
    first: pd.Timestamp
    last: pd.Timestamp
    run_start: pd.Timestamp
    member0: int
    members: int
    cold: bool

    @property
    def name(self) -> str:
        return f"seg{self.segment:03d}_m{self.member0:03d}"


def plan_units(start, end, *, segments=1, burn_in=14, members=1, split_members=True,
               pairs=False) -> list[Unit]:
    """Segments of (nearly) equal length x members (one per unit, or with ``pairs`` one
    antithetic pair per unit), in the order they should start."""
    days = pd.date_range(pd.Timestamp(start), pd.Timestamp(end), freq="D")
    if len(days) == 0:
        raise ValueError(f"sample: end {end} is before start {start}")
    if segments < 1 or segments > len(days):
        raise ValueError(f"sample.segments must be in 1..{len(days)} (the days asked for), got {segments}")
    if burn_in < 0:
        raise ValueError(f"sample.burn_in must be >= 0, got {burn_in}")
    bounds = np.linspace(0, len(days), segments + 1).round().astype(int)
    if not split_members:
        groups = [(0, members)]
    elif pairs:  # antithetic partners are inflated around their pair mean: one unit each pair
        groups = [(k, min(2, members - k)) for k in range(0, members, 2)]
    else:
        groups = [(k, 1) for k in range(members)]
    units = []
    for j in range(segments):
        first, last = days[bounds[j]], days[bounds[j + 1] - 1]
        run_start = first - pd.Timedelta(days=burn_in) if j > 0 else first
        units += [Unit(j, first, last, run_start, m0, n, j > 0) for m0, n in groups]
    return units


def _run_unit(unit: Unit, *, sample, run, folder, cfg, model, data, device, threads):
    """Sample one unit into ``folder/NAME.nc`` (resuming its parts) with ``sample`` (the
    in-process :func:`~fastds.sampling.pipeline.sample`); returns the path."""
    import torch

    path = Path(folder) / f"{unit.name}.nc"
    if path.exists():
        return str(path)
    if threads:
        torch.set_num_threads(int(threads))
    # worker=True: the run's loaded state, fine days and projection are kept in this process
    # for its next unit, and the store is read without dask (no nested tasks on the cluster)
    sample(run=run, start=unit.run_start, end=unit.last, out=path,
           cfg=dataclasses.replace(cfg, members=unit.members, segments=1), model=model,
           data=data, device=device, member0=unit.member0, cold_start=unit.cold,
           progress=False, worker=True).close()
    return str(path)


def sample_distributed(*, run, start, end, out=None, cfg: SampleConfig = SampleConfig(),
                       model="ddpm", data=None, device="cpu", workers=None, scheduler=None,
                       threads=1, progress=True, retries=3, unit_sampler=None) -> xr.Dataset:
    """:func:`~fastds.sampling.pipeline.sample` cut into units (see the module docstring)
    and run on ``dask.distributed`` (``workers``: a LocalCluster of that many single-process,
    single-thread workers; ``scheduler``: the address of an existing cluster), or one unit
    after another in this process when neither is given. ``out`` is required: units write
    their days next to it (``OUT.units/``), which is what makes a killed run resumable.

    Returns the Dataset ``VAR(time[, member], lat, lon)`` also written to ``out``.
    """
    if unit_sampler is None:
        raise TypeError("sample_distributed: unit_sampler is required (call fastds.sample with "
                        "workers=, scheduler= or sample.segments > 1)")
    if out is None:
        raise ValueError("sample: segments or workers need --out (units write their days next to it)")
    if workers is not None and scheduler is not None:
        raise ValueError("sample: give workers (a local cluster) or scheduler (an existing one), not both")
    if workers is not None and int(workers) < 1:
        raise ValueError(f"sample: workers must be >= 1, got {workers}")
    out = Path(out)
    folder = out.with_name(out.name + ".units")
    folder.mkdir(parents=True, exist_ok=True)
    split = cfg.lag_history == "member" or cfg.members == 1
    units = plan_units(start, end, segments=cfg.segments, burn_in=cfg.burn_in, members=cfg.members,
                       split_members=split, pairs=cfg.antithetic)
    local = workers is None and scheduler is None
    # a worker's torch threads are set per unit; this process's own are left alone
    # absolute paths: a worker started from another folder must find them
    kw = dict(sample=unit_sampler, run=str(Path(run).resolve()), folder=str(folder.resolve()),
              cfg=cfg, model=model, data=None if data is None else str(Path(data).resolve()),
              device=device,
              threads=None if local else threads)
    if local:
        from tqdm.auto import tqdm
        paths = [_run_unit(u, **kw) for u in tqdm(units, desc="units", disable=not progress)]
    else:
        from dask.distributed import Client, LocalCluster, as_completed
        cluster = (LocalCluster(n_workers=int(workers), threads_per_worker=1, processes=True,
                                dashboard_address=None) if workers is not None else None)
        client = Client(cluster if cluster is not None else scheduler)
        try:
            futures = client.map(_run_unit, units, pure=False, retries=retries, **kw)
            done = {}
            for fut in as_completed(futures):
                done[fut.key] = fut.result()
            paths = [done[f.key] for f in futures]
        finally:
            client.close()
            if cluster is not None:
                cluster.close()
    opened = []
    try:
        ds = _assemble(units, paths, cfg, opened)
        # streamed from the units' files a day at a time (dask): never the whole period in memory
        write_output(ds, out)
    finally:
        for f in opened:
            f.close()
    shutil.rmtree(folder)
    return open_output(out)


def _assemble(units, paths, cfg, opened) -> xr.Dataset:
    """Per segment: members side by side (kept days only); then segments end to end. The
    units' files are opened lazily (one-day chunks) and appended to ``opened``."""
    segs = []
    for j in sorted({u.segment for u in units}):
        parts = []
        for u, p in zip(units, paths):
            if u.segment != j:
                continue
            ds = xr.open_dataset(p, chunks={"time": 1})
            opened.append(ds)
            if "member" not in ds.dims:
                ds = ds.expand_dims(member=[u.member0])
            parts.append(ds.sel(time=slice(u.first, u.last)))
        segs.append(xr.concat(parts, "member") if len(parts) > 1 else parts[0])
    ds = xr.concat(segs, "time") if len(segs) > 1 else segs[0]
    if cfg.members == 1:
        ds = ds.isel(member=0, drop=True)
    ds = ds.transpose("time", ...)
    var = next(iter(ds.data_vars))
    ds[var] = ds[var].astype(np.float32)
    if cfg.antithetic and cfg.members > 1:
        ds[var].attrs["antithetic"] = 1
    ds.attrs.update({"members": cfg.members, "member0": 0, "segments": cfg.segments,
                     "burn_in": cfg.burn_in if cfg.segments > 1 else 0, "cold_start": 0})
    return ds
