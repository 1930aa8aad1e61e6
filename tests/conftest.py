import os
import random

import numpy as np
import pytest
import torch
from hypothesis import settings

# CI (CI=true) replays the same hypothesis examples every run, so a landing never depends
# on which random cases were drawn; local runs keep drawing new ones to find bugs.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
