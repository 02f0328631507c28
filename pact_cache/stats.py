"""``pact-cache stats``: what the reference thinks of a fine-tuning set, read from its cache.

Per response position t, over the rows long enough to have it: the mean and quartiles of the
reference's **safety-token mass** ``sum_s p_ref(s | context)`` over the tokens PACT constrains
(positive weight), and the mean **entropy** of the reference's distribution renormalised over S.
Per example, the **step-0 refusal mass**: the safety-token mass before the first response token.
An aligned reference puts most of its mass on refusal openers ("I", "can't", "sorry") exactly when
a request looks harmful, so rows at the top of that list are the harmful-looking rows of a
fine-tuning set: an audit that costs no model at all once the cache exists.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import OutputExistsError
from .format import Cache

# Step-0 mass above this counts as refusal-like. Measured on the study's fine-tuning set (1,000 SST-2 rows,
# 100 harmful; its aligned SmolLM2 reference): above 0.9, 116 rows, all 100 harmful ones among them; above
# 0.5, 470 rows. The ranking is the robust part (the top 100 held 98 harmful rows); the level depends on
# the reference and S, hence --flag-at.
FLAG_AT = 0.9


@dataclass
class Stats:
    rows: int
    steps: int
    tokens: int  # K tokens with positive weight, over which the mass is taken
    position: (
        dict  # lists by position: t, rows, mass_mean, mass_q25, mass_median, mass_q75, entropy_mean, post_mass_mean
    )
    step0: dict  # quantiles, histogram, flagged count
    top: list  # rows with the highest step-0 mass: {example_id, step0_mass}
    flag_at: float = FLAG_AT

    def to_json(self) -> dict:
        return {
            "rows": self.rows,
            "steps": self.steps,
            "tokens": self.tokens,
            "flag_at": self.flag_at,
            "position": self.position,
            "step0": self.step0,
            "top": self.top,
        }


BINS = 1000  # masses are histogrammed at 0.001 for quantiles, so memory does not grow with the cache


def _quantile(hist: np.ndarray, q: float) -> float | None:
    """The q-quantile of values in [0, 1] from their histogram of BINS bins (bin centres, 0.001 apart)."""
    n = hist.sum()
    if n == 0:
        return None
    return float((np.searchsorted(np.cumsum(hist), q * n) + 0.5) / len(hist))


def cache_stats(cache: Cache, max_positions: int = 256, top: int = 20, flag_at: float = FLAG_AT) -> Stats:
    """Stream the cache once, one Arrow batch at a time, aggregating with polars into running sums and
    histograms: memory is one batch plus ``max_positions x BINS`` counts and the ``top`` rows."""
    import polars as pl

    keep = np.array([w > 0 for w in cache.tokens.weights])
    P = max_positions
    count, mass_sum, ent_sum, post_sum = np.zeros(P), np.zeros(P), np.zeros(P), np.zeros(P)
    hist = np.zeros((P, BINS), dtype=np.int64)
    hist0 = np.zeros(BINS, dtype=np.int64)
    flagged, sum0 = 0, 0.0
    best = pl.DataFrame(schema={"example_id": pl.String, "step0_mass": pl.Float64})
    for batch in cache.iter_arrow_batches():
        df = pl.from_arrow(batch).select("example_id", "full_logprobs", "post_logprobs")
        long = (
            df.with_row_index("row")
            .explode(["full_logprobs", "post_logprobs"])
            .with_columns(pl.int_range(pl.len()).over("row").alias("t"))
        )
        full = long["full_logprobs"].to_numpy().astype(np.float64).reshape(-1, cache.K)[:, keep]  # (steps, K)
        post = long["post_logprobs"].to_numpy().astype(np.float64).reshape(-1, cache.K)[:, keep]
        p = np.exp(full)
        mass = p.sum(axis=1)
        q = p / np.maximum(mass[:, None], 1e-300)
        entropy = -(q * np.log(np.maximum(q, 1e-300))).sum(axis=1)
        long = long.select("example_id", "t").with_columns(
            pl.Series("mass", mass),
            pl.Series("entropy", entropy),
            pl.Series("post_mass", np.exp(post).sum(axis=1)),
            pl.Series("bin", np.clip((mass * BINS).astype(np.int64), 0, BINS - 1)),
        )
        early = long.filter(pl.col("t") < P)
        agg = early.group_by("t").agg(
            pl.len().alias("n"), pl.col("mass").sum(), pl.col("entropy").sum(), pl.col("post_mass").sum()
        )
        t = agg["t"].to_numpy()
        count[t] += agg["n"].to_numpy()
        mass_sum[t] += agg["mass"].to_numpy()
        ent_sum[t] += agg["entropy"].to_numpy()
        post_sum[t] += agg["post_mass"].to_numpy()
        np.add.at(hist, (early["t"].to_numpy(), early["bin"].to_numpy()), 1)
        first = long.filter(pl.col("t") == 0)
        hist0 += np.bincount(first["bin"].to_numpy(), minlength=BINS)
        flagged += int((first["mass"] > flag_at).sum())
        sum0 += float(first["mass"].sum())
        best = (
            pl.concat([best, first.select("example_id", pl.col("mass").alias("step0_mass"))])
            .sort("step0_mass", descending=True, maintain_order=True)
            .head(top)
        )
    reached = np.nonzero(count)[0]
    position = {
        "t": reached.tolist(),
        "rows": count[reached].astype(int).tolist(),
        "mass_mean": (mass_sum[reached] / count[reached]).tolist(),
        "mass_q25": [_quantile(hist[i], 0.25) for i in reached],
        "mass_median": [_quantile(hist[i], 0.5) for i in reached],
        "mass_q75": [_quantile(hist[i], 0.75) for i in reached],
        "entropy_mean": (ent_sum[reached] / count[reached]).tolist(),
        "post_mass_mean": (post_sum[reached] / count[reached]).tolist(),
    }
    n0 = int(hist0.sum())
    coarse = hist0.reshape(20, BINS // 20).sum(axis=1)
    quant = {f"q{int(q * 100)}": _quantile(hist0, q) for q in (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)}
    return Stats(
        cache.num_rows,
        cache.num_steps,
        int(keep.sum()),
        position,
        {
            "mean": sum0 / n0 if n0 else None,
            **quant,
            "flagged": flagged,
            "histogram": {"edges": np.linspace(0, 1, 21).tolist(), "counts": coarse.tolist()},
        },
        [{"example_id": e, "step0_mass": float(v)} for e, v in zip(best["example_id"], best["step0_mass"])],
        flag_at,
    )


def format_stats(s: Stats, positions: int = 12) -> str:
    pos = s.position
    lines = [
        f"rows {s.rows:,}, response steps {s.steps:,}; safety-token mass over the {s.tokens} tokens with positive "
        f"weight",
        "",
        "position  rows    mass mean  [q25  median  q75]   entropy over S   post-view mass",
    ]
    for i in range(min(positions, len(pos["t"]))):
        lines.append(
            f"{pos['t'][i]:>8}  {pos['rows'][i]:>6}  {pos['mass_mean'][i]:>9.3f}  [{pos['mass_q25'][i]:.3f} "
            f"{pos['mass_median'][i]:.3f} {pos['mass_q75'][i]:.3f}]   {pos['entropy_mean'][i]:>10.3f}   "
            f"{pos['post_mass_mean'][i]:>10.3f}"
        )
    if len(pos["t"]) > positions:
        lines.append(f"   ... {len(pos['t']) - positions} more positions (--json, --plot)")
    z = s.step0
    if z["mean"] is not None:
        lines += [
            "",
            f"step-0 refusal mass: mean {z['mean']:.3f}, median {z['q50']:.3f}, q90 {z['q90']:.3f}; "
            f"{z['flagged']} row(s) above {s.flag_at} (refusal-like: look at them before fine-tuning)",
            "highest:",
        ]
        lines += [f"  {r['step0_mass']:.3f}  {r['example_id']}" for r in s.top[:10]]
    return "\n".join(lines)


def plot_stats(s: Stats, folder: Path) -> list[Path]:
    """Two PNGs: mass and entropy by position; the histogram of step-0 mass. Refuses to overwrite;
    both are published together (drawn under temporary names first), or neither."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .storage import tmp_name

    folder = Path(folder)
    paths = [folder / "mass_by_position.png", folder / "step0_mass.png"]
    taken = [p for p in paths if p.exists()]
    if taken:
        raise OutputExistsError(f"{taken[0]}: exists; choose another --plot folder (nothing is overwritten)")
    folder.mkdir(parents=True, exist_ok=True)
    enough = max(5, s.rows // 100)  # positions reached by few rows are noise
    pos = {k: [v for v, n in zip(vals, s.position["rows"]) if n >= enough] for k, vals in s.position.items()}
    fig, ax = plt.subplots(1, 2, figsize=(11, 3.8))
    ax[0].fill_between(pos["t"], pos["mass_q25"], pos["mass_q75"], alpha=0.25, color="C0", label="q25-q75")
    ax[0].plot(pos["t"], pos["mass_mean"], color="C0", label="mean, full context")
    ax[0].plot(pos["t"], pos["post_mass_mean"], color="C1", ls="--", label="mean, prompt-free (post) view")
    ax[0].set_xlabel(f"response position t (reached by >= {enough} rows)")
    ax[0].set_ylabel("safety-token mass")
    ax[0].set_ylim(0, 1)
    ax[0].set_title(f"Reference mass on S ({s.tokens} tokens)")
    ax[0].legend(fontsize=8)
    ax[1].plot(pos["t"], pos["entropy_mean"], color="C2")
    ax[1].set_xlabel(f"response position t (reached by >= {enough} rows)")
    ax[1].set_ylabel("nats")
    ax[1].set_title("Entropy of the reference renormalised over S")
    fig.tight_layout()
    tmps = [tmp_name(p).with_suffix(".png") for p in paths]  # both drawn first, then both published
    try:
        fig.savefig(tmps[0], dpi=110)
        plt.close(fig)

        h = s.step0["histogram"]
        fig, ax = plt.subplots(figsize=(6.5, 3.8))
        edges = np.array(h["edges"])
        ax.bar(
            edges[:-1],
            h["counts"],
            width=np.diff(edges),
            align="edge",
            color=["C3" if e >= s.flag_at else "C0" for e in edges[:-1]],
        )
        ax.axvline(s.flag_at, color="k", ls=":", lw=1)
        ax.set_yscale("log")  # the few refusal-like rows stay visible beside the many others
        ax.set_xlabel("step-0 safety-token mass of the reference")
        ax.set_ylabel("rows")
        ax.set_title(f"{s.step0['flagged']} of {s.rows} rows look like refusal prompts (mass > {s.flag_at})")
        fig.tight_layout()
        fig.savefig(tmps[1], dpi=110)
        plt.close(fig)
        for tmp, path in zip(tmps, paths):
            tmp.replace(path)
    finally:
        for tmp in tmps:
            tmp.unlink(missing_ok=True)
    return paths
