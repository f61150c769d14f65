"""memrl: memory for learning agents (one recurrent-memory API and the pipelines built on it)."""

__version__ = "0.1.0"
