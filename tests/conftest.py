import multiprocessing
import multiprocessing.forkserver
import os
import runpy
import socket
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
# one thread everywhere: subprocess runs and in-process runs then reduce in the same order (bit-equal weights),
# and parallel test processes do not oversubscribe the cores
os.environ["OMP_NUM_THREADS"] = "1"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

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


def _as_command_line(script, args, env, stderr):
    """`python script args` in this process, forked by command_line's server: env set, stdout to /dev/null, stderr
    to the file `stderr`."""
    os.environ.update(env)
    for fd, path in ((1, os.devnull), (2, stderr)):
        os.dup2(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), fd)
    sys.argv = [script, *args]
    runpy.run_path(os.path.join(ROOT, script), run_name="__main__")


@pytest.fixture(scope="session")
def command_line():
    """command_line(script, *args, stderr=path): `python script args` started as a process forked by a server that
    has imported tokenizer (torch, transformers) once, so without the seconds of an interpreter's start: a
    multiprocessing.Process (.join(), .exitcode, .kill()). ranks=2: two such processes in torchrun's environment
    (rank r's stderr to path + r), a list. For the tests of signals, exit statuses, DDP and what a run leaves behind;
    the tests of the interpreter itself (its one line on stderr, torchrun and its failing rank) start their own."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tokenizer"])
    multiprocessing.forkserver.ensure_running()  # now: its start-up runs beside the tests until the first run

    def start(script, *args, ranks=0, stderr=os.devnull, env=None):
        if ranks:
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            return [start(script, *args, stderr=f"{stderr}{r}", env=dict(
                RANK=str(r), LOCAL_RANK=str(r), WORLD_SIZE=str(ranks), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port)))
                for r in range(ranks)]
        process = context.Process(target=_as_command_line, args=(script, list(map(str, args)), env or {}, str(stderr)))
        process.start()
        started.append(process)
        return process
    started = []
    yield start
    for process in started:
        if process.exitcode is None:  # left running by a failed test
            process.kill()
