"""Each (tester, head, site)'s own baseline, and a block of a tester's windows judged against it.

Against the training reference every lot looks drifted (lots differ) and every site looks off (sites carry
permanent calibration offsets). Against its own recent history a site is quiet until something changes there.
A tester's windows are summed into a *block* until its sites hold ``block_parts`` parts each on average; the
block is then judged site by site, per test:

- ``psi``: the site's block against the site's own baseline (what that site looked like lately);
- ``noise``: the PSI sampling alone gives at these sample sizes, (bins - 1) x (1/n + 1/n_baseline): for two
  samples from one distribution PSI is close to chi2(bins - 1) x (1/n + 1/n_baseline);
- ``significant``: the same with the chi2 quantile of ``false_alarm``, so that a verdict never rests on noise
  (at 200 readings against 1,000 over 10 bins: noise 0.054, significant above 0.28 at 1e-6);
- a **site** moved on a test when its PSI passes ``site_psi`` (and ``significant``) and stands ``site_ratio``
  times above its sibling sites' median PSI: a lot change moves every site of the tester together, a site
  fault moves one;
- the **tester** moved on a test when more than half of its judged sites pass ``tester_psi``: higher, because
  ordinary lot changes move all sites too (on the synthetic floor lot-to-lot changes reach a median PSI near
  1.1 on the speed-related tests; a step of 2 sigma gives about 3.5).

A baseline learns every judged block, older readings fading so that each test keeps about ``baseline_parts``
readings: slow tester drift and ordinary lot changes become normal, and a permanent site offset is normal from
the start. A test that moved at the site or across its tester, or that an open incident holds there, does not
learn: the incident is judged against the baseline from before it began and closes when the site is back there,
while the site's other tests keep following lot changes with their siblings.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from statistics import NormalDist

import numpy as np

from ..wire.distances import psi


def chi2_quantile(dof: np.ndarray, tail: float) -> np.ndarray:
    """Upper ``tail`` quantile of chi2 with ``dof`` degrees of freedom, numpy only (Wilson-Hilferty). Above the
    exact value in the far tail, so on the safe side: at 1e-6 by 2.6 % with 9 degrees of freedom (exact 44.8), by
    15 % with one.

    >>> [round(float(q), 1) for q in chi2_quantile(np.array([9, 19]), 1e-6)]
    [46.0, 64.4]
    """
    k = np.maximum(np.asarray(dof, dtype=np.float64), 1.0)
    z = NormalDist().inv_cdf(1.0 - tail)
    return k * (1.0 - 2.0 / (9.0 * k) + z * np.sqrt(2.0 / (9.0 * k))) ** 3


@dataclass(frozen=True)
class ModelBins:
    """A model's drift reference as the windows carry it, padded for whole-array arithmetic."""

    checksum: str
    label: str                  # name/version
    columns: list[str]
    reference: np.ndarray       # [T, max_bins] proportions, zero-padded
    bins: np.ndarray            # [T] bins of each test
    score_bins: int
    expected_outlier_rate: float

    @classmethod
    def from_message(cls, m: dict) -> ModelBins:
        proportions = m["reference"]["proportions"]
        padded = np.zeros((len(proportions), max((len(p) for p in proportions), default=1)))
        for t, p in enumerate(proportions):
            padded[t, :len(p)] = p
        model = m["model"]
        return cls(model["checksum"], f"{model['name']}/{model['version']}", list(m["columns"]), padded,
                   np.array([len(p) for p in proportions]), len(m["reference"]["score_proportions"]),
                   float(m["expected_outlier_rate"]))


