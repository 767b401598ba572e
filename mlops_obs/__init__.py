"""mlops-obs: observability and ops for ML training clusters."""

__version__ = "0.1.0"
