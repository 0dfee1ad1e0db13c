"""The report's figures: matplotlib on the Agg canvas (no display, no pyplot state), as PNG bytes.

Each `draw_*` function takes the small frames of `segspark.report.data` and returns a Figure;
`png(draw, ...)` draws it under the report's style and encodes it. Sizes and DPI are modest so that
a report with a few dozen figures stays around a megabyte.
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Callable, Mapping, Sequence

import matplotlib
import numpy as np
import pandas as pd
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import TwoSlopeNorm
from matplotlib.figure import Figure

from segspark.models.contract import NOISE_SEGMENT

DPI = 90

STYLE = {
    "font.size": 8.5,
    "axes.titlesize": 9,
    "axes.labelsize": 8.5,
    "xtick.labelsize": 7.5,
    "ytick.labelsize": 7.5,
    "legend.fontsize": 7.5,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": False,
    "axes.edgecolor": "#555555",
    "axes.titleweight": "bold",
    "svg.fonttype": "none",
}
BAR = "#3b6ea8"
ACCENT = "#d1495b"
MUTED = "#9aa5b1"


def png(draw: Callable[..., Figure], *args, **kwargs) -> bytes:
    """`draw(*args, **kwargs)` under the report's style, as PNG bytes (no metadata)."""
    with matplotlib.rc_context(STYLE):
        fig = draw(*args, **kwargs)
        FigureCanvasAgg(fig)
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def plain(text: object) -> str:
    """Text from the tables as matplotlib shows it literally (a `$` would start math mode)."""
    return str(text).replace("$", r"\$")


def segment_label(segment: object, name: object, width: int = 42) -> str:
    """`3 · high-value frequent buyers`, shortened to `width` characters."""
    text = f"{segment} · {name}" if name not in (None, "") else str(segment)
    return plain(textwrap.shorten(text, width=width, placeholder="…"))


def segment_colours(segments: Sequence[int]) -> dict[int, tuple]:
    """A stable colour per segment id (grey for noise)."""
    palette = matplotlib.colormaps["tab10" if len(segments) <= 10 else "tab20"]
    ordered = sorted({int(s) for s in segments if int(s) != NOISE_SEGMENT})
    colours = {s: palette(i % palette.N) for i, s in enumerate(ordered)}
    colours[NOISE_SEGMENT] = (0.7, 0.7, 0.7, 1.0)
    return colours


def draw_segment_sizes(profiles: pd.DataFrame, model: str) -> Figure:
    """Horizontal bars of users per segment, labelled with the share."""
    rows = profiles.sort_values("segment")
    fig = Figure(figsize=(8.5, 0.8 + 0.32 * len(rows)))
    ax = fig.add_subplot()
    labels = [segment_label(s, n, 50) for s, n in zip(rows["segment"], rows["segment_name"], strict=True)]
    colours = segment_colours(list(rows["segment"]))
    y = np.arange(len(rows))
    ax.barh(y, rows["size"], color=[colours[int(s)] for s in rows["segment"]])
    ax.set_yticks(y, labels)
    ax.invert_yaxis()
    top = float(rows["size"].max() or 1)
    for yi, size, share in zip(y, rows["size"], rows["share"], strict=True):
        ax.text(size + top * 0.01, yi, f"{int(size):,}  ({share:.1%})", va="center", fontsize=7.5)
    ax.set_xlim(0, top * 1.25)
    ax.set_xlabel("users")
    ax.set_title(f"{plain(model)}: users per segment")
    return fig


def feature_order(profiles: pd.DataFrame) -> list[str]:
    """Features in the order the profiles list them (the catalog's), then any others."""
    seen: dict[str, None] = {}
    for zscores in profiles["feature_zscores"]:
        for name in zscores:
            seen.setdefault(name, None)
    return list(seen)


def draw_zscore_heatmap(profiles: pd.DataFrame, model: str, limit: float = 3.0) -> Figure:
    """Segment x feature z-scores (segment mean against all users, in population standard deviations)."""
    rows = profiles.sort_values("segment")
    features = feature_order(rows)
    values = np.array([[float(z.get(f) or 0.0) for f in features] for z in rows["feature_zscores"]])
    fig = Figure(figsize=(min(3.0 + 0.17 * len(features), 13.0), 1.6 + 0.3 * len(rows)))
    ax = fig.add_subplot()
    image = ax.imshow(np.clip(values, -limit, limit), cmap="RdBu_r", norm=TwoSlopeNorm(0.0, -limit, limit),
                      aspect="auto", interpolation="nearest")
    ax.set_yticks(range(len(rows)), [segment_label(s, n, 48) for s, n in zip(rows["segment"], rows["segment_name"], strict=True)])
    ax.set_xticks(range(len(features)), [plain(f) for f in features], rotation=90, fontsize=6.5)
    ax.set_title(f"{plain(model)}: feature z-scores per segment (clipped at ±{limit:g})")
    bar = fig.colorbar(image, ax=ax, fraction=0.025, pad=0.01)
    bar.set_label("z-score", fontsize=7.5)
    return fig


