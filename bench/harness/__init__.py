"""The benchmark harness behind bench/<family>.py files and bench/run.py."""
from .spec import Case, Family, Peer  # noqa: F401
