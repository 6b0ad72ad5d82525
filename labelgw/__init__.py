"""labelgw: a reverse proxy whose routes come from Docker container labels."""

__version__ = "0.1.0"
