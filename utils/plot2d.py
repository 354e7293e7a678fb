"""Figure helpers of the 2D example: the paper's plot window, point clouds, trajectories and the colors of
the two modes. They draw on matplotlib axes that the caller made; this module never imports matplotlib, so
only runs that draw need it."""
import numpy as np
import torch

MODE_COLORS = ("tab:red", "tab:green")
NOISE_COLOR = "tab:blue"
X_LIMITS = (-18.0, 18.0)           # the paper's plot window
Y_LIMITS = (-9.0, 18.0)


def setup_axes(ax, title=None):
    """The paper's window (x in [-18, 18], y in [-9, 18]), equal aspect, light grid."""
    ax.set_xlim(*X_LIMITS)
    ax.set_ylim(*Y_LIMITS)
    ax.set_aspect("equal")
    ax.grid(True, color="0.9", linewidth=0.6)
    ax.set_axisbelow(True)
    ax.tick_params(labelsize=7)
    ax.set_xlabel("$x_1$", fontsize=8)
    ax.set_ylabel("$x_2$", fontsize=8)
    if title:
        ax.set_title(title, fontsize=9)


def plot_points(ax, points, color, size=3, alpha=0.25, label=None):
    points = points.detach().cpu().numpy()
    ax.scatter(points[:, 0], points[:, 1], s=size, alpha=alpha, color=color, linewidths=0, label=label)


def plot_trajectories(ax,
                      traj,         # list of [B, 2] states, traj[0] at t = 1
                      colors,       # one color for all, or a list per sample
                      count=30,     # how many paths to draw
                      linewidth=0.8):
    """Draw ``count`` paths (spread over the batch), a hollow marker at the start and a dot at the end."""
    path = torch.stack([state.detach().cpu() for state in traj]).numpy()   # [steps + 1, B, 2]
    picks = np.linspace(0, path.shape[1] - 1, min(count, path.shape[1])).round().astype(int)
    for j in picks:
        color = colors[j] if isinstance(colors, (list, tuple)) else colors
        ax.plot(path[:, j, 0], path[:, j, 1], color=color, linewidth=linewidth, alpha=0.8)
        ax.plot(path[0, j, 0], path[0, j, 1], marker="o", markersize=2.5, markerfacecolor="none",
                markeredgecolor=color, markeredgewidth=0.6)
    return picks


def mode_colors(count_per_mode):
    """Per-sample colors for a batch made of ``count_per_mode`` points of mode 0, then of mode 1."""
    return [MODE_COLORS[0]] * count_per_mode + [MODE_COLORS[1]] * count_per_mode