def draw_top_features(profiles: pd.DataFrame, model: str, top_n: int = 5) -> Figure:
    """One small panel per segment: the z-scores of its top distinguishing features."""
    rows = profiles.sort_values("segment").reset_index(drop=True)
    cols = min(3, max(len(rows), 1))
    grid = math.ceil(len(rows) / cols)
    fig = Figure(figsize=(10.5, 0.5 + 1.75 * grid), layout="constrained")
    axes = fig.subplots(grid, cols, squeeze=False)
    for i, row in rows.iterrows():
        ax = axes[i // cols][i % cols]
        names = list(row["top_features"])[:top_n]
        values = [float(row["feature_zscores"].get(n) or 0.0) for n in names]
        y = np.arange(len(names))
        ax.barh(y, values, color=[ACCENT if v > 0 else BAR for v in values])
        ax.set_yticks(y, [plain(n) for n in names])
        ax.invert_yaxis()
        ax.axvline(0, color="#333333", linewidth=0.6)
        reach = max([abs(v) for v in values] + [1.0]) * 1.15
        ax.set_xlim(-reach, reach)
        ax.set_title(segment_label(row["segment"], row["segment_name"], 46), fontsize=8)
        ax.tick_params(axis="x", labelsize=7)
        if not names:
            ax.text(0.5, 0.5, "no feature stands out", ha="center", va="center", transform=ax.transAxes)
    for j in range(len(rows), grid * cols):
        axes[j // cols][j % cols].set_visible(False)
    fig.suptitle(f"{plain(model)}: top distinguishing features (z-score)", fontsize=9, fontweight="bold")
    return fig


def draw_segment_silhouettes(rows: pd.DataFrame, model: str, overall: float | None) -> Figure:
    """Horizontal bars of each segment's mean silhouette (segment, segment_name, silhouette; NaN: not
    measured), on the silhouette's full scale, with the model's overall silhouette dashed."""
    rows = rows.sort_values("segment")
    fig = Figure(figsize=(8.5, 0.9 + 0.32 * len(rows)))
    ax = fig.add_subplot()
    colours = segment_colours(list(rows["segment"]))
    y = np.arange(len(rows))
    values = pd.to_numeric(rows["silhouette"], errors="coerce").to_numpy(dtype=float)
    ax.barh(y, np.nan_to_num(values), color=[colours[int(s)] for s in rows["segment"]])
    ax.set_yticks(y, [segment_label(s, n, 50) for s, n in zip(rows["segment"], rows["segment_name"], strict=True)])
    ax.invert_yaxis()
    for yi, value in zip(y, values, strict=True):
        text, at = ("not measured", 0.02) if np.isnan(value) else (f"{value:.2f}", max(value, 0.0) + 0.02)
        ax.text(at, yi, text, va="center", fontsize=7.5)
    ax.axvline(0, color="#333333", linewidth=0.6)
    if overall is not None:
        ax.axvline(overall, color=ACCENT, linestyle="--", linewidth=1, label=f"all segments: {overall:.2f}")
        ax.legend(loc="lower right", frameon=False)
    ax.set_xlim(-1.0, 1.0)
    ax.set_xlabel("mean silhouette of the segment's sampled users (1: well apart; 0 or below: overlaps a neighbour)")
    ax.set_title(f"{plain(model)}: silhouette per segment")
    return fig


def draw_projection(coords: np.ndarray, segments: np.ndarray, names: Mapping[int, str], title: str,
                    explained: tuple[float, float]) -> Figure:
    """Scatter of the 2-D projection coloured by segment (axes cropped to the central 99% of points)."""
    fig = Figure(figsize=(9.5, 5.2))
    ax = fig.add_subplot()
    colours = segment_colours(list(names))
    for segment in sorted(names, key=lambda s: (s == NOISE_SEGMENT, s)):
        mask = segments == segment
        ax.scatter(coords[mask, 0], coords[mask, 1], s=5, alpha=0.65, color=colours[segment], linewidths=0,
                   label=f"{segment_label(segment, names[segment], 40)} ({int(mask.sum()):,})")
    for axis, setter in ((0, ax.set_xlim), (1, ax.set_ylim)):
        low, high = np.percentile(coords[:, axis], [0.5, 99.5])
        margin = (high - low) * 0.05 or 1.0
        setter(low - margin, high + margin)
    ax.set_xlabel(f"PC1 ({explained[0]:.0%} of variance)")
    ax.set_ylabel(f"PC2 ({explained[1]:.0%} of variance)")
    ax.set_title(plain(title))
    ax.legend(loc="center left", bbox_to_anchor=(1.01, 0.5), markerscale=2.5, frameon=False)
    return fig


# (column, label, "higher"/"lower" is better)
SELECTION_METRICS = (
    ("silhouette", "silhouette", "higher"),
    ("davies_bouldin", "Davies-Bouldin", "lower"),
    ("calinski_harabasz", "Calinski-Harabasz", "higher"),
    ("dunn", "Dunn", "higher"),
    ("wss", "WSS", "lower"),
    ("bic", "BIC", "lower"),
)


def draw_selection_curves(sweep: pd.DataFrame, model: str, chosen_k: int | None) -> Figure:
    """Each measured criterion against k, the chosen k marked."""
    sweep = sweep.sort_values("k")
    panels = [(c, label, better) for c, label, better in SELECTION_METRICS
              if c in sweep and pd.to_numeric(sweep[c], errors="coerce").notna().any()]
    fig = Figure(figsize=(min(2.6 * max(len(panels), 1) + 0.5, 11.0), 2.6), layout="constrained")
    axes = fig.subplots(1, max(len(panels), 1), squeeze=False)[0]
    for ax, (column, label, better) in zip(axes, panels, strict=False):
        values = pd.to_numeric(sweep[column], errors="coerce")
        ax.plot(sweep["k"], values, marker="o", markersize=3.5, color=BAR, linewidth=1.3)
        if chosen_k is not None and (sweep["k"] == chosen_k).any():
            ax.axvline(chosen_k, color=ACCENT, linestyle="--", linewidth=1)
            ax.plot([chosen_k], values[sweep["k"] == chosen_k], marker="o", markersize=6, color=ACCENT)
        ax.set_title(f"{label}\n({better} is better)", fontsize=8)
        ax.set_xlabel("k")
        ax.set_xticks(sorted({int(k) for k in sweep["k"]}))
    fig.suptitle(f"{plain(model)}: k sweep" + (f" (chosen k={chosen_k})" if chosen_k is not None else ""),
                 fontsize=9, fontweight="bold")
    return fig


def draw_membership(histogram: pd.DataFrame, per_segment: pd.DataFrame, model: str, bins: int) -> Figure:
    """Histogram of the membership probability, and its mean per segment."""
    fig = Figure(figsize=(10, 3.0 + 0.12 * len(per_segment)), layout="constrained")
    left, right = fig.subplots(1, 2, gridspec_kw={"width_ratios": [1.1, 1]})
    width = 1.0 / bins
    left.bar(histogram["bin"] * width, histogram["users"], width=width * 0.92, align="edge", color=BAR)
    left.set_xlim(0, 1)
    left.set_xlabel("membership probability of the assigned segment")
    left.set_ylabel("users")
    left.set_title(f"{plain(model)}: membership probability")
    rows = per_segment.sort_values("segment")
    y = np.arange(len(rows))
    colours = segment_colours(list(rows["segment"]))
    right.barh(y, rows["mean_probability"], color=[colours[int(s)] for s in rows["segment"]])
    right.set_yticks(y, [segment_label(s, n, 36) for s, n in zip(rows["segment"], rows["segment_name"], strict=True)])
    right.invert_yaxis()
    right.set_xlim(0, 1.18)
    for yi, mean, below in zip(y, rows["mean_probability"], rows["below_half"], strict=True):
        right.text(float(mean) + 0.01, yi, f"{mean:.2f} ({int(below):,} < 0.5)", va="center", fontsize=7)
    right.set_xlabel("mean membership probability")
    right.set_title("per segment")
    return fig


def draw_anomaly_scores(stats: pd.DataFrame, histogram: pd.DataFrame, bins: int) -> Figure:
    """One histogram of anomaly_score per model, with the lowest flagged score marked."""
    models = list(stats["model"])
    cols = min(2, len(models))
    grid = math.ceil(len(models) / cols)
    fig = Figure(figsize=(10, 0.4 + 2.4 * grid), layout="constrained")
    axes = fig.subplots(grid, cols, squeeze=False)
    for i, row in enumerate(stats.itertuples()):
        ax = axes[i // cols][i % cols]
        counts = histogram[histogram["model"] == row.model].set_index("bin")["users"].reindex(range(bins), fill_value=0)
        width = (row.high - row.low) / bins if row.high > row.low else 1.0
        edges = row.low + np.arange(bins) * width
        ax.bar(edges, counts.values, width=width * 0.92, align="edge", color=BAR)
        share = (row.anomalies or 0) / row.users if row.users else 0.0
        if row.threshold is not None and not pd.isna(row.threshold):
            ax.axvline(min(row.threshold, row.high), color=ACCENT, linestyle="--", linewidth=1,
                       label=f"lowest flagged score {row.threshold:.3g}")
            ax.legend(loc="upper right", frameon=False)
        ax.set_title(f"{plain(row.model)}: {int(row.anomalies or 0):,} of {int(row.users):,} flagged ({share:.1%})",
                     fontsize=8)
        ax.set_xlabel("anomaly_score" + (" (the last bin includes those above the 99th percentile)" if row.max > row.high else ""))
        ax.set_ylabel("users")
    for j in range(len(models), grid * cols):
        axes[j // cols][j % cols].set_visible(False)
    return fig


def _flow_label(segment, names: Mapping[int, str], missing: str) -> str:
    if segment is None or pd.isna(segment):
        return missing
    return segment_label(int(segment), names.get(int(segment), ""), 34)


def draw_transitions(flows: pd.DataFrame, model: str, previous_run: str | None, run_id: str,
                     from_names: Mapping[int, str], to_names: Mapping[int, str]) -> Figure:
    """From (previous run) x to (this run) matrix of users, with the counts written in the cells."""
    def keys(column: str) -> list:
        present = flows[column].dropna().astype(int).unique().tolist()
        return sorted(present) + ([None] if flows[column].isna().any() else [])

    sources, targets = keys("from_segment"), keys("to_segment")
    matrix = np.zeros((len(sources), len(targets)))
    for row in flows.itertuples():
        i = sources.index(None if pd.isna(row.from_segment) else int(row.from_segment))
        j = targets.index(None if pd.isna(row.to_segment) else int(row.to_segment))
        matrix[i, j] += row.users
    fig = Figure(figsize=(3.8 + 0.75 * len(targets), 1.8 + 0.36 * len(sources)))
    ax = fig.add_subplot()
    ax.imshow(np.log1p(matrix), cmap="Blues", aspect="auto", interpolation="nearest")
    high = np.log1p(matrix.max()) if matrix.size else 1.0
    for i in range(len(sources)):
        for j in range(len(targets)):
            if matrix[i, j]:
                dark = np.log1p(matrix[i, j]) > high * 0.6
                ax.text(j, i, f"{int(matrix[i, j]):,}", ha="center", va="center", fontsize=7,
                        color="white" if dark else "#1a1a1a")
    ax.set_yticks(range(len(sources)), [_flow_label(s, from_names, "not in previous run") for s in sources])
    ax.set_xticks(range(len(targets)), [_flow_label(t, to_names, "not in this run") for t in targets],
                  rotation=35, ha="right")
    ax.set_ylabel(f"segment in {plain(previous_run or 'the previous run')}")
    ax.set_xlabel(f"segment in {plain(run_id)}")
    ax.set_title(f"{plain(model)}: users moving between segments")
    return fig


def draw_data_quality(clean_rows: int, reasons: pd.DataFrame) -> Figure:
    """Input rows split into clean and quarantined, and the quarantined ones per reason."""
    quarantined = int(reasons["rows"].sum()) if len(reasons) else 0
    fig = Figure(figsize=(10, 1.6 + 0.28 * max(len(reasons), 2)), layout="constrained")
    left, right = fig.subplots(1, 2)
    total = clean_rows + quarantined
    left.barh([0], [clean_rows], color=BAR, label=f"clean {clean_rows:,}")
    left.barh([0], [quarantined], left=[clean_rows], color=ACCENT, label=f"quarantined {quarantined:,}")
    left.set_yticks([])
    left.set_xlim(0, max(total, 1))
    left.set_xlabel("input rows")
    left.set_title(f"input rows {total:,} = clean + quarantined")
    left.legend(loc="upper center", bbox_to_anchor=(0.5, -0.45), ncol=2, frameon=False)
    if len(reasons):
        y = np.arange(len(reasons))
        right.barh(y, reasons["rows"], color=ACCENT)
        right.set_yticks(y, [plain(r) for r in reasons["reason"]])
        right.invert_yaxis()
        top = float(reasons["rows"].max())
        for yi, count in zip(y, reasons["rows"], strict=True):
            right.text(count + top * 0.01, yi, f"{int(count):,}", va="center", fontsize=7.5)
        right.set_xlim(0, top * 1.2)
        right.set_xlabel("quarantined records")
    else:
        right.set_xticks([])
        right.set_yticks([])
        right.text(0.5, 0.5, "no record was quarantined", ha="center", va="center", transform=right.transAxes)
    right.set_title("quarantine reasons")
    return fig
