"""Pre-emption and faults: a signal saves the step in flight and exits 3, --resume then equals an uninterrupted run
bit-exactly; a failing rank stops every rank; a full disk keeps the previous checkpoint."""
import concurrent.futures
import errno
import gc
import json
import multiprocessing
import os
import random
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch

import data
import tokenizer as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
COMMON = ["--vfm", "tiny", "--model", "tiny", "--size", "32", "--val-clips", "2", "--eval-every", "1000",
          "--log-every", "1", "--warmup", "2", "--dtype", "fp32", "--steps", "20", "--global-batch", "4",
          "--ckpt-every", "1000"]


def train(*args):
    T.main(T.get_parser().parse_args([str(a) for a in args]))


def logged(out):
    """The steps of log.jsonl's loss lines."""
    path = os.path.join(out, "log.jsonl")
    records = [json.loads(x) for x in open(path) if x.endswith("\n")] if os.path.exists(path) else []
    return [r["step"] for r in records if "loss" in r]


def at_step(tmp_path, rank, step, action):
    """A script that runs tokenizer.py as the command line does, and does `action` on `rank` as step `step` starts."""
    path = tmp_path / "at_step.py"
    path.write_text(f"import os, signal, sys, time\nsys.path.insert(0, {ROOT!r})\nimport data, tokenizer as T\n"
                    f"lr_at = T.lr_at\n\n\ndef at_step(step, *a):\n"
                    f"    if step == {step} and os.environ.get('RANK', '0') == '{rank}':\n        {action}\n"
                    f"    return lr_at(step, *a)\n\n\nT.lr_at = at_step\ndata.cli(T.main, T.get_parser())\n")
    return str(path)


def two_processes(command_line, tmp_path, script, *args):
    """Two gloo processes in the environment torchrun (or srun, one task per process) gives them, forked by
    command_line: [(exit status, stderr)] by rank."""
    procs = command_line(script, *args, ranks=2, stderr=tmp_path / "stderr")
    for p in procs:
        p.join(300)
    return [(p.exitcode, (tmp_path / f"stderr{r}").read_text()) for r, p in enumerate(procs)]


def assert_same_state(a, b):
    """Weights and optimizer state (AdamW moments, step counts) bit-equal."""
    a, b = (T.load_checkpoint(os.path.join(x, "ckpt.pt")) for x in (a, b))
    assert a["step"] == b["step"]
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for i, s in a["optimizer"]["state"].items():
        for k in s:
            assert torch.equal(s[k], b["optimizer"]["state"][i][k]), (i, k)


def check_stop(err, out, step, name, launch):
    """The checkpoint is of `step`, the step in flight when the signal came; no later step ran; the run said so in
    one line with the command that goes on, as it was launched."""
    saved = T.load_checkpoint(os.path.join(out, "ckpt.pt"))["step"]
    assert saved == step
    assert max(logged(out)) == saved  # no step after the saved one was computed: none is computed twice
    line = [x for x in err.splitlines() if x.startswith("stopped by")]
    assert len(line) == 1 and line[0].startswith(f"stopped by {name}: step {saved} is saved in ")
    assert f" --out {out} " in line[0] and line[0].endswith(" --resume")  # the same command, with --resume
    assert f"; to go on{launch}" in line[0], line[0]
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]


