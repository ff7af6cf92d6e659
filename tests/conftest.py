import os
from pathlib import Path

import pytest

FIXTURES = Path(os.environ.get("KTX_FIXTURES", Path(__file__).resolve().parents[1].parent / "shared" / "fixtures"))


@pytest.fixture(scope="session")
def tiny_dsv3() -> Path:
    d = FIXTURES / "tiny-dsv3"
    if not (d / "tiny-dsv3-BF16.gguf").exists():
        pytest.skip(f"llama.cpp fixtures not found at {d}")
    return d
