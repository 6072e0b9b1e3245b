"""The lab's training loop: plain mini-batch SGD with periodic held-out evaluation.

Deterministic for a seed on one machine: the seed fixes the weights (``torch.manual_seed``) and
the order of mini-batches (a NumPy generator drawing one permutation per epoch).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from batchnorm.lab.data import Dataset

__all__ = ["History", "accuracy", "batches", "set_threads", "train"]


def set_threads(threads: int) -> None:
    """Limit torch's intra-op threads; the lab's models are small, so 1-2 threads are fastest."""
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    torch.set_num_threads(threads)


@dataclass
class History:
    """What :func:`train` measured: held-out accuracy at ``steps``, loss per step."""

    steps: list[int] = field(default_factory=list)
    test_accuracy: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    diverged_at: int | None = None

    @property
    def final_accuracy(self) -> float:
        return self.test_accuracy[-1] if self.test_accuracy else float("nan")

    def steps_to(self, target: float) -> int | None:
        """The first evaluated step whose held-out accuracy is ``>= target`` (None if never)."""
        return next((s for s, a in zip(self.steps, self.test_accuracy, strict=True) if a >= target), None)

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "test_accuracy": self.test_accuracy,
            "train_loss": self.train_loss,
            "diverged_at": self.diverged_at,
            "final_accuracy": self.final_accuracy,
        }


def batches(n: int, batch_size: int, steps: int, rng: np.random.Generator):
    """Yield ``steps`` index arrays of ``batch_size``: epochs of random permutations, tail dropped."""
    if batch_size > n:
        raise ValueError(f"batch_size must be <= the training set size {n}, got {batch_size}")
    per_epoch = n // batch_size
    done = 0
    while done < steps:
        order = rng.permutation(n)
        for i in range(min(per_epoch, steps - done)):
            yield order[i * batch_size : (i + 1) * batch_size]
        done += min(per_epoch, steps - done)


@torch.no_grad()
def accuracy(
    model: nn.Module, x: np.ndarray | torch.Tensor, y: np.ndarray, *, batch_size: int = 1000
) -> float:
    """Fraction of correct argmax predictions, in the model's current mode (eval or train)."""
    x = torch.as_tensor(x)
    correct = 0
    for i in range(0, len(y), batch_size):
        logits = model(x[i : i + batch_size])
        correct += int((logits.argmax(1).numpy() == y[i : i + batch_size]).sum())
    return correct / len(y)


def train(
    model: nn.Module,
    data: Dataset,
    *,
    steps: int,
    batch_size: int,
    lr: float,
    seed: int = 0,
    eval_every: int = 100,
    eval_size: int | None = None,
    momentum: float = 0.0,
    on_eval: Callable[[int, nn.Module], None] | None = None,
    advance: Callable[[int], None] | None = None,
) -> History:
    """Train ``model`` on ``data`` with SGD for ``steps`` mini-batches; evaluate every ``eval_every``.

    Evaluation runs in eval mode (running statistics) on the first ``eval_size`` held-out
    samples (all when None), at step 0, every ``eval_every`` steps and at the end;
    ``on_eval(step, model)`` is called there too (e.g. to record activations). A non-finite
    loss stops training: ``diverged_at`` is set and later evaluations count as chance.
    ``advance(n)`` reports progress (n steps done since the last call).
    """
    if steps < 1 or eval_every < 1:
        raise ValueError(f"steps and eval_every must be >= 1, got steps={steps}, eval_every={eval_every}")
    rng = np.random.default_rng(seed)
    x_train = torch.from_numpy(data.x_train)
    y_train = torch.from_numpy(data.y_train)
    n_eval = len(data.y_test) if eval_size is None else min(eval_size, len(data.y_test))
    x_eval, y_eval = torch.from_numpy(data.x_test[:n_eval]), data.y_test[:n_eval]
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    history = History()

    def evaluate(step: int) -> None:
        model.eval()
        chance = 1.0 / data.num_classes
        acc = chance if history.diverged_at is not None else accuracy(model, x_eval, y_eval)
        history.steps.append(step)
        history.test_accuracy.append(acc)
        if on_eval is not None and history.diverged_at is None:
            on_eval(step, model)
        model.train()

    # Divergence is an outcome the lab measures (diverged_at), not an error: NumPy's overflow
    # warnings from the project's CPU kernels (torch.nn is silent there) are switched off.
    with np.errstate(all="ignore"):
        evaluate(0)
        for step, idx in enumerate(batches(len(y_train), batch_size, steps, rng), start=1):
            index = torch.from_numpy(idx)
            loss = nn.functional.cross_entropy(model(x_train[index]), y_train[index])
            value = loss.item()
            history.train_loss.append(value)
            if not math.isfinite(value):
                history.diverged_at = step
                if advance is not None:
                    advance(steps - step + 1)
                break
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if advance is not None:
                advance(1)
            if step % eval_every == 0 or step == steps:
                evaluate(step)
        if history.diverged_at is not None:
            evaluate(steps)
    return history
