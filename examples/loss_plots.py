"""Loss curves as PNG files (matplotlib, Agg backend): the figures of the
benchmark and of the layer-kind examples."""


def save_loss_figure(path, curves, xlabel, ylabel, title, reference=None, log_scale=False, y_top=None):
    """One figure of loss curves, saved to ``path`` (returned).

    Args:
      curves: list of (label, x, y, style): x, y array-likes, style a dict of
        extra ``Axes.plot`` keyword arguments.
      reference: None or (loss, label): a dashed horizontal line.
      log_scale: logarithmic loss axis.
      y_top: None or an upper limit on the loss axis (kept lower if the data are).
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, x, y, style in curves:
        ax.plot(x, y, label=label, **style)
    if reference is not None:
        ax.axhline(reference[0], color="gray", ls="--", lw=0.8, label=reference[1])
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    if log_scale:
        ax.set_yscale("log")
    if y_top is not None:
        ax.set_ylim(top=min(y_top, ax.get_ylim()[1]))
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
