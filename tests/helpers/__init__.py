"""Builders of small synthetic model directories for the tests and benchmarks (not shipped in the wheel).

Importable as ``helpers`` once ``tests/`` is on ``sys.path`` (pytest puts it there;
benchmarks insert it themselves).
"""
