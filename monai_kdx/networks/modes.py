"""Train/eval modes set for a block and restored afterwards, module by module."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["restore_mode"]


@contextlib.contextmanager
def restore_mode(network: nn.Module, training: bool = False) -> Iterator[nn.Module]:
    """Put ``network`` in eval mode (``training=False``, the default) or train mode for the block, then restore
    every submodule's own mode, also when the block raises (so a frozen BatchNorm inside a training model stays
    frozen, and a model explained or measured in the middle of training goes on training).

    Example:
        >>> with restore_mode(net), torch.no_grad():
        ...     logits = net(x)
    """
    modes = [(module, module.training) for module in network.modules()]
    network.train(training)
    try:
        yield network
    finally:
        for module, mode in modes:
            module.training = mode
