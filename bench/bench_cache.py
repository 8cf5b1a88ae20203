"""Second-run set-up against the first: the prepared case (optimisation structures + down-sampled influence
matrix) computed from the case files versus read back from the diskcache. Prints a table; asserts nothing.

    python bench/bench_cache.py [--beams 0,11,22,33,44,55,66] [--factors 6,6,1]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from _common import scratch_data_dir

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--beams", default="0,11,22,33,44,55,66")
    ap.add_argument("--factors", default="6,6,1")
    args = ap.parse_args()
    with scratch_data_dir("vmat-bench-cache-", ensure_phantom=True) as tmp:
        return _measure(args, tmp)


def _measure(args, tmp: Path) -> int:
    from vmat_core import runner
    from vmat_core.config import apply_overrides, default_config

    cfg = apply_overrides(default_config(), [f"beam_ids={args.beams}", f"voxel_down_sample_factors={args.factors}"])
    t = time.perf_counter()
    first = runner.prepare_case(cfg)
    cold = time.perf_counter() - t
    runner._MEMORY_CACHE.clear()  # a new worker process: only the disk cache is left
    t = time.perf_counter()
    second = runner.prepare_case(cfg)
    disk = time.perf_counter() - t
    t = time.perf_counter()
    runner.prepare_case(cfg)
    memory = time.perf_counter() - t
    size_mb = sum(f.stat().st_size for f in (tmp / "cache" / "prepared").rglob("*") if f.is_file()) / 1e6
    print(f"\nPrepared case, beams {args.beams}, voxel factors {args.factors}: "
          f"{first.inf_db.A.shape[0]} opt voxels x {first.inf_db.A.shape[1]} beamlets")
    print(f"{'set-up':<44} {'time':>9} {'vs first':>9}")
    print("-" * 64)
    print(f"{'first run (load, structures, down-sample)':<44} {cold:8.2f}s {1.0:8.1f}x")
    print(f"{'second run, new process (diskcache)':<44} {disk:8.2f}s {cold / disk:8.1f}x")
    print(f"{'second run, same worker (memory)':<44} {memory:8.3f}s {cold / max(memory, 1e-6):8.0f}x")
    print(f"cache entry on disk: {size_mb:.1f} MB; second run hit the cache: {second.cache_hit}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
