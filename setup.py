"""Builds the cffi C helper (volume_core/native) at install time."""
from setuptools import setup

setup(cffi_modules=["volume_core/native/build.py:ffibuilder"])
