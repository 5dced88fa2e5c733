"""Training: ``train(model, processor, config)`` on a dataset mixture, in one process or under torchrun."""

from .config import DatasetConfig, TrainConfig, load_train_config
from .distributed import autocast_context
from .loop import TrainResult, train
from .optim import fused_adamw_supported

__all__ = ["DatasetConfig", "TrainConfig", "TrainResult", "autocast_context", "fused_adamw_supported", "load_train_config", "train"]
