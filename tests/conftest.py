"""Test-wide settings: CI runs property tests with a fixed seed so a red run can be replayed."""

import os

from hypothesis import settings

settings.register_profile("ci", derandomize=True, deadline=None, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")
