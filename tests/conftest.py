import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
# one thread everywhere: subprocess runs and in-process runs then reduce in the same order (bit-equal weights),
# and parallel test processes do not oversubscribe the cores
os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest  # noqa: E402


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: minutes-long runs, only with RUN_SLOW=1 (make test-claims)")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("RUN_SLOW") != "1":
        skip = pytest.mark.skip(reason="slow: set RUN_SLOW=1 (make test-claims)")
        for item in items:
            if "slow" in item.keywords:
                item.add_marker(skip)


@pytest.fixture(autouse=True)
def signal_handlers():
    """A training stage run in this process catches SIGINT/SIGTERM/SIGUSR1 (tokenizer.catch_signals); a run that
    raises leaves them caught: pytest gets its own back after every test."""
    import signal
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


@pytest.fixture(scope="module", autouse=True)
def early(request):
    """A module's EARLY fixtures (subprocess runs: torchrun, the command line) start with its first test when a
    selected test asks for them: their processes use the second core while this one runs the in-process tests."""
    for name in getattr(request.module, "EARLY", ()):
        if any(item.module is request.module and name in item.fixturenames for item in request.session.items):
            request.getfixturevalue(name)
