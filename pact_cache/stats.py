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
    position: dict  # lists by position: t, rows, mass_mean, mass_q25, mass_median, mass_q75, entropy_mean, post_mass_mean
    step0: dict  # quantiles, histogram, flagged count
    top: list  # rows with the highest step-0 mass: {example_id, step0_mass}
    flag_at: float = FLAG_AT

    def to_json(self) -> dict:
        return {"rows": self.rows, "steps": self.steps, "tokens": self.tokens, "flag_at": self.flag_at,
                "position": self.position, "step0": self.step0, "top": self.top}


def cache_stats(cache: Cache, max_positions: int = 256, top: int = 20, flag_at: float = FLAG_AT) -> Stats:
    """Stream the cache once (one Arrow batch at a time) and aggregate with polars."""
    import polars as pl

    keep = np.array([w > 0 for w in cache.tokens.weights])
    per_pos: list[pl.DataFrame] = []
    step0: list[pl.DataFrame] = []
    for batch in cache.iter_arrow_batches():
        df = pl.from_arrow(batch).select("example_id", "full_logprobs", "post_logprobs")
        long = df.with_row_index("row").explode(["full_logprobs", "post_logprobs"]).with_columns(
            pl.int_range(pl.len()).over("row").alias("t"))
        full = long["full_logprobs"].to_numpy().astype(np.float64).reshape(-1, cache.K)[:, keep]  # (steps, K)
        post = long["post_logprobs"].to_numpy().astype(np.float64).reshape(-1, cache.K)[:, keep]
        p = np.exp(full)
        mass = p.sum(axis=1)
        q = p / np.maximum(mass[:, None], 1e-300)
        entropy = -(q * np.log(np.maximum(q, 1e-300))).sum(axis=1)
        long = long.select("row", "example_id", "t").with_columns(
            pl.Series("mass", mass), pl.Series("entropy", entropy), pl.Series("post_mass", np.exp(post).sum(axis=1)))
        per_pos.append(long.filter(pl.col("t") < max_positions).select("t", "mass", "entropy", "post_mass"))
        step0.append(long.filter(pl.col("t") == 0).select("example_id", pl.col("mass").alias("step0_mass")))
    steps = pl.concat(per_pos) if per_pos else pl.DataFrame(schema={"t": pl.Int64, "mass": pl.Float64, "entropy": pl.Float64, "post_mass": pl.Float64})
    by_t = (steps.group_by("t").agg(pl.len().alias("rows"), pl.col("mass").mean().alias("mass_mean"),
                                    pl.col("mass").quantile(0.25).alias("mass_q25"), pl.col("mass").median().alias("mass_median"),
                                    pl.col("mass").quantile(0.75).alias("mass_q75"), pl.col("entropy").mean().alias("entropy_mean"),
                                    pl.col("post_mass").mean().alias("post_mass_mean"))
            .sort("t"))
    first = pl.concat(step0) if step0 else pl.DataFrame(schema={"example_id": pl.String, "step0_mass": pl.Float64})
    m0 = first["step0_mass"].to_numpy()
    hist, edges = np.histogram(m0, bins=20, range=(0.0, 1.0))
    quant = {f"q{int(q * 100)}": float(np.quantile(m0, q)) if len(m0) else None for q in (0.1, 0.25, 0.5, 0.75, 0.9, 0.99)}
    top_rows = first.sort("step0_mass", descending=True).head(top)
    return Stats(cache.num_rows, cache.num_steps, int(keep.sum()),
                 {c: by_t[c].to_list() for c in by_t.columns},
                 {"mean": float(m0.mean()) if len(m0) else None, **quant, "flagged": int((m0 > flag_at).sum()),
                  "histogram": {"edges": edges.tolist(), "counts": hist.tolist()}},
                 [{"example_id": e, "step0_mass": float(v)} for e, v in zip(top_rows["example_id"], top_rows["step0_mass"])], flag_at)


def format_stats(s: Stats, positions: int = 12) -> str:
    pos = s.position
    lines = [f"rows {s.rows:,}, response steps {s.steps:,}; safety-token mass over the {s.tokens} tokens with positive weight",
             "", "position  rows    mass mean  [q25  median  q75]   entropy over S   post-view mass"]
    for i in range(min(positions, len(pos["t"]))):
        lines.append(f"{pos['t'][i]:>8}  {pos['rows'][i]:>6}  {pos['mass_mean'][i]:>9.3f}  [{pos['mass_q25'][i]:.3f} "
                     f"{pos['mass_median'][i]:.3f} {pos['mass_q75'][i]:.3f}]   {pos['entropy_mean'][i]:>10.3f}   {pos['post_mass_mean'][i]:>10.3f}")
    if len(pos["t"]) > positions:
        lines.append(f"   ... {len(pos['t']) - positions} more positions (--json, --plot)")
    z = s.step0
    if z["mean"] is not None:
        lines += ["", f"step-0 refusal mass: mean {z['mean']:.3f}, median {z['q50']:.3f}, q90 {z['q90']:.3f}; "
                      f"{z['flagged']} row(s) above {s.flag_at} (refusal-like: look at them before fine-tuning)",
                  "highest:"]
        lines += [f"  {r['step0_mass']:.3f}  {r['example_id']}" for r in s.top[:10]]
    return "\n".join(lines)


def plot_stats(s: Stats, folder: Path) -> list[Path]:
    """Two PNGs: mass and entropy by position; the histogram of step-0 mass. Refuses to overwrite."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .format import tmp_name

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
    tmp = tmp_name(paths[0]).with_suffix(".png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(paths[0])

    h = s.step0["histogram"]
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    edges = np.array(h["edges"])
    ax.bar(edges[:-1], h["counts"], width=np.diff(edges), align="edge", color=["C3" if e >= s.flag_at else "C0" for e in edges[:-1]])
    ax.axvline(s.flag_at, color="k", ls=":", lw=1)
    ax.set_yscale("log")  # the few refusal-like rows stay visible beside the many others
    ax.set_xlabel("step-0 safety-token mass of the reference")
    ax.set_ylabel("rows")
    ax.set_title(f"{s.step0['flagged']} of {s.rows} rows look like refusal prompts (mass > {s.flag_at})")
    fig.tight_layout()
    tmp = tmp_name(paths[1]).with_suffix(".png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    tmp.replace(paths[1])
    return paths
