"""Test-wide settings."""
from hypothesis import settings

# A busy 2-core CI machine can make one example slow; correctness, not speed, is under test here.
settings.register_profile("curriculum", deadline=None, derandomize=True)
settings.load_profile("curriculum")
