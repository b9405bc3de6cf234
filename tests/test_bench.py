"""`make bench-gpu` at tiny size on the CPU: every row runs, lands in the JSON lines and in the table, and the
rest of the markdown file is left as it was. About 2 minutes on 2 cores, so it runs with `make test-claims`."""
import json
import os
import subprocess
import sys

import pytest

from videos import make_video

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(BENCH_VFM="tiny", BENCH_MODEL="tiny", BENCH_S=32, BENCH_L=64, BENCH_B=2, BENCH_TB=2, BENCH_K=4,
            BENCH_STEPS=1, BENCH_FLAGS="--dtype fp32", BENCH_SEQUENCES=4,
            BENCH_TIME=3)  # the limits are set for a GPU at ViT-B; a shared CPU at tiny size needs more


@pytest.mark.slow
def test_bench_gpu_target_fills_the_table(tmp_path):
    md = tmp_path / "BENCHMARKS.md"
    md.write_text("before\n<!-- bench-gpu -->\nold table\n<!-- /bench-gpu -->\nafter\n")
    os.makedirs(tmp_path / "video")
    make_video(str(tmp_path / "video/video.mp4"), height=64, gop=25, seconds=3.0)
    args = ["make", "-s", "bench-gpu", "SETUP=", f"RUN={sys.executable}", f"BENCH_OUT={tmp_path}", f"BENCH_MD={md}",
            f"BENCH_VIDEO={tmp_path}/video", "BENCH_WORKERS=1"]
    run = subprocess.run(args + [f"{k}={v}" for k, v in TINY.items()], cwd=ROOT, capture_output=True, text=True,
                         timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert run.returncode == 0, run.stderr[-2000:]
    rows = [json.loads(line) for line in open(tmp_path / "bench.jsonl")]
    assert len(rows) == 10 and not any(r.get("failed") for r in rows), rows
    assert [r["clips_per_s"] > 0 for r in rows[-4:-1]] == [True] * 3  # the loader as read and prepared, the cache
    assert rows[-1]["sequences_per_s"] > 0  # eval.py
    assert {r["row"] for r in rows} >= {"DeltaWorld sampling 20 x 3 steps 64 px", "DINO-world + BoM 16 32 px",
                                        "DeltaWorld BoM 4 64 px", "DeltaTok 64 px"}
    text = md.read_text()
    assert text.startswith("before\n<!-- bench-gpu -->\n| step |") and text.endswith("<!-- /bench-gpu -->\nafter\n")
    assert "old table" not in text and all(r["row"] in text for r in rows)
    assert "ms per sequence" in text and "clips/s** (DeltaTok step: " in text and "sequences/s**" in text
