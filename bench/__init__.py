"""Benchmarks: scripts that print a table and write a JSON result under bench/results/."""
