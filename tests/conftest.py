import pytest


@pytest.fixture(scope="session")
def prepared(tmp_path_factory):
    """The two default local domains, prepared once per session with a small vocabulary."""
    from megareuse.data.preprocess import prepare_default

    out = tmp_path_factory.mktemp("prepared") / "data"
    prepare_default(out, vocab_size=512, progress=False)
    return out
