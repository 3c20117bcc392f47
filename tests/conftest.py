import pytest
import torch

from doodl import load_pipeline
from doodl.tiny import save_tiny_pipeline


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory):
    return save_tiny_pipeline(tmp_path_factory.mktemp("tiny-sd"))


@pytest.fixture(scope="session")
def tiny(tiny_folder):
    return load_pipeline(tiny_folder)


@pytest.fixture(scope="session")
def tiny64(tiny_folder):
    """The same model entirely in float64, for finite differences."""
    return load_pipeline(tiny_folder, dtype=torch.float64)


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread for a module of tiny models: more only synchronize, and stall on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
