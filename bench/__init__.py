"""Benchmarks for seekgate: scripts that measure and print, never tests."""
