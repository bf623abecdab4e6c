"""Character-level text data (Section 4.2): the VDCNN alphabet, a tokenizer, loaders.

``CharTokenizer`` turns raw strings into the integer ids the text models read; it is
TensorFlow (tensorflow-text) code, used in ``tf.data`` and in a SavedModel serving
signature, never inside the models, so exported ONNX graphs take integer ids.
Datasets come from tensorflow-datasets online or, offline, from a CSV file in the
format of Zhang et al. (2015) (``label,title,description``; a header row is optional).
TensorFlow is imported lazily: ``keras_newton.models.text`` imports the constants only.
"""

import csv
import dataclasses
import re
import sys
from pathlib import Path

import keras
import numpy as np

from keras_newton.data.splits import epoch_seed

# The 70 symbols of the character-level CNNs (Zhang et al. 2015; VDCNN, Conneau et al.
# 2017): 26 letters, 10 digits, 32 punctuation marks, space and newline.
ALPHABET = ("abcdefghijklmnopqrstuvwxyz0123456789" "-,;.!?:'\"/\\|_@#$%^&*~`+=<>()[]{}" " \n")
PAD_ID = 0  # padding after the end of a text
UNKNOWN_ID = len(ALPHABET) + 1  # 71: any character outside the alphabet
VOCAB_SIZE = len(ALPHABET) + 2  # 72 ids: padding, 70 symbols, unknown
SEQUENCE_LENGTH = 1024  # s in the paper
NORMALIZATION_FORMS = (None, "NFC", "NFKC", "NFD", "NFKD")

# name -> tensorflow-datasets source (None: CSV only) and the classes of Table 6.
TEXT_DATASETS = {
    "ag_news": {"tfds": "ag_news_subset", "text_keys": ("title", "description"),
                "label_key": "label", "classes": 4,
                "class_names": ("World", "Sports", "Business", "Sci/Tech")},
    "yelp_polarity": {"tfds": "yelp_polarity_reviews", "text_keys": ("text",),
                      "label_key": "label", "classes": 2,
                      "class_names": ("negative", "positive")},
    # The tfds Amazon reviews are not the Zhang et al. sets of Table 6: one product
    # category, 5 classes from the star rating (tfds config chosen by the name).
    "amazon_us_reviews": {"tfds": "amazon_us_reviews/Books_v1_02",
                          "text_keys": ("data/review_headline", "data/review_body"),
                          "label_key": "data/star_rating", "label_offset": 1, "classes": 5,
                          "class_names": ("1", "2", "3", "4", "5")},
    # Table 6 sets that tensorflow-datasets does not hold: CSV files only.
    "dbpedia": {"tfds": None, "classes": 14, "class_names": None},
    "yelp_full": {"tfds": None, "classes": 5, "class_names": ("1", "2", "3", "4", "5")},
    "amazon_full": {"tfds": None, "classes": 5, "class_names": ("1", "2", "3", "4", "5")},
    "amazon_polarity": {"tfds": None, "classes": 2, "class_names": ("negative", "positive")},
    "yahoo_answers": {"tfds": None, "classes": 10, "class_names": None},
    "sogou_news": {"tfds": None, "classes": 5, "class_names": None},
    # Any labelled CSV: needs `data`.
    "text_csv": {"tfds": None, "classes": None, "class_names": None},
}
_ALIASES = {"ag_news_subset": "ag_news", "agnews": "ag_news",
            "yelp_polarity_reviews": "yelp_polarity", "yelp_review_polarity": "yelp_polarity",
            "yelp_review_full": "yelp_full", "amazon_review_full": "amazon_full",
            "amazon_review_polarity": "amazon_polarity", "dbpedia_14": "dbpedia",
            "csv": "text_csv"}


def canonical_text_dataset(name):
    """``"AG-News"``, ``"ag_news_subset"`` -> ``"ag_news"``; ValueError if unknown."""
    key = re.sub(r"[-\s]", "_", str(name).strip().lower())
    key = _ALIASES.get(key, key)
    if key not in TEXT_DATASETS:
        raise ValueError(f"Unknown text dataset. Valid names: {sorted(TEXT_DATASETS)}. "
                         f"Received: dataset={name!r}")
    return key


def is_text_dataset(name):
    try:
        canonical_text_dataset(name)
    except ValueError:
        return False
    return True


