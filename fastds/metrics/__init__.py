"""Evaluation metrics (METHOD.md §7): numpy/xarray in, xarray/pandas out."""
from .domain import summarize_wasserstein, wasserstein_by_day
from .ensemble import crps, rank_histogram, spread_skill
from .proper import day_scores_ensemble
from .skill import day_scores, summarize
from .species import correlation_bias, species_correlation
from .spatial import power_spectrum, seam_statistic, semivariogram, semivariogram_ref
from .temporal import acf_pacf, lag_curves

__all__ = ["day_scores", "summarize", "semivariogram", "semivariogram_ref", "power_spectrum",
           "acf_pacf", "lag_curves", "wasserstein_by_day", "summarize_wasserstein", "crps",
           "spread_skill", "rank_histogram", "seam_statistic", "day_scores_ensemble",
           "species_correlation", "correlation_bias"]
