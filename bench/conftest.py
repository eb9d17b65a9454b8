"""Shared benchmark plumbing: every benchmark records (group, provider, bytes moved), and the
terminal summary prints each group's providers side by side with GB/s and ratios to the
group's reference provider and to a plain memory copy of the same bytes."""
import json
import os
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

_RESULTS = defaultdict(dict)
_PEERS = {}  # group -> the provider every other is also compared with (the best same-work peer)


@pytest.fixture
def record():
    def _record(benchmark, group, provider, nbytes=None, items=None, unit="items", median_s=None,
                peer=False, extra=None):
        """``median_s`` overrides the timed median when the timed call stands for a part of
        the work (e.g. a subset of patches scaled to a whole day); the benchmark says so.
        ``peer``: this provider is the group's same-work peer (ratios are printed to it).
        ``extra``: other measured figures, printed after the ratios (e.g. peak RSS)."""
        stats = benchmark.stats.stats if benchmark.stats else None
        if stats is None:  # --benchmark-disable: the call ran once, nothing was timed
            return
        if peer:
            _PEERS[group] = provider
        _RESULTS[group][provider] = {"median_s": median_s if median_s is not None else stats.median,
                                     "min_s": stats.min, "iqr_s": stats.iqr, "rounds": stats.rounds,
                                     "bytes": nbytes, "items": items, "unit": unit,
                                     "extra": dict(extra or {})}
    return _record


def pytest_terminal_summary(terminalreporter):
    if not _RESULTS:
        return
    tr = terminalreporter
    tr.section("fastds: providers side by side (median)")
    for group, rows in _RESULTS.items():
        tr.write_line(f"[{group}]")
        ref = rows.get("ref") or next(iter(rows.values()))
        copy = rows.get("memcpy")
        loop = rows.get("numpy_loop")  # the plain loop a peer writes first (stitch targets)
        for name, r in rows.items():
            line = f"  {name:>14}: {r['median_s'] * 1e3:10.3f} ms"
            if r.get("rounds", 0) > 1:
                line += f" (min {r['min_s'] * 1e3:.3f}, IQR {r['iqr_s'] * 1e3:.3f}, n={r['rounds']})"
            if r["bytes"]:
                line += f"  {r['bytes'] / r['median_s'] / 1e9:7.2f} GB/s"
            if r["items"]:
                line += f"  {r['items'] / r['median_s']:12.1f} {r['unit']}/s"
            line += f"  speedup vs ref {ref['median_s'] / r['median_s']:8.2f}x"
            if copy and name != "memcpy":
                # bandwidth over memcpy's, each for the bytes it must move (a fused pass that
                # also writes the patches back moves more than the copy does)
                scale = r["bytes"] / copy["bytes"] if r["bytes"] and copy["bytes"] else 1.0
                line += f"  of memcpy bandwidth {scale * copy['median_s'] / r['median_s']:5.2f}"
            floor = rows.get("read_kept")  # reading the kept rows alone (bench_stitch)
            if floor and name not in ("read_kept", "memcpy"):
                line += f"  of read_kept {floor['median_s'] / r['median_s']:5.2f}"
            if loop and name not in ("numpy_loop", "memcpy"):
                line += f"  vs numpy_loop {loop['median_s'] / r['median_s']:6.1f}x"
            peer = rows.get(_PEERS.get(group, ""))
            if peer and name != _PEERS[group]:
                line += f"  vs {_PEERS[group]} {peer['median_s'] / r['median_s']:6.2f}x"
            for k, v in r.get("extra", {}).items():
                line += f"  {k} {v}"
            tr.write_line(line)
    out = Path(os.environ.get("FASTDS_BENCH_JSON", ".benchmarks/fastds_summary.json"))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(_RESULTS, indent=2))
