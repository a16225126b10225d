"""The built-in callbacks; each module imports its optional dependencies itself."""

from loopbridge.callbacks.checkpoint_uploader import CheckpointUploader, UploadSummary
from loopbridge.callbacks.early_stopping import EarlyStopping
from loopbridge.callbacks.http_dashboard import DashboardSummary, HttpDashboard
from loopbridge.callbacks.jsonl import JsonlLogger
from loopbridge.callbacks.mlflow import MLflowLogger
from loopbridge.callbacks.progress import ConsoleProgress
from loopbridge.callbacks.tensorboard import TensorBoardLogger
from loopbridge.callbacks.wandb import WandbLogger

__all__ = [
    "CheckpointUploader",
    "ConsoleProgress",
    "DashboardSummary",
    "EarlyStopping",
    "HttpDashboard",
    "JsonlLogger",
    "MLflowLogger",
    "TensorBoardLogger",
    "UploadSummary",
    "WandbLogger",
]
