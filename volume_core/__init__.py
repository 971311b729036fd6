"""nbdmirror's storage core: volumes, region tracking, the engine behind an export."""

__version__ = "0.1.0"
