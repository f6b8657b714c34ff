"""Write tiny random-initialised Wan/UMT5/RAFT models in the public release's layout.

    python data_tools/make_tiny_models.py --out .cache/mogan_tiny/models

Tests and the demo load them through the same code as real weights (see
mogan_ds/models/tiny.py for the sizes and layout).
"""

import argparse

from mogan_ds.models.tiny import write_tiny_models


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=".cache/mogan_tiny/models", help="output folder")
    ap.add_argument("--seed", type=int, default=0, help="initialisation seed")
    ap.add_argument("--overwrite", action="store_true", help="rewrite even if a complete set exists")
    args = ap.parse_args(argv)
    out = write_tiny_models(args.out, seed=args.seed, overwrite=args.overwrite)
    print(f"tiny models in {out}")


if __name__ == "__main__":
    main()
