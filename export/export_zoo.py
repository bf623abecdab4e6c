"""Export every zoo entry (or the given ``arch.tag`` keys) to SavedModel + ONNX.

    python export/export_zoo.py --out exports/            # exports/<arch>.<tag>/...
    python export/export_zoo.py --out exports/ --optimize newton_cgnet56.cifar10

A thin loop over ``keras_newton.export.export_model``; see ``keras-newton export -h``.
"""

import argparse
import sys
from pathlib import Path


def main(argv=None):
    from keras_newton import zoo
    from keras_newton.export import export_model

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("keys", nargs="*", help="arch.tag entries (default: all of the registry)")
    p.add_argument("--out", required=True, help="parent folder; one sub-folder per entry")
    p.add_argument("--optimize", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--opset", type=int, default=17)
    args = p.parse_args(argv)
    keys = args.keys or zoo.available()
    if not keys:
        print("The zoo registry is empty: nothing to export.")
        return 0
    for key in keys:
        arch, tag = key.split(".", 1) if "." in key else (key, "")
        cards = export_model(arch, tag, Path(args.out) / key, format="both",
                             optimize=args.optimize, overwrite=args.overwrite, opset=args.opset)
        worst = max(c["max_abs_logit_diff"] for card in cards.values()
                    for c in card["parity"].values())
        print(f"{key}: {Path(args.out) / key} (max |logit diff| {worst:.1e})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
