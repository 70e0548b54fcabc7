import os

import pytest

# Triton kernels run on CPU under the interpreter; it must be chosen before triton is imported
# (DeepSpeed imports triton too), so decide here, before any test module is collected.
if os.environ.get("MEGAREUSE_TEST_GPU") != "1":
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session", autouse=True)
def _reader_cache(tmp_path_factory):
    """Readers cache what they scan under MEGAREUSE_CACHE_DIR: a test session's own, never ~/.cache
    (spawned ranks inherit it)."""
    os.environ["MEGAREUSE_CACHE_DIR"] = str(tmp_path_factory.mktemp("reader-cache"))


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """The two default local domains, prepared once per session with a small vocabulary."""
    from megareuse.data.preprocess import prepare_default

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_default(out, vocab_size=512, progress=False)
    return out

