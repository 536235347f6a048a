"""zoomless: teach vision-language models to see small details in one glance at a full image."""

__version__ = "0.1.0"
