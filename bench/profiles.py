"""`python -m bench.profiles DIR [--top N]`: where the sampled time of each profile went.

Reads the collapsed stacks `python -m bench --profile` writes (py-spy, one file per Forgeline
process; idle samples are not recorded) and prints, per file, the frames that are on the stack
in the largest share of samples (inclusive), and the leaf frames (self time). Frames of our
packages come first because they say which of our calls is expensive.
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

OURS = ("domain/", "broker/", "handlers/", "projections/", "gateway/", "forgeline/")


def load(path: Path) -> tuple[int, collections.Counter[str], collections.Counter[str]]:
    inclusive: collections.Counter[str] = collections.Counter()
    leaves: collections.Counter[str] = collections.Counter()
    total = 0
    for line in path.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = stack.split(";")[1:]  # the first is the thread
        total += count
        for frame in set(frames):
            inclusive[frame] += count
        if frames:
            leaves[frames[-1]] += count
    return total, inclusive, leaves


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.profiles")
    parser.add_argument("directory", type=Path)
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    for path in sorted(args.directory.glob("*.txt")):
        total, inclusive, leaves = load(path)
        if not total:
            continue
        print(f"== {path.stem}: {total} samples (200/s, non-idle)")
        ours = [(f, n) for f, n in inclusive.most_common() if any(o in f for o in OURS)]
        print("   our frames, inclusive:")
        for frame, count in ours[: args.top]:
            print(f"   {100 * count / total:5.1f}%  {frame}")
        print("   leaves (self):")
        for frame, count in leaves.most_common(args.top):
            print(f"   {100 * count / total:5.1f}%  {frame}")
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
