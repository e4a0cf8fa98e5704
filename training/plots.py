"""Learning curves and the learning-rate schedule of a run, as one PNG saved beside the model."""

from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display needed
import matplotlib.pyplot as plt  # noqa: E402


def plot_training_curves(log_history: list[dict], path: str | Path, title: str = "") -> Path:
    """Plots training loss, evaluation loss/metrics and the learning rate against the step from `Trainer` logs."""
    train = [(e["step"], e["loss"]) for e in log_history if "loss" in e and "step" in e]
    evals = [(e["step"], e["eval_loss"]) for e in log_history if "eval_loss" in e]
    rates = [(e["step"], e["learning_rate"]) for e in log_history if "learning_rate" in e]
    figure, (loss_axis, lr_axis) = plt.subplots(1, 2, figsize=(10, 3.6))
    if train:
        loss_axis.plot(*zip(*train), label="training loss")
    if evals:
        loss_axis.plot(*zip(*evals), marker="o", label="evaluation loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("loss")
    loss_axis.legend(loc="upper right")
    if rates:
        lr_axis.plot(*zip(*rates), color="tab:green")
    lr_axis.set_xlabel("step")
    lr_axis.set_ylabel("learning rate (top layer group)")
    figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    figure.savefig(path, dpi=90)
    plt.close(figure)
    return path
