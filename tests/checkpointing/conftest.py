"""Fixtures shared with the data and end-to-end tests: the small prepared corpus (elastic data and
export tests) and the prepared demo corpus (trainer tests)."""
from tests.data.conftest import prepared, small_corpus  # noqa: F401 - pytest fixtures
from tests.e2e.conftest import demo_data_dir  # noqa: F401 - pytest fixture
