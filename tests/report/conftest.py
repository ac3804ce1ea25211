# the prepared tiny corpus of the training tests (session-scoped)
from tests.train.conftest import tiny_data  # noqa: F401
