"""Images per second of the embedded-dataset generator, one process.

Run as a script:  python benchmarks/synthetic_speed.py [--n 2000] [--image-size 64]
(not with -m: opacus installs a top-level package named `benchmarks` that shadows this folder).
"""

from __future__ import annotations

import argparse
import time

from shared_model.data.synthetic import generate_scenes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=2000, help="scenes per timed run")
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="timed runs; the best is reported")
    args = parser.parse_args()
    generate_scenes(16, seed=0, image_size=args.image_size)  # warm-up
    best = float("inf")
    for repeat in range(args.repeats):
        start = time.perf_counter()
        generate_scenes(args.n, seed=repeat, image_size=args.image_size)
        best = min(best, time.perf_counter() - start)
    print(f"generate_scenes({args.n}, image_size={args.image_size}): {args.n / best:,.0f} images/s "
          f"(best of {args.repeats}, {best:.3f} s)")


if __name__ == "__main__":
    main()
