"""Draw one panel to PNG bytes with matplotlib's Agg canvas. matplotlib is imported here, on the
first drawing, never when dschat starts; the figure is a plain matplotlib.figure.Figure (no pyplot),
so a Python caller's own pyplot backend and state are left alone."""

from __future__ import annotations

import io

from dschat_cli.report.panels import Drawn

SIZE = (6.4, 3.6)  # inches; at DPI 100: 640 x 360 pixels
DPI = 100
MARKERS_UP_TO = 40  # points per curve: fewer are marked (eval curves have a handful)


def render_png(drawn: Drawn, xlabel: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    p = drawn.panel
    fig = Figure(figsize=SIZE, dpi=DPI)
    FigureCanvasAgg(fig)
    # fixed margins: matplotlib's layout engines cost ~3x the drawing (the report is written
    # at every checkpoint, so its cost is kept to ~0.1 s a panel)
    fig.subplots_adjust(left=0.12, right=0.97, top=0.89, bottom=0.15)
    ax = fig.add_subplot()
    last = 0
    for label, xs, ys in drawn.curves:
        marker = "o" if len(xs) <= MARKERS_UP_TO else None
        ax.plot(xs, ys, label=label, marker=marker, markersize=3.5, linewidth=1.4)
        last = max(last, max(xs))
    ax.set_title(p.title, fontsize=11, y=1.01)  # a fixed place: auto-placing costs ~25%
    ax.set_xlabel(xlabel)
    log = p.log and all(y > 0 for _, _, ys in drawn.curves for y in ys)
    ax.set_ylabel(p.ylabel if log else p.ylabel.replace(" (log scale)", ""), fontsize=9)
    ax.xaxis.set_major_locator(MaxNLocator(nbins=8, integer=True))
    ax.yaxis.set_major_locator(MaxNLocator(nbins=6))
    ax.set_xlim(0, max(last, 1) * 1.02)  # from the start of training, whatever was logged
    if log:
        ax.set_yscale("log")
    if p.ylim is not None:
        ax.set_ylim(*p.ylim)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="best")
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()
