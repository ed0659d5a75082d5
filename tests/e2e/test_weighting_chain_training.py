"""A chained weighting (a loss weighting, then a gradient treatment) trains the tiny config through the program's
step function and resumes exactly from a checkpoint, its nested state included. The default run covers FAMO +
PCGrad (a state under a chain, updated after the step); `pytest -m weighting_matrix` adds more chains."""

import pytest

from test_weighting_training import check_training_and_resume


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tfds"))


def test_a_stateful_chain_trains_and_resumes_exactly(data_dir, tmp_path):
    check_training_and_resume(data_dir, tmp_path, "famo+pcgrad", with_aux=True)


@pytest.mark.weighting_matrix
@pytest.mark.parametrize("with_aux", [True, False], ids=["auxi_all", "joint"])
@pytest.mark.parametrize("method", ["kendall+pcgrad", "dwa+gradnorm", "rlw+mgda_ub", "equal+nash_mtl"])
def test_each_chain_trains_and_resumes_exactly(data_dir, tmp_path, method, with_aux):
    check_training_and_resume(data_dir, tmp_path, method, with_aux)
