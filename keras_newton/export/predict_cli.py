"""``keras-newton predict``: classify image files with an exported ONNX model."""

HELP = "Classify image files with an exported ONNX model (ONNX Runtime)."


def add_arguments(parser):
    parser.add_argument("--onnx", required=True,
                        help="exported model.onnx (sidecar next to it), or a zoo key such as "
                             "newton_cgnet10.cifar10 for the zoo's ONNX export")
    parser.add_argument("images", nargs="+", help="image files (PNG, JPEG, ...)")
    parser.add_argument("--top", type=int, default=3, help="classes shown per image (default 3)")
    parser.add_argument("--resize", action="store_true",
                        help="resize images to the model's input size instead of refusing")
    parser.add_argument("--threads", type=int, help="ONNX Runtime intra-op threads")
    parser.add_argument("--json", action="store_true", help="print JSON lines")


def run(args):
    import json

    import numpy as np

    from keras_newton.data.image_folder import load_image
    from keras_newton.export.runtime import OnnxClassifier, is_zoo_key

    if args.top < 1:
        raise ValueError(f"`top` must be >= 1. Received: top={args.top}")
    classifier = (OnnxClassifier.from_zoo(args.onnx, threads=args.threads)
                  if is_zoo_key(args.onnx) else OnnxClassifier(args.onnx, threads=args.threads))
    images = np.stack([load_image(p, classifier.image_size, args.resize) for p in args.images])
    for path, row in zip(args.images, classifier.classify(images, top=args.top), strict=True):
        if args.json:
            print(json.dumps({"image": path, "top": [
                {"index": i, "class": name, "probability": p} for i, name, p in row]}))
        else:
            print(f"{path}: " + ", ".join(f"{name} {p:.3f}" for _, name, p in row))
    return 0
