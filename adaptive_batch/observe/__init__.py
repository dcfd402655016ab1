"""Observers: what the sampler and its policy did, recorded without touching the training loop.

:class:`TrajectoryLogger` listens to an :class:`~adaptive_batch.AdaptiveBatchSampler`
(``sampler.add_listener``) and writes each batch's sizes, loss, learning rate, reasons and the
policy's numbers to CSV and TensorBoard.
"""

from .trajectory import TrajectoryLogger

__all__ = ["TrajectoryLogger"]
