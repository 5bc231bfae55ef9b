"""omnistream: a local real-time video and audio assistant."""

__version__ = "0.1.0"
