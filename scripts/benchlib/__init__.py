"""Shared pieces of scripts/bench: processes, CPU accounting, targets, measurements, reports.

Topic modules (scripts/bench_<topic>.py) combine them; scripts/bench.py runs the topics.
"""