@dataclass
class SiteCounts:
    """One (head, site)'s histograms: tests [T, bins], outlier score [score bins], parts and outliers."""

    counts: np.ndarray
    score_counts: np.ndarray
    parts: float = 0.0
    outliers: float = 0.0

    @classmethod
    def empty(cls, model: ModelBins) -> SiteCounts:
        return cls(np.zeros(model.reference.shape), np.zeros(model.score_bins))

    def add(self, site: dict) -> None:
        """Add a window's site entry (its counts are per test over that test's bins)."""
        for t, counts in enumerate(site["counts"]):
            self.counts[t, :len(counts)] += counts
        self.score_counts[:len(site["score_counts"])] += site["score_counts"]
        self.parts += site["parts"]
        self.outliers += site["outliers"]

    def learn(self, block: SiteCounts, capacity: int, frozen: np.ndarray) -> None:
        """Add a block but for the ``frozen`` tests; older counts fade so that each test keeps about ``capacity``
        readings. The score histogram and the outlier tally learn only when no test is frozen."""
        kept = np.clip((capacity - block.counts.sum(axis=1)) / np.maximum(self.counts.sum(axis=1), 1.0), 0.0, 1.0)
        kept = np.where(frozen, 1.0, kept)
        self.counts = self.counts * kept[:, None] + np.where(frozen[:, None], 0.0, block.counts)
        if frozen.any():
            return
        kept_parts = min(1.0, max(0.0, (capacity - block.parts) / max(self.parts, 1.0)))
        self.score_counts = self.score_counts * kept_parts + block.score_counts
        self.parts = self.parts * kept_parts + block.parts
        self.outliers = self.outliers * kept_parts + block.outliers


@dataclass
class Block:
    """One agent's windows of one model, summed until its sites hold ``block_parts`` parts each on average."""

    start: float                 # data time (the agent's clock): first window's start, last window's end
    end: float
    sites: dict[tuple[int, int], SiteCounts] = field(default_factory=dict)

    @property
    def parts(self) -> float:
        return sum(site.parts for site in self.sites.values())

    def full(self, block_parts: int) -> bool:
        return bool(self.sites) and self.parts >= block_parts * len(self.sites)

    def pooled(self) -> SiteCounts:
        total = None
        for site in self.sites.values():
            if total is None:
                total = SiteCounts(site.counts.copy(), site.score_counts.copy(), site.parts, site.outliers)
            else:
                total.counts += site.counts
                total.score_counts += site.score_counts
                total.parts += site.parts
                total.outliers += site.outliers
        return total


@dataclass
class Verdict:
    """A block judged against its sites' baselines; arrays are [judged sites, tests], NaN where not judged."""

    block: Block
    sites: list[tuple[int, int]]          # the block's sites, in the order of the arrays' rows
    psi: np.ndarray                       # against the site's own baseline
    noise: np.ndarray                     # PSI from sampling alone at these sample sizes
    n: np.ndarray                         # readings in the block
    n_baseline: np.ndarray                # readings in the baseline (faded)
    psi_siblings: np.ndarray              # median PSI of the other sites of the tester
    psi_relative: np.ndarray              # against the site's baseline moved as its siblings moved
    psi_reference: np.ndarray             # against the training reference
    site_moved: np.ndarray                # bool: this site moved on this test, its siblings did not
    tester_moved: np.ndarray              # bool [tests]: most sites moved on this test
    tester_psi: np.ndarray                # [tests] median over judged sites
    tester_noise: np.ndarray              # [tests]

    def row(self, head: int, site: int) -> int:
        return self.sites.index((head, site))


def judge(block: Block, baselines: dict[tuple[int, int], SiteCounts | None], model: ModelBins, config) -> Verdict:
    """PSI of every site's block against its own baseline (``baselines[(head, site)]``, None: none yet), the
    noise level and which sites and tests moved (``config``: the thresholds of ``IncidentConfig``)."""
    sites = sorted(block.sites)
    current = np.stack([block.sites[s].counts for s in sites])                       # [S, T, B]
    base = np.stack([baselines[s].counts if baselines.get(s) is not None else np.zeros_like(current[0])
                     for s in sites])
    n, n_base = current.sum(axis=2), base.sum(axis=2)
    judged = (n >= config.block_parts / 2) & (n_base >= config.baseline_min_parts)
    with np.errstate(invalid="ignore", divide="ignore"):
        values = psi(current, base / np.maximum(n_base, 1.0)[..., None])
        sampling = 1.0 / np.maximum(n, 1.0) + 1.0 / np.maximum(n_base, 1.0)
    values = np.where(judged, values, np.nan)
    noise = np.where(judged, (model.bins - 1) * sampling, np.nan)
    significant = chi2_quantile(model.bins - 1, config.false_alarm) * sampling
    siblings = _siblings_median(values)
    relative, sibling_sampling = _relative(current, base, judged, model.bins)
    counted = judged.sum(axis=0)
    over = judged & (values > np.maximum(config.tester_psi, significant))
    tester_moved = (over.sum(axis=0) * 2 > counted) & (counted > 0)
    relative_significant = chi2_quantile(model.bins - 1, config.false_alarm) * (sampling + sibling_sampling)
    with np.errstate(invalid="ignore"):
        site_moved = (judged & (values > np.maximum(config.site_psi, significant)) & ~tester_moved
                      & (relative > np.maximum(config.site_psi, relative_significant)))
        reference = np.where(n > 0, psi(current, model.reference), np.nan)
    return Verdict(block, sites, values, noise, n, n_base, siblings, relative, reference, site_moved, tester_moved,
                   _nanmedian(values), _nanmedian(noise))


