"""The paper's claims on the synthetic benchmark, from a smaller run of `make demo`: the same tokenizer (its
steps are what the claims need: at 1,500 steps the reconstruction is still below copy-last), fewer steps for the
predictors and heads, half the validation sequences. About 8 minutes on 2 CPU cores, so it is marked slow: it
runs with `make test-claims` (or RUN_SLOW=1), not in `make test`."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SMALLER = dict(WORLD_STEPS=300, DINO_STEPS=300, HEAD_STEPS=300, EVAL_SEQUENCES=64)


@pytest.mark.slow
def test_smaller_demo_run_shows_the_papers_claims(tmp_path):
    args = ["make", "-s", "demo", "SETUP=", f"RUN={sys.executable}", f"OUT={tmp_path}"]
    run = subprocess.run(args + [f"{k}={v}" for k, v in SMALLER.items()], cwd=ROOT, capture_output=True,
                         text=True, timeout=1800)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    rows = json.load(open(tmp_path / "eval" / "results.json"))["results"]["synthetic"]
    get = {(r["method"], r["horizon"], r["pick"]): r for r in rows}
    present = get["Present", "-", "-"]
    # DeltaTok's reconstruction, one step ahead: between copy-last and present in both metrics. (Copy-last is only
    # ~2 mIoU and ~0.3 m below present one step ahead, so how much of that gap is recovered is noise on these few
    # sequences: 41% of the mIoU gap and 85% of the RMSE gap here, 76% and 38% in the full demo.)
    copy, recon = get["Copy last", "short", "-"], get["DeltaTok reconstruction (sequential)", "short", "best"]
    assert copy["miou"] < recon["miou"] <= present["miou"] and present["rmse"] <= recon["rmse"] < copy["rmse"], \
        (recon, present, copy)
    # three steps ahead, sequential (each step encoded against the last reconstruction): better than copy-last
    copy, recon = get["Copy last", "mid", "-"], get["DeltaTok reconstruction (sequential)", "mid", "best"]
    assert recon["miou"] > copy["miou"] and recon["rmse"] < copy["rmse"], (recon, copy)
    # DeltaWorld's best of 20 beats copy-last and the deterministic DINO-world at the mid horizon
    best = get["DeltaWorld", "mid", "best"]
    for rival in (get["Copy last", "mid", "-"], get["DINO-world", "mid", "best"]):
        assert best["miou"] > rival["miou"] and best["rmse"] < rival["rmse"], (best, rival)
