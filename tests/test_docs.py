"""The README's skill claims are the committed protocol tables' numbers.

The README summarises the full tier in one table whose every row links the paired table it
was read from (``docs/protocol/full-*-paired.md``, written by ``fastds benchmark --pair``);
this test re-reads each linked table, so a table rebuilt with new scores, or a row edited by
hand, cannot leave the README saying something the protocol does not.
"""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
VERDICT = {"ddpm better": "+", "tie": "=", "ddpm worse": "−"}
NULLS = ("unet+iid", "unet+grf", "unet+resample", "unet+resample-fit", "unet+resample-wide")
EVENTS = ("energy_p4", "variogram_p4", "twcrps_q90")


def _cells(line):
    return [c.strip() for c in line.strip().strip("|").split("|")]


def _paired_table(path):
    """(per-metric means by model, paired rows keyed by (metric, model)) of a pairing file."""
    means, paired, header = {}, {}, None
    for line in path.read_text().splitlines():
        c = _cells(line)
        if not line.startswith("| ") or len(c) < 2:
            continue
        if c[0] == "metric" and header is None and "ddpm" in c:
            header = c
        elif len(c) == 6 and c[5] in VERDICT:
            paired[(c[0], c[1])] = c
        elif header and len(c) == len(header) and c[0] != "metric" and not c[0].startswith("---"):
            means[c[0]] = dict(zip(header[1:], c[1:]))
    return means, paired


def _signed(x, digits=4):
    return f"{float(x):+.{digits}f}".replace("-", "−")


def _readme_rows():
    text = (ROOT / "README.md").read_text()
    return [line for line in text.splitlines()
            if re.match(r"\| (plume|smooth|rough), seeds? ", line) and "docs/protocol/full-" in line]


def _table_of(row):
    """The committed table a README row links, relative to the checkout."""
    return re.search(r"\((docs/protocol/[^)]+)\)", row)[1]


def test_readme_has_a_full_tier_row_per_committed_twin():
    twins = {_cells(r)[0].split(",")[0] for r in _readme_rows()}
    assert twins == {"plume", "smooth", "rough"}


@pytest.mark.parametrize("row", _readme_rows(), ids=_table_of)
def test_readme_full_tier_row_matches_its_table(row):
    c = _cells(row)
    path = ROOT / _table_of(row)
    means, paired = _paired_table(path)
    seeds = re.search(r"-s(\d+)", path.name)[1]
    # "seed 2", "seeds 0–2", "seeds 0 and 2", "seed 0 (fp32 replicate)": which run, in brackets
    label = re.sub(r"\s*\(.*\)$", "", c[0].split(",", 1)[1].strip())
    assert label.startswith("seeds " if len(seeds) > 1 else "seed ") and label.endswith(seeds[-1]), (c[0], path.name)
    r2 = paired[("r2_mean", "unet")]
    assert c[1] == r2[2], "days"
    for null, cell in zip(NULLS, c[2:7]):
        assert cell == "".join(VERDICT[paired[(m, null)][5]] for m in EVENTS), null
    lo, hi = r2[4].strip("[]").split(",")
    assert c[7] == f"{_signed(r2[3])} [{_signed(lo)}, {_signed(hi)}]", "R² against the U-Net"
    assert c[8] == f"{float(means['spread_skill']['ddpm-raw']):.3f}", "raw spread/skill"


def test_readme_spectrum_ranges_are_the_linked_tables():
    """The sentence after the full-tier table gives each model's range of one member's
    power-spectrum ratio (every band, every linked table): the tables' own extremes."""
    text = " ".join((ROOT / "README.md").read_text().split())
    tables = [_paired_table(ROOT / _table_of(r))[0] for r in _readme_rows()]

    def extremes(model):
        v = [float(m[k][model]) for m in tables for k in m if k.startswith("spectrum_ratio_b")]
        return min(v), max(v)
    lo, hi = extremes("ddpm")
    assert f"power-spectrum ratio is {lo:.2f}–{hi:.2f} in every band" in text
    assert f"finest band, {hi:.3f}, is above it" in text
    for model, label, digits in (("unet", "the U-Net", 2), ("unet+grf", "`unet+grf`", 2),
                                 ("unet+resample", "`unet+resample`", 2), ("unet+iid", "`unet+iid`", 0)):
        lo, hi = extremes(model)
        want = f"{label} {lo:.2f}–{hi:.{digits}f}"
        assert want in text, want
