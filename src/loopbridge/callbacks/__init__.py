"""The built-in callbacks; each module imports its optional dependencies itself."""

from loopbridge.callbacks.http_dashboard import DashboardSummary, HttpDashboard

__all__ = [
    "DashboardSummary",
    "HttpDashboard",
]
