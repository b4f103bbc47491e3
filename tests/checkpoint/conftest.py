"""The data tests' prepared corpus (small, prepared once per session) for the elastic data tests."""
from tests.data.conftest import prepared, small_corpus  # noqa: F401 - pytest fixtures