@keras.saving.register_keras_serializable(package="keras_newton")
class CharTokenizer(keras.layers.Layer):
    """Raw UTF-8 strings -> int32 character ids ``(batch, sequence_length)``.

    Steps: invalid UTF-8 bytes become U+FFFD; Unicode normalisation
    (``normalization_form``, NFKC by default: ``"ﬁ"`` -> ``"fi"``, full-width
    ``"Ｎ"`` -> ``"N"``); lower-casing by Unicode case folding (``"ß"`` -> ``"ss"``;
    tensorflow-text ``case_fold_utf8``, which also applies NFKC); then every character
    becomes its position in ``ALPHABET`` plus one (``"a"`` -> 1 ... ``"\\n"`` -> 70),
    anything else ``UNKNOWN_ID`` (71); the text is cut after ``sequence_length``
    characters or padded with ``PAD_ID`` (0). Empty strings give all padding.

    A TensorFlow preprocessing layer (like ``keras.layers.TextVectorization``): use it
    in ``tf.data`` with any backend (``ds.map(lambda s, y: (tokenizer(s), y))``) or
    eagerly; keep it out of the model so that exported graphs take integer ids.
    ``keras_newton.export.export_text_savedmodel`` puts it in a SavedModel signature
    that takes strings
    (loading that SavedModel needs ``import tensorflow_text``).

    Args:
        sequence_length: int, output length (1024 in the paper).
        normalization_form: one of ``NORMALIZATION_FORMS`` (None: no normalisation).
        lowercase: bool, case-fold the text first (the alphabet has no capitals).
        **kwargs: standard layer arguments.

    Example:
    >>> CharTokenizer(sequence_length=6)(["Hi!"]).tolist()  # doctest: +SKIP
    [[8, 9, 41, 0, 0, 0]]
    """

    def __init__(self, sequence_length=SEQUENCE_LENGTH, normalization_form="NFKC",
                 lowercase=True, **kwargs):
        kwargs.setdefault("dtype", "int32")
        super().__init__(**kwargs)
        if isinstance(sequence_length, bool) or not isinstance(sequence_length, int) or (
            sequence_length < 1
        ):
            raise ValueError("`sequence_length` must be a positive integer. "
                             f"Received: sequence_length={sequence_length!r}")
        if normalization_form not in NORMALIZATION_FORMS:
            raise ValueError(f"`normalization_form` must be one of {list(NORMALIZATION_FORMS)}."
                             f" Received: normalization_form={normalization_form!r}")
        self.sequence_length = sequence_length
        self.normalization_form = normalization_form
        self.lowercase = bool(lowercase)
        table = np.full(128, UNKNOWN_ID, dtype=np.int32)
        for i, char in enumerate(ALPHABET):
            table[ord(char)] = i + 1
        self._table = table
        # Strings in, tf.Tensor out: as TextVectorization, no conversion, no jit.
        self._convert_input_args = False
        self._allow_non_tensor_positional_args = True
        self.supports_jit = False

    def encode(self, strings):
        """The pure TensorFlow function (strings of any shape ``(...)`` -> ``(..., L)``)."""
        import tensorflow as tf

        strings = tf.convert_to_tensor(strings, dtype=tf.string)
        shape = tf.shape(strings)
        flat = tf.reshape(strings, [-1])
        flat = tf.strings.unicode_transcode(flat, "UTF-8", "UTF-8", errors="replace",
                                            replacement_char=0xFFFD)
        if self.normalization_form is not None or self.lowercase:
            import tensorflow_text as tf_text

            if self.normalization_form is not None:
                flat = tf_text.normalize_utf8(flat, self.normalization_form)
            if self.lowercase:
                flat = tf_text.case_fold_utf8(flat)
        chars = tf.strings.unicode_decode(flat, "UTF-8")[:, : self.sequence_length]
        table = tf.constant(self._table)

        def lookup(codes):
            return tf.where(codes < 128, tf.gather(table, tf.minimum(codes, 127)), UNKNOWN_ID)

        ids = tf.ragged.map_flat_values(lookup, chars)
        ids = ids.to_tensor(default_value=PAD_ID, shape=[None, self.sequence_length])
        out = tf.reshape(ids, tf.concat([shape, [self.sequence_length]], axis=0))
        return tf.ensure_shape(out, strings.shape.concatenate([self.sequence_length]))

    def call(self, inputs):
        import tensorflow as tf

        outputs = self.encode(inputs)
        if keras.backend.backend() != "tensorflow" and tf.executing_eagerly():
            return keras.ops.convert_to_tensor(outputs.numpy())
        return outputs

    def compute_output_shape(self, input_shape):
        return (*tuple(input_shape), self.sequence_length)

    def compute_output_spec(self, inputs):
        return keras.KerasTensor((*inputs.shape, self.sequence_length), dtype="int32")

    def get_config(self):
        config = super().get_config()
        config.update({"sequence_length": self.sequence_length,
                       "normalization_form": self.normalization_form,
                       "lowercase": self.lowercase})
        return config


@dataclasses.dataclass
class TextData:
    """Labelled texts of one split.

    Attributes:
        texts: object array ``(n,)`` of ``str``.
        labels: int32 array ``(n,)``, indices into ``class_names``.
        class_names: list of class names, label order.
    """

    texts: np.ndarray
    labels: np.ndarray
    class_names: list

    def __len__(self):
        return len(self.labels)


def _is_int(value):
    return re.fullmatch(r"\s*-?\d+\s*", value) is not None


