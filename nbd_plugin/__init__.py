"""The nbdkit Python plugin of nbdmirror (see plugin.py)."""
