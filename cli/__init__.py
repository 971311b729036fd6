"""The ``nbdmirror`` command line (click). Holds no storage logic."""
