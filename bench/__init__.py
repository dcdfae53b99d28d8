"""Benchmarks behind `make bench`: shard reader, trainer overhead, memory. See bench/run.py."""
