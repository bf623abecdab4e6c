"""Export every zoo entry (or the given ``arch.tag`` keys) to SavedModel + ONNX.

    python export/export_zoo.py --out exports/            # exports/<arch>.<tag>/...
    python export/export_zoo.py --out exports/ --optimize newton_cgnet56.cifar10
    python export/export_zoo.py --zoo [--parity-data ../shared/datasets/cifar10-jpeg/train.tar.xz]
    python export/export_zoo.py --zoo --parity-data ../shared/datasets/cifar10-jpeg/train.tar.xz \
        --calibration-data ../shared/datasets/cifar10-jpeg/train.tar.xz    # + the int8 files

``--zoo`` writes the ONNX files that travel with the package (``zoo/<arch>.<tag>.onnx``
and its sidecar ``.onnx.json``, optimised, opset 17), which ``keras-newton serve`` /
``predict`` and ``OnnxClassifier.from_zoo`` use without TensorFlow; with
``--calibration-data`` also the int8 export ``zoo/<arch>.<tag>.int8.onnx`` (key
``<arch>.<tag>.int8``; ``keras-newton export --quantize int8``: calibrated on the training
part of the entry's hold-out split, accuracy against fp32 on its validation images in the
sidecar). Rerun it whenever an entry's weights change: the sidecar names the weights'
sha256, and a test (and every load) refuses a file exported from other weights.

A thin loop over ``keras_newton.export.export_model``; see ``keras-newton export -h``.
"""

import argparse
import json
import shutil
import sys
import tempfile
from pathlib import Path

ZOO = Path(__file__).resolve().parents[1] / "zoo"


def export_to_zoo(key, parity_data=None, parity_images=1000, opset=17, zoo_dir=ZOO,
                  calibration_data=None, calibration_size=512):
    """Writes ``zoo_dir/<key>.onnx`` and its sidecar (with the file's sha256); returns the
    path and the sidecar. With ``calibration_data`` also ``zoo_dir/<key>.int8.onnx``."""
    from keras_newton.data.image_folder import archive_sample, file_sha256
    from keras_newton.export import ONNX_FILE, export_model
    from keras_newton.export.core import INT8_FILE

    arch, tag = key.split(".", 1)
    images = source = None
    if parity_data:
        images, _, _ = archive_sample(parity_data, limit=parity_images)
        source = f"{len(images)} images of {Path(parity_data).name}"
    with tempfile.TemporaryDirectory(prefix="export_zoo.") as tmp:
        out = Path(tmp) / key
        quantize = {} if calibration_data is None else dict(
            quantize="int8", calibration_data=calibration_data,
            calibration_size=calibration_size)
        cards = export_model(arch, tag, out, format="onnx", optimize=True, opset=opset,
                             parity_images=images, parity_source=source, **quantize)
        for kind, name, suffix in (("onnx", ONNX_FILE, ""), ("onnx_int8", INT8_FILE, ".int8")):
            if kind not in cards:
                continue
            target = Path(zoo_dir) / f"{key}{suffix}.onnx"
            shutil.copyfile(out / name, target)
            card = {**cards[kind], "path": target.name, "onnx_sha256": file_sha256(target)}
            Path(f"{target}.json").write_text(json.dumps(card, indent=1) + "\n")
            cards[kind] = card
    return Path(zoo_dir) / f"{key}.onnx", cards["onnx"], cards.get("onnx_int8")


def main(argv=None):
    from keras_newton import zoo

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("keys", nargs="*", help="arch.tag entries (default: all of the registry)")
    p.add_argument("--out", help="parent folder; one sub-folder per entry")
    p.add_argument("--zoo", action="store_true",
                   help="write zoo/<key>.onnx + sidecar (optimised ONNX) instead of --out")
    p.add_argument("--parity-data", metavar="PATH",
                   help="with --zoo: folder or tar archive of split/<class>/<image> files for "
                        "the parity check (default: 64 random images)")
    p.add_argument("--calibration-data", metavar="PATH",
                   help="with --zoo: also write zoo/<key>.int8.onnx, calibrated on the training "
                        "part of this folder or tar archive (split/<class>/<image> files)")
    p.add_argument("--calibration-size", type=int, default=512)
    p.add_argument("--optimize", action="store_true")
    p.add_argument("--overwrite", action="store_true")
    p.add_argument("--opset", type=int, default=17)
    args = p.parse_args(argv)
    if bool(args.out) == args.zoo:
        p.error("give --out FOLDER or --zoo")
    keys = args.keys or zoo.available()
    if not keys:
        print("The zoo registry is empty: nothing to export.")
        return 0
    if args.zoo:
        for key in keys:
            target, card, int8 = export_to_zoo(key, args.parity_data, opset=args.opset,
                                               calibration_data=args.calibration_data,
                                               calibration_size=args.calibration_size)
            check = card["parity"]["onnxruntime"]
            print(f"{key}: {target} ({target.stat().st_size / 1e6:.2f} MB, max |logit diff| "
                  f"{check['max_abs_logit_diff']:.1e} on {check['images']})")
            if int8:
                acc = int8["accuracy"]
                path = target.with_name(int8["path"])
                print(f"{key}.int8: {path} ({path.stat().st_size / 1e6:.2f} MB, top-1 "
                      f"{100 * acc['int8_top1']:.2f}% vs fp32 {100 * acc['fp32_top1']:.2f}%, "
                      f"agreement {acc['top1_agreement']:.4f} on {acc['n']} validation images)")
        return 0
    from keras_newton.export import export_model

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
