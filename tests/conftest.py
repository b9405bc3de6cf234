import os
import sys

os.environ["HF_HUB_OFFLINE"] = "1"  # tests never touch the network
# one thread everywhere: subprocess runs and in-process runs then reduce in the same order (bit-equal weights),
# and parallel test processes do not oversubscribe the cores
os.environ["OMP_NUM_THREADS"] = "1"
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