def load_text_csv(path, class_names=None, classes=None):
    """Reads a CSV of ``label,text[,text...]`` rows (the format of Zhang et al. 2015).

    The text fields of a row are joined with a space (title and description); a
    first row whose label is not an integer is a header and is skipped. Integer
    labels are mapped to ``0..C-1`` in increasing order (AG News: 1..4). Bytes that
    are not UTF-8 become U+FFFD.

    Args:
        path: the CSV file.
        class_names: optional names in label order (default: the labels as strings).
        classes: optional expected number of classes (checked).

    Returns:
        A ``TextData``.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"`data` must be an existing CSV file. Received: data={str(path)!r}")
    csv.field_size_limit(min(sys.maxsize, 2**31 - 1))
    raw_labels, texts = [], []
    with open(path, newline="", encoding="utf-8", errors="replace") as f:
        for i, row in enumerate(csv.reader(f)):
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            if i == 0 and not _is_int(row[0]):
                continue  # header
            if len(row) < 2 or not _is_int(row[0]):
                raise ValueError(f"Each CSV row must be `label,text[,text...]` with an integer "
                                 f"label. Received: row {i + 1} of {str(path)!r} = {row[:2]!r}")
            raw_labels.append(int(row[0]))
            texts.append(" ".join(field.strip() for field in row[1:]))
    if not texts:
        raise ValueError(f"The CSV file holds no rows. Received: data={str(path)!r}")
    values, labels = np.unique(np.asarray(raw_labels), return_inverse=True)
    if classes is not None and len(values) != classes:
        raise ValueError(f"Expected {classes} classes but the CSV has labels "
                         f"{values.tolist()}. Received: data={str(path)!r}")
    names = list(class_names) if class_names is not None else [str(v) for v in values]
    return TextData(np.asarray(texts, dtype=object), labels.astype(np.int32), names)


def _load_tfds_text(spec, split):
    import tensorflow_datasets as tfds

    ds, info = tfds.load(spec["tfds"], split=split, with_info=True)
    feature = info.features
    for part in spec["label_key"].split("/"):
        feature = feature[part]
    names = getattr(feature, "names", None) or spec["class_names"]

    def get(example, key):
        for part in key.split("/"):
            example = example[part]
        return example

    texts, labels = [], []
    for ex in tfds.as_numpy(ds):
        parts = [get(ex, k) for k in spec["text_keys"]]
        texts.append(" ".join(p.decode("utf-8", "replace") for p in parts))
        labels.append(int(get(ex, spec["label_key"])) - spec.get("label_offset", 0))
    return TextData(np.asarray(texts, dtype=object), np.asarray(labels, np.int32), list(names))


def load_text_dataset(name, data=None, split="train"):
    """Loads one split of a text dataset of ``TEXT_DATASETS``.

    With ``data`` (a CSV file, see ``load_text_csv``) it is offline and ``split`` is
    ignored: the file is the whole source. Without it, tensorflow-datasets is used
    (``ag_news_subset``, ``yelp_polarity_reviews``, ``amazon_us_reviews``), which
    downloads on first use.
    """
    name = canonical_text_dataset(name)
    spec = TEXT_DATASETS[name]
    if data is not None:
        return load_text_csv(data, spec["class_names"], spec["classes"])
    if spec["tfds"] is None:
        raise ValueError(f"Dataset {name!r} is not in tensorflow-datasets; pass its CSV file "
                         "(label,title,description rows). Received: data=None")
    return _load_tfds_text(spec, split)


def stratified_split(labels, val_size, seed=0):
    """Seeded split keeping the class proportions: ``(train_indices, val_indices)``, sorted.

    Class ``c`` gives ``val_size * n_c / n`` items to validation, rounded by largest
    remainder so that exactly ``val_size`` are taken (every class keeps one for training).
    """
    labels = np.asarray(labels)
    n = len(labels)
    if isinstance(val_size, bool) or not isinstance(val_size, (int, np.integer)) or not (
        1 <= val_size < n
    ):
        raise ValueError(f"`val_size` must be an int in [1, {n}) (the items). "
                         f"Received: val_size={val_size!r}")
    rng = np.random.default_rng(seed)
    classes, counts = np.unique(labels, return_counts=True)
    exact = val_size * counts / n
    quota = np.floor(exact).astype(int)
    for i in np.argsort(-(exact - quota), kind="stable")[: val_size - quota.sum()]:
        quota[i] += 1
    quota = np.minimum(quota, counts - 1)
    val = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:q]
                          for c, q in zip(classes, quota, strict=True)])
    return np.setdiff1d(np.arange(n), val), np.sort(val)


def make_text_dataset(texts, labels, batch_size, tokenizer, training=False, seed=0,
                      first_epoch=0):
    """``tf.data`` of ``(char_ids, label)`` batches; shuffled each epoch when training,
    from `splits.epoch_seed` ``(seed, first_epoch)`` (``first_epoch``: epochs a resumed
    run has done)."""
    import tensorflow as tf

    seed = epoch_seed(seed, first_epoch)
    ds = tf.data.Dataset.from_tensor_slices((np.asarray(texts, dtype=str).astype(object),
                                             np.asarray(labels, np.int32)))
    if training:
        ds = ds.shuffle(len(labels), seed=seed, reshuffle_each_iteration=True)
    ds = ds.batch(batch_size, drop_remainder=training)
    ds = ds.map(lambda t, y: (tokenizer.encode(t), y), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)
