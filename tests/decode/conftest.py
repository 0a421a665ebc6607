"""Session-wide tiny models for the decoding tests (helpers: decode_helpers.py)."""

import pytest
from decode_helpers import tiny


@pytest.fixture(scope="session")
def decoder():
    """GPT-2 shape: learned positions, pre-LN, tied head."""
    return tiny("gpt_tiny")


@pytest.fixture(scope="session")
def encoder_decoder():
    """T5 v1.0 shape with scanned layers (the cache has a leading layers axis)."""
    return tiny("t5_tiny", "model.scan_layers=true")
