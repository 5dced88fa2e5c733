"""Training: ``train(model, processor, config)`` on a dataset mixture, in one process or under torchrun."""

from .config import DatasetConfig, TrainConfig, load_train_config
from .loop import TrainResult, train

__all__ = ["DatasetConfig", "TrainConfig", "TrainResult", "load_train_config", "train"]
