"""``keras-newton export``: a zoo model to SavedModel and/or ONNX, with sidecars."""

HELP = ("Export a model with its weights to SavedModel and/or ONNX (logits), with JSON "
        "sidecars and a parity check against Keras.")


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="registered model, e.g. newton_cgnet56")
    parser.add_argument("--weights", required=True,
                        help="pretrained tag (keras_newton.zoo) or path to a .weights.h5 file")
    parser.add_argument("--format", default="both", help="savedmodel, onnx or both (default)")
    parser.add_argument("--out", required=True, help="output folder (must not exist)")
    parser.add_argument("--optimize", action="store_true",
                        help="fold BatchNormalization and merge the CG Block convolutions")
    parser.add_argument("--overwrite", action="store_true",
                        help="replace the exported files in an existing output folder")
    parser.add_argument("--opset", type=int, default=17, help="ONNX opset (default 17)")
    parser.add_argument("--mean", type=float, nargs=3, metavar=("R", "G", "B"),
                        help="preprocessing mean in pixel units (default: the weights' card)")
    parser.add_argument("--std", type=float, nargs=3, metavar=("R", "G", "B"),
                        help="preprocessing std in pixel units (default: the weights' card)")
    parser.add_argument("--parity-data", metavar="PATH",
                        help="folder or tar archive of split/<class>/<image> files to check "
                             "parity on (default: 64 random images)")
    parser.add_argument("--parity-images", type=int, default=1000,
                        help="number of images taken from --parity-data (default 1000)")
    parser.add_argument("--parity-tolerance", type=float, default=1e-4,
                        help="max abs logit difference, relative to max(1, max|logit|)")


def run(args):
    from keras_newton.export.core import check_format, check_out, export_model
    from keras_newton.export.onnx_export import check_opset

    check_format(args.format)  # cheap checks before the slow imports
    check_opset(args.opset)
    check_out(args.out, args.overwrite)
    if (args.mean is None) != (args.std is None):
        raise ValueError("Give --mean and --std together. "
                         f"Received: mean={args.mean}, std={args.std}")
    preprocessing = {"mean": args.mean, "std": args.std} if args.mean else None
    images = source = None
    if args.parity_data:
        from keras_newton.export.images import archive_sample

        images, _, _ = archive_sample(args.parity_data, limit=args.parity_images)
        source = f"{len(images)} images of {args.parity_data}"
    try:
        results = export_model(
            args.model, args.weights, args.out, format=args.format, optimize=args.optimize,
            overwrite=args.overwrite, opset=args.opset, preprocessing=preprocessing,
            parity_images=images, parity_source=source, parity_tolerance=args.parity_tolerance,
        )
    except RuntimeError as e:
        print(f"keras-newton export: {e}")
        return 1
    for fmt, sidecar in results.items():
        print(f"{args.out}/{sidecar['path']} ({fmt}, sidecar {sidecar['path']}.json)")
        for name, check in sidecar["parity"].items():
            print(f"  parity {name}: max |logit diff| {check['max_abs_logit_diff']:.2e}, "
                  f"top-1 agreement {check['top1_agreement']:.4f} on {check['images']}")
    return 0
