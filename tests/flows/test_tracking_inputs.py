"""flows.tracking: logging a stage's dataset inputs survives MLflow's check-then-insert race."""
import pytest
from mlflow.exceptions import MlflowException

from flows.tracking import Tracking


class RacingClient:
    """Fails like MLflow's SQL store when another process inserted the same dataset in between."""

    def __init__(self, fail_times: int, message: str = "(sqlite3.IntegrityError) UNIQUE constraint failed: "
                                                          "datasets.experiment_id, datasets.name, datasets.digest"):
        self.fail_times, self.message, self.calls = fail_times, message, 0

    def log_inputs(self, run_id, datasets=None, models=None):
        self.calls += 1
        if self.calls <= self.fail_times:
            raise MlflowException(self.message)


def tracking_with(client) -> Tracking:
    t = Tracking.__new__(Tracking)
    t.client = client
    return t


def test_a_unique_constraint_race_is_retried_until_the_dataset_is_linked():
    client = RacingClient(fail_times=2)
    tracking_with(client)._log_inputs("run", ["ds"], [])
    assert client.calls == 3


def test_other_errors_and_a_persistent_race_are_raised():
    with pytest.raises(MlflowException, match="no such run"):
        tracking_with(RacingClient(1, "no such run"))._log_inputs("run", ["ds"], [])
    client = RacingClient(fail_times=99)
    with pytest.raises(MlflowException, match="UNIQUE"):
        tracking_with(client)._log_inputs("run", ["ds"], [], attempts=3)
    assert client.calls == 3
