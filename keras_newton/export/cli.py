"""``keras-newton export``: a zoo model to SavedModel and/or ONNX, with sidecars."""

HELP = ("Export a model with its weights to SavedModel and/or ONNX (logits), with JSON "
        "sidecars and a parity check against Keras.")


def add_arguments(parser):
    parser.add_argument("--model", required=True, help="registered model, e.g. newton_cgnet56")
    parser.add_argument("--weights", required=True,
                        help="pretrained tag (keras_newton.zoo) or path to a .weights.h5 file")
    parser.add_argument("--format", default="both",
                        help="savedmodel, onnx, both (default), or triton: a Triton Inference "
                             "Server model repository --out/<name>/ (config.pbtxt, 1/model.onnx)")
    parser.add_argument("--out", required=True,
                        help="output folder (must not exist); with --format triton the model "
                             "repository (other models in it stay)")
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
    quant = parser.add_argument_group(
        "--quantize int8", "Static int8 quantization (onnxruntime.quantization, QDQ) of the "
        "optimised ONNX graph: also writes model.int8.onnx and its sidecar (with --format "
        "triton, the repository serves the int8 file). Calibrated on training images, never "
        "on the validation hold-out its accuracy against fp32 is measured on.")
    quant.add_argument("--quantize", choices=["int8"],
                       help="also write an int8 ONNX file (implies --optimize)")
    quant.add_argument("--calibration-data", metavar="PATH",
                       help="folder or tar archive of split/<class>/<image> files; its "
                            "training split is held out as in training (default: "
                            "tensorflow-datasets --dataset)")
    quant.add_argument("--calibration-size", type=int, default=512,
                       help="calibration images from the training part (default 512)")
    quant.add_argument("--dataset", default="cifar10",
                       help="dataset of --calibration-data (default cifar10)")
    quant.add_argument("--val-size", type=int,
                       help="validation hold-out (default: the zoo entry's, else 5000)")
    quant.add_argument("--split-seed", type=int,
                       help="seed of the hold-out split (default: the zoo entry's, else 0)")
    quant.add_argument("--max-accuracy-drop", type=float, default=0.5,
                       help="top-1 points int8 may lose against fp32 on the validation "
                            "images before the export is refused (default 0.5)")
    quant.add_argument("--quantize-exclude", nargs="+", default=[], metavar="NODE",
                       help="graph nodes kept in fp32")
    triton = parser.add_argument_group("--format triton")
    triton.add_argument("--name", help="model name in the repository (default: --model)")
    triton.add_argument("--max-batch", type=int, default=32,
                        help="max_batch_size (default 32)")
    triton.add_argument("--max-delay-ms", type=float, default=2.0,
                        help="dynamic_batching max_queue_delay (default 2 ms)")


def run(args):
    from keras_newton.export.core import check_format, check_out, export_model
    from keras_newton.export.onnx_export import check_opset

    triton = args.format == "triton"
    check_format("onnx" if triton else args.format)  # cheap checks before the slow imports
    check_opset(args.opset)
    if triton:
        if args.max_batch < 1 or args.max_delay_ms < 0:
            raise ValueError("--max-batch must be >= 1 and --max-delay-ms >= 0. Received: "
                             f"max_batch={args.max_batch}, max_delay_ms={args.max_delay_ms}")
    else:
        check_out(args.out, args.overwrite)
    if (args.mean is None) != (args.std is None):
        raise ValueError("Give --mean and --std together. "
                         f"Received: mean={args.mean}, std={args.std}")
    preprocessing = {"mean": args.mean, "std": args.std} if args.mean else None
    if args.quantize and args.calibration_size < 1:
        raise ValueError("--calibration-size must be >= 1. "
                         f"Received: calibration_size={args.calibration_size}")
    images = source = None
    if args.parity_data:
        from keras_newton.data.image_folder import archive_sample

        images, _, _ = archive_sample(args.parity_data, limit=args.parity_images)
        source = f"{len(images)} images of {args.parity_data}"
    quantize = {} if not args.quantize else dict(
        quantize=args.quantize, calibration_data=args.calibration_data,
        calibration_size=args.calibration_size, dataset=args.dataset, val_size=args.val_size,
        split_seed=args.split_seed, max_accuracy_drop=args.max_accuracy_drop,
        quantize_exclude=args.quantize_exclude)
    if triton:
        return _triton(args, dict(preprocessing=preprocessing, parity_images=images,
                                  parity_source=source, parity_tolerance=args.parity_tolerance,
                                  **quantize))
    try:
        results = export_model(
            args.model, args.weights, args.out, format=args.format, optimize=args.optimize,
            overwrite=args.overwrite, opset=args.opset, preprocessing=preprocessing,
            parity_images=images, parity_source=source, parity_tolerance=args.parity_tolerance,
            **quantize,
        )
    except RuntimeError as e:
        print(f"keras-newton export: {e}")
        return 1
    for fmt, sidecar in results.items():
        print(f"{args.out}/{sidecar['path']} ({fmt}, sidecar {sidecar['path']}.json)")
        _print_checks(sidecar)
    return 0


def _print_checks(sidecar):
    for name, check in sidecar["parity"].items():
        print(f"  parity {name}: max |logit diff| {check['max_abs_logit_diff']:.2e}, "
              f"top-1 agreement {check['top1_agreement']:.4f} on {check['images']}")
    if "accuracy" in sidecar:
        acc, quant = sidecar["accuracy"], sidecar["quantization"]
        print(f"  top-1 fp32 {100 * acc['fp32_top1']:.2f}%, int8 {100 * acc['int8_top1']:.2f}% "
              f"(drop {acc['drop_points']:.2f} points, agreement {acc['top1_agreement']:.4f}) "
              f"on {acc['images']}")
        print(f"  calibrated on {quant['calibration']['images']} training images of "
              f"{quant['calibration']['source']}; identity taps split out of "
              f"{len(quant['identity_taps_split'])} convolutions; fp32 nodes: "
              f"{quant['excluded_nodes'] or 'none'}")


def _triton(args, parity):
    """``--format triton``: the ONNX export, then the model repository around it."""
    import tempfile
    from pathlib import Path

    from keras_newton.export.core import INT8_FILE, ONNX_FILE, export_model
    from keras_newton.models import canonical_name
    from keras_newton.serving.triton import write_model_repository

    name = args.name or canonical_name(args.model)
    if (Path(args.out) / name).exists() and not args.overwrite:
        raise ValueError(f"{Path(args.out) / name} exists; pass --overwrite to replace it. "
                         f"Received: out={args.out!r}, name={name!r}")
    with tempfile.TemporaryDirectory(prefix="keras-newton-triton.") as tmp:
        try:
            results = export_model(args.model, args.weights, Path(tmp) / "onnx", format="onnx",
                                   optimize=args.optimize, opset=args.opset, **parity)
        except RuntimeError as e:
            print(f"keras-newton export: {e}")
            return 1
        served = INT8_FILE if parity.get("quantize") else ONNX_FILE
        config = write_model_repository(Path(tmp) / "onnx" / served, args.out, name=name,
                                        max_batch=args.max_batch,
                                        max_delay=args.max_delay_ms / 1000,
                                        overwrite=args.overwrite)
    print(f"{Path(args.out) / name}/config.pbtxt, {Path(args.out) / name}/1/model.onnx "
          f"({'int8, ' if parity.get('quantize') else ''}Triton model repository; "
          f"max_batch_size {config['max_batch_size']})")
    _print_checks(results["onnx_int8" if parity.get("quantize") else "onnx"])
    return 0
