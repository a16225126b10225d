"""The built-in callbacks; each module imports its optional dependencies itself."""

from loopbridge.callbacks.checkpoint_uploader import CheckpointUploader, UploadSummary
from loopbridge.callbacks.http_dashboard import DashboardSummary, HttpDashboard

__all__ = [
    "CheckpointUploader",
    "DashboardSummary",
    "HttpDashboard",
    "UploadSummary",
]
