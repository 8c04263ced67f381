"""Benchmarks of the task tier against the machine's real PostgreSQL and Redis.

Each benchmark measures the code under test and a baseline in the same run, on a fresh
database of its own, and reports figures against targets without failing on a miss.
"""
