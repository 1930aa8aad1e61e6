import os
import random
import signal

import numpy as np
import pytest
import torch
from hypothesis import settings

# CI (CI=true) replays the same hypothesis examples every run, so a landing never depends
# on which random cases were drawn; local runs keep drawing new ones to find bugs.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

# A suite started as a background job of a non-interactive shell (`make test &`, nohup) inherits
# SIGINT ignored, and so would every ame-merge process the tests start (an ignored signal stays
# ignored across exec, and Python then installs no KeyboardInterrupt handler): the Ctrl-C tests
# would see merges run to the end. A handler here resets to the default in those children.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)


@pytest.fixture(autouse=True)
def _seed_everything():
    random.seed(0)
    np.random.seed(0)
    torch.manual_seed(0)
    yield