EARLY = ["command_line"]  # conftest.early: its server starts beside the first tests


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    train(*COMMON, "--num-workers", "0", "--batch-size", "4", "--out", out)
    return out


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGUSR1, signal.SIGINT], ids=lambda s: s.name)
def test_a_signal_saves_the_step_in_flight_exits_3_and_resume_is_bit_exact(tmp_path, uninterrupted, monkeypatch,
                                                                           capsys, sig):
    """The signal comes while step k + 1 is computed, to this process (main as the command line runs it) and, for
    SIGTERM, to its DataLoader worker too, as SLURM sends it to every process."""
    k, out, lr_at = random.randint(1, 15), tmp_path / "cut", T.lr_at

    def signal_at_k(step, *a):  # sent by another process, as a scheduler does (a worker exits on its parent's)
        if step == k:
            pids = [c.pid for c in multiprocessing.active_children()] * (sig == signal.SIGTERM) + [os.getpid()]
            subprocess.run(["kill", "-s", sig.name[3:], *map(str, pids)], check=True)
        return lr_at(step, *a)
    monkeypatch.setattr(T, "lr_at", signal_at_k)
    args = [*COMMON, "--num-workers", "1" if sig == signal.SIGTERM else "0", "--batch-size", "4", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", ["tokenizer.py", *args])
    if sig == signal.SIGUSR1:  # as under torchrun, whose workers know its run id
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", "none")
    with pytest.raises(SystemExit) as stop:
        train(*args)
    assert stop.value.code == T.PREEMPTED
    del stop  # its traceback holds the stopped run's DataLoader: its worker ends now, not with pytest
    gc.collect()
    check_stop(capsys.readouterr().err, out, k + 1, sig.name, ": torchrun [its options] tokenizer.py " if
               sig == signal.SIGUSR1 else ": python tokenizer.py ")
    monkeypatch.undo()
    train(*args, "--resume")
    assert_same_state(uninterrupted, out)
    assert logged(out) == list(range(1, 21))  # each step logged once


def test_a_signal_to_one_of_two_processes_stops_both_and_resume_is_bit_exact(command_line, tmp_path):
    """SIGTERM to rank 1 only, as step k + 1 starts: the ranks agree at the step boundary, rank 0 saves step k + 1;
    resumed on two ranks, the run ends bit-equal to an uninterrupted one. That one runs here, as 2 micro-batches of
    2 clips: DDP's mean of two ranks' gradients equals the sum of the two halves exactly (the same batches, and
    halving is exact in floating point)."""
    k, cut, full = random.randint(1, 8), tmp_path / "cut", tmp_path / "full"
    two = [*COMMON, "--steps", "10", "--num-workers", "0", "--batch-size", "2", "--out"]
    signalled = two_processes(command_line, tmp_path, at_step(tmp_path, 1, k, "os.kill(os.getpid(), signal.SIGTERM)"),
                              *two, cut)
    assert [code for code, _ in signalled] == [T.PREEMPTED] * 2, signalled
    assert not signalled[1][1].strip()  # rank 0 speaks for both
    check_stop(signalled[0][1], cut, k + 1, "SIGTERM", ", under the same launcher: python ")  # srun's way
    assert [code for code, _ in two_processes(command_line, tmp_path, "tokenizer.py", *two, cut, "--resume")] == [0, 0]
    train(*two, full)
    assert_same_state(full, cut)


def test_a_failing_rank_stops_every_rank_and_is_named(tmp_path):
    """Under torchrun, rank 1 raises as step 3 starts; rank 0 stops within seconds (not NCCL's 10 minutes), with
    one line that names rank 1 and its error, and no traceback of its own."""
    failing = at_step(tmp_path, 1, 3, f"open({str(tmp_path / 't')!r}, 'w').write(repr(time.time())); "
                                      "raise ValueError('boom at step 3')")
    proc = subprocess.run([*TORCHRUN, failing, *COMMON, "--num-workers", "0", "--batch-size", "2", "--out",
                           str(tmp_path / "out")], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and time.time() - float((tmp_path / "t").read_text()) < 60
    named = [x for x in proc.stderr.splitlines() if x.endswith("stopping: rank 1 failed with ValueError: boom at step "
                                                                "3")]
    assert len(named) == 1, proc.stderr  # from rank 0, whose collective with rank 1 failed
    assert proc.stderr.count("Traceback") == 2  # rank 1's own, and torchrun's report; none from rank 0


def test_a_full_disk_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    common = [*COMMON[:-6], "--global-batch", "4", "--batch-size", "4", "--num-workers", "0", "--out", tmp_path]
    train(*common, "--steps", "2")
    before = T.load_checkpoint(tmp_path / "ckpt.pt")

    def full(obj, f):  # the disk fills up half-way through the file
        f.write(b"x" * 1000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    monkeypatch.setattr(T.torch, "save", full)
    with pytest.raises(data.UserError, match=r"No space left on device\): the previous checkpoint is kept; free "
                       "space, then --resume"):
        train(*common, "--steps", "4", "--resume")
    monkeypatch.undo()
    assert not [f for f in os.listdir(tmp_path) if f.endswith(".tmp")]
    after = T.load_checkpoint(tmp_path / "ckpt.pt")
    assert after["step"] == 2 and all(torch.equal(after["model"][k], before["model"][k]) for k in before["model"])


def test_a_second_ctrl_c_while_the_loader_ends_exits_130_at_once(tmp_path, monkeypatch, capsys):
    """Ctrl-C in step 4 stops the run (status 3); a second one that lands while its DataLoader's worker is shut
    down (as the interpreter exits) ends the process at once with status 130, not an "Exception ignored" traceback
    from the loader's __del__ and status 3."""
    lr_at, shutdown = T.lr_at, torch.utils.data.dataloader._MultiProcessingDataLoaderIter._shutdown_workers
    monkeypatch.setattr(T, "lr_at", lambda step, *a: (step == 3 and os.kill(os.getpid(), signal.SIGINT),
                                                      lr_at(step, *a))[1])
    monkeypatch.setattr(torch.utils.data.dataloader._MultiProcessingDataLoaderIter, "_shutdown_workers",
                        lambda it: (os.kill(os.getpid(), signal.SIGINT), shutdown(it)))
    monkeypatch.setattr(sys, "argv", ["tokenizer.py", *COMMON, "--num-workers", "1", "--batch-size", "4", "--out",
                                      str(tmp_path)])
    with pytest.raises(SystemExit) as stop:
        data.cli(T.main, T.get_parser())
    assert stop.value.code == T.PREEMPTED and "stopped by SIGINT: step 4 is saved" in capsys.readouterr().err
    exits, unraisable = [], []
    monkeypatch.setattr(os, "_exit", exits.append)  # (the worker runs already: only this process' exit is caught)
    monkeypatch.setattr(sys, "unraisablehook", unraisable.append)
    del stop  # its traceback holds the loader: the worker is shut down now, and the second Ctrl-C lands meanwhile
    gc.collect()
    assert exits == [130] and not unraisable


def test_a_rank_killed_outright_is_named_in_one_line(tmp_path):
    """SIGKILL (as the OOM killer sends it) to rank 1, or to rank 0, which holds the group's store, between two
    collectives: the survivor stops at once, non-zero, with one line that names the rank lost, no traceback."""
    script = tmp_path / "killed.py"
    script.write_text(f"import os, signal, sys\nsys.path.insert(0, {ROOT!r})\nimport torch, data\n"
                      "torch.distributed.init_process_group('gloo')\nsys.excepthook = data.fail_together  # as "
                      "tokenizer.setup_dist does\nt = torch.ones(1)\ntorch.distributed.all_reduce(t)\n"
                      "if torch.distributed.get_rank() == int(sys.argv[1]):\n    os.kill(os.getpid(), signal.SIGKILL)\n"
                      "torch.distributed.all_reduce(t)\n")
    def interpreters(lost):  # real ones: a forked rank's uncaught error never reaches sys.excepthook
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            env = dict(ENV, WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(s.getsockname()[1]))
        procs = [subprocess.Popen([sys.executable, script, str(lost)], stderr=subprocess.PIPE, text=True,
                                  env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(2)]
        return [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    with concurrent.futures.ThreadPoolExecutor() as pool:  # both at once, a core each
        runs = list(pool.map(interpreters, (1, 0)))
    for lost, run in zip((1, 0), runs):
        code, err = run[1 - lost]
        assert run[lost][0] == -signal.SIGKILL and code not in (0, -signal.SIGKILL), run
        why = "is gone without a word" if lost else "is gone, and the group's store with it"
        assert err == f"killed.py: error: stopping: rank {lost} {why} (killed: out of memory?)\n", run