def _relative(current: np.ndarray, base: np.ndarray, judged: np.ndarray, bins: np.ndarray) -> tuple[np.ndarray,
                                                                                                   np.ndarray]:
    """Each site's block against its baseline moved the way its sibling sites moved, and the sampling term the
    siblings add to its noise. The siblings' move is bin by bin: their current proportions over their baseline
    proportions (half a reading added to every bin), applied to the site's baseline. A lot change moves every
    site alike and cancels here, whatever part of the reference's bins each site's offset puts it in; a site
    that moved on its own stands out."""
    real = np.arange(current.shape[2]) < bins[:, None]                                 # [T, B]
    mine_now, mine_before = current * judged[..., None], base * judged[..., None]
    relative, sampling = np.full(judged.shape, np.nan), np.full(judged.shape, np.nan)
    for s in range(len(current)):
        now, before = mine_now.sum(axis=0) - mine_now[s], mine_before.sum(axis=0) - mine_before[s]
        n_now, n_before = now.sum(axis=1), before.sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            moved = ((now + 0.5 * real) / (n_now + 0.5 * bins)[:, None]) / ((before + 0.5 * real)
                                                                              / (n_before + 0.5 * bins)[:, None])
            expected = np.where(real, base[s] * moved, 0.0)
            values = psi(current[s], expected / expected.sum(axis=1, keepdims=True))
        present = (n_now > 0) & (n_before > 0) & judged[s]
        relative[s] = np.where(present, values, np.nan)
        sampling[s] = np.where(present, 1.0 / np.maximum(n_now, 1.0) + 1.0 / np.maximum(n_before, 1.0), np.nan)
    return relative, sampling


def _siblings_median(values: np.ndarray) -> np.ndarray:
    """For each site, the median over the other sites (NaN where no other site was judged)."""
    out = np.full(values.shape, np.nan)
    for s in range(len(values)):
        others = np.delete(values, s, axis=0)
        out[s] = _nanmedian(others) if len(others) else np.nan
    return out


def _nanmedian(values: np.ndarray) -> np.ndarray:
    """Median over the first axis ignoring NaN; NaN (without a warning) where every value is NaN."""
    if values.shape[0] == 0:
        return np.full(values.shape[1:], np.nan)
    ordered = np.sort(values, axis=0)                            # NaN sorts last
    count = (~np.isnan(values)).sum(axis=0)
    low = np.take_along_axis(ordered, np.maximum((count - 1) // 2, 0)[None], axis=0)[0]
    high = np.take_along_axis(ordered, np.maximum(count // 2, 0)[None], axis=0)[0]
    return np.where(count > 0, (low + high) / 2, np.nan)


def noise_and_threshold(bins: int, n: float, n_baseline: float, tail: float) -> tuple[float, float]:
    """PSI sampling gives at these sizes (mean) and the PSI it exceeds with probability ``tail``."""
    sampling = 1.0 / max(n, 1.0) + 1.0 / max(n_baseline, 1.0)
    return (bins - 1) * sampling, float(chi2_quantile(np.array([bins - 1]), tail)[0]) * sampling


def binomial_z(rate: float, n: float, base_rate: float, n_base: float) -> float:
    """z of a rise from ``base_rate`` (n_base parts) to ``rate`` (n parts), pooled-variance two-sample test."""
    pooled = (rate * n + base_rate * n_base) / max(n + n_base, 1.0)
    spread = math.sqrt(max(pooled * (1 - pooled), 1e-12) * (1 / max(n, 1.0) + 1 / max(n_base, 1.0)))
    return (rate - base_rate) / spread
