"""Task schema and site loaders: real files of every format, read all or not at all."""

import gzip
import json
import struct
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from clients.loaders import FORMATS, LoaderError, infer_schema, load_site
from clients.schema import SchemaError, TaskSchema, schema_from_dict

IDX_IMAGES, IDX_LABELS = 0x00000803, 0x00000801


def _idx_bytes(array: np.ndarray, magic: int) -> bytes:
    """An IDX file written by hand: big-endian magic, one uint32 per dimension, bytes."""
    header = struct.pack(">I", magic) + struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_idx(folder: Path, images: np.ndarray, labels: np.ndarray, gz: bool) -> Path:
    suffix = ".gz" if gz else ""
    pack = gzip.compress if gz else bytes
    images_file = folder / f"train-images-idx3-ubyte{suffix}"
    images_file.write_bytes(pack(_idx_bytes(images, IDX_IMAGES)))
    (folder / f"train-labels-idx1-ubyte{suffix}").write_bytes(pack(_idx_bytes(labels, IDX_LABELS)))
    return images_file


def _raises(path, call, *words):
    """Assert that ``call`` raises a LoaderError starting with ``path`` and naming ``words``."""
    with pytest.raises(LoaderError) as info:
        call()
    message = str(info.value)
    assert message.startswith(str(path)), message
    for word in words:
        assert word in message, message
    return message


# --- schema -----------------------------------------------------------------------------


def test_label_index_treats_text_float_and_int_alike():
    # Prepare
    schema = TaskSchema("image", (1, 3, 5), input_shape=(1, 2, 2))
    raw = np.array(
        ["3", 3, 3.0, np.nan, None, "7", "x", 5, " 1 ", True, "3.0", 3.5, ""], dtype=object
    )
    # Execute
    index = schema.label_index(raw)
    # Assert: class i is labels[i]; by hand 3 -> 1, 5 -> 2, 1 -> 0, the rest -> -1.
    assert index.dtype == np.int64
    assert index.tolist() == [1, 1, 1, -1, -1, -1, -1, 2, 0, -1, 1, -1, -1]


def test_label_index_numeric_arrays():
    schema = TaskSchema("image", (1, 3, 5), input_shape=(1, 2, 2))
    floats = np.array([1.0, 3.0, np.nan, 2.5, 5.0, np.inf, -3.0])
    ints = np.array([5, 1, 4, -1], dtype=np.int64)
    assert schema.label_index(floats).tolist() == [0, 1, -1, -1, 2, -1, -1]
    assert schema.label_index(ints).tolist() == [2, 0, -1, -1]
    assert schema.label_index(ints.astype(np.uint8)).tolist() == [2, 0, -1, -1]  # 255


def test_label_index_string_labels():
    animals = TaskSchema("tabular", ("cat", "dog"), features=("w",))
    digits = TaskSchema("tabular", ("0", "1"), features=("w",))
    assert animals.label_index(["dog", " cat", "bird", None, 3]).tolist() == [1, 0, -1, -1, -1]
    assert digits.label_index(np.array([1, 0.0, "1", 2], dtype=object)).tolist() == [1, 0, 1, -1]
    assert digits.num_classes == 2


@pytest.mark.parametrize(
    "kwargs,named",
    [
        ({"kind": "audio", "labels": (0, 1)}, "schema.kind='audio'"),
        ({"kind": "image", "labels": (0,), "input_shape": (1, 2, 2)}, "schema.labels=(0,)"),
        ({"kind": "image", "labels": (0, 0), "input_shape": (1, 2, 2)}, "duplicate label 0"),
        ({"kind": "image", "labels": (0, "a"), "input_shape": (1, 2, 2)}, "schema.labels="),
        ({"kind": "image", "labels": [0, 1], "input_shape": (1, 2, 2)}, "schema.labels=[0, 1]"),
        ({"kind": "tabular", "labels": (0, 1)}, "schema.features=()"),
        ({"kind": "tabular", "labels": (0, 1), "features": ("a", "a")}, "duplicate column 'a'"),
        (
            {"kind": "tabular", "labels": (0, 1), "features": ("a", "y"), "label_column": "y"},
            "schema.label_column='y'",
        ),
        ({"kind": "image", "labels": (0, 1), "input_shape": (28, 28)}, "schema.input_shape="),
        ({"kind": "image", "labels": (0, 1), "input_shape": (1, 0, 28)}, "(1, 0, 28)"),
        ({"kind": "image", "labels": (0, 1), "input_shape": (1, 2.0, 2)}, "(1, 2.0, 2)"),
        (
            {"kind": "image", "labels": (0, 1), "input_shape": (1, 2, 2), "dtype": "int32"},
            "schema.dtype='int32'",
        ),
    ],
)
def test_bad_schema_names_field_and_value(kwargs, named):
    with pytest.raises(SchemaError) as info:
        TaskSchema(**kwargs)
    assert named in str(info.value)


def test_schema_from_dict_and_describe_round_trip():
    # Prepare: what hydra hands over (lists, not tuples).
    node = {"kind": "tabular", "labels": ["no", "yes"], "features": ["age", "bmi"]}
    # Execute
    schema = schema_from_dict(node)
    described = json.loads(json.dumps(schema.describe()))
    # Assert
    assert schema.labels == ("no", "yes") and schema.features == ("age", "bmi")
    assert described["num_classes"] == 2 and described["label_column"] == "label"
    assert schema_from_dict(described) == schema
    assert schema.sample_shape == (2,)


def test_schema_from_hydra_node():
    from omegaconf import OmegaConf

    node = OmegaConf.create({"kind": "image", "labels": [0, 1, 2], "input_shape": [1, 28, 28]})
    schema = schema_from_dict(node)
    assert schema == TaskSchema("image", (0, 1, 2), input_shape=(1, 28, 28))


def test_schema_from_dict_rejects_unknown_keys_and_wrong_count():
    with pytest.raises(SchemaError, match="unknown keys \\['shape'\\]"):
        schema_from_dict({"kind": "image", "labels": [0, 1], "shape": [1, 2, 2]})
    with pytest.raises(SchemaError, match="schema.num_classes=3"):
        schema_from_dict(
            {"kind": "image", "labels": [0, 1], "input_shape": [1, 2, 2], "num_classes": 3}
        )
    with pytest.raises(SchemaError, match="schema.labels: missing"):
        schema_from_dict({"kind": "image", "input_shape": [1, 2, 2]})


# --- csv and parquet -------------------------------------------------------------------

CSV_TEXT = """id,f1,f2,label,notes
1,0.5,1.0,0,a
2,,2.0,1,b
3,abc,3.0,1,c
3,abc,3.0,1,c
4,4.5,inf,2,d
5,6.0,7.0,,e
"""


def test_csv_keeps_every_row_nan_for_bad_values(tmp_path):
    # Prepare: a NaN, a non-numeric cell, a duplicate row, inf and a missing label.
    path = tmp_path / "site.csv"
    path.write_text(CSV_TEXT)
    schema = TaskSchema("tabular", (0, 1, 2), features=("f2", "f1"))
    nan = np.nan
    want_x = np.array([[1.0, 0.5], [2.0, nan], [3.0, nan], [3.0, nan], [nan, 4.5], [7.0, 6.0]])
    # Execute
    data = load_site(path, "csv", schema)
    # Assert: features in schema order, extra columns ignored, nothing dropped yet.
    np.testing.assert_array_equal(data.x, want_x)
    assert data.x.dtype == np.float64
    assert schema.label_index(data.labels).tolist() == [0, 1, 1, 1, 2, -1]
    assert data.rows_read == 6 and data.source == str(path)


def test_csv_missing_columns_named(tmp_path):
    path = tmp_path / "site.csv"
    path.write_text(CSV_TEXT)
    wrong_features = TaskSchema("tabular", (0, 1), features=("f1", "f3", "f4"))
    wrong_label = TaskSchema("tabular", (0, 1), features=("f1",), label_column="y")
    _raises(path, lambda: load_site(path, "csv", wrong_features), "missing columns", "'f3', 'f4'")
    _raises(path, lambda: load_site(path, "csv", wrong_label), "missing columns ['y']")


def test_csv_repeated_column_is_ambiguous(tmp_path):
    path = tmp_path / "site.csv"
    path.write_text("f1,f1,label\n1,2,0\n")
    schema = TaskSchema("tabular", (0, 1), features=("f1",))
    _raises(path, lambda: load_site(path, "csv", schema), "['f1'] appear more than once")


def test_csv_header_only_is_no_records(tmp_path):
    path = tmp_path / "empty.csv"
    path.write_text("f1,label\n")
    schema = TaskSchema("tabular", (0, 1), features=("f1",))
    _raises(path, lambda: load_site(path, "csv", schema), "no records")


def test_parquet_reads_typed_columns(tmp_path):
    # Prepare
    path = tmp_path / "site.parquet"
    frame = pd.DataFrame(
        {
            "b": [0.25, np.nan, 3.0],
            "text": ["x", "y", "z"],
            "a": [1, 2, 3],
            "label": ["dog", "cat", "bird"],
        }
    )
    frame.to_parquet(path)
    schema = TaskSchema("tabular", ("cat", "dog"), features=("a", "b", "text"))
    # Execute
    data = load_site(path, "parquet", schema)
    # Assert: the text column is all NaN, to be cleaned later.
    want = np.array([[1.0, 0.25, np.nan], [2.0, np.nan, np.nan], [3.0, 3.0, np.nan]])
    np.testing.assert_array_equal(data.x, want)
    assert list(data.labels) == ["dog", "cat", "bird"]
    assert schema.label_index(data.labels).tolist() == [1, 0, -1]


def test_parquet_nullable_labels(tmp_path):
    path = tmp_path / "site.parquet"
    pd.DataFrame({"a": [1.0, 2.0], "label": pd.array([1, None], dtype="Int64")}).to_parquet(path)
    schema = TaskSchema("tabular", (0, 1), features=("a",))
    data = load_site(path, "parquet", schema)
    assert schema.label_index(data.labels).tolist() == [1, -1]


def test_parquet_missing_label_column(tmp_path):
    path = tmp_path / "site.parquet"
    pd.DataFrame({"a": [1.0]}).to_parquet(path)
    schema = TaskSchema("tabular", (0, 1), features=("a",))
    _raises(path, lambda: load_site(path, "parquet", schema), "missing columns ['label']")


# --- npz --------------------------------------------------------------------------------


def test_npz_uint8_images_scaled(tmp_path):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(5, 4, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 1, 0])
    path = tmp_path / "site.npz"
    np.savez(path, x=images, y=labels)
    schema = TaskSchema("image", (0, 1, 2), input_shape=(1, 4, 3))
    data = load_site(path, "npz", schema)
    np.testing.assert_allclose(data.x, images.reshape(5, 1, 4, 3) / 255.0, rtol=0, atol=1e-15)
    np.testing.assert_array_equal(data.labels, labels)


def test_npz_float_images_and_alt_keys(tmp_path):
    rng = np.random.default_rng(1)
    images = rng.random((3, 3, 2, 2)).astype(np.float32)
    path = tmp_path / "site.npz"
    np.savez(path, images=images, labels=np.array(["a", "b", "a"]))
    schema = TaskSchema("image", ("a", "b"), input_shape=(3, 2, 2))
    data = load_site(path, "npz", schema)
    np.testing.assert_array_equal(data.x, images.astype(np.float64))
    assert schema.label_index(data.labels).tolist() == [0, 1, 0]


def test_npz_floats_outside_unit_interval_rejected(tmp_path):
    path = tmp_path / "site.npz"
    np.savez(path, x=np.full((2, 2, 2), 255.0), y=np.array([0, 1]))
    schema = TaskSchema("image", (0, 1), input_shape=(1, 2, 2))
    _raises(path, lambda: load_site(path, "npz", schema), "[0, 1]", "8 values")


def test_npz_tabular_and_wrong_width(tmp_path):
    path = tmp_path / "site.npz"
    table = np.array([[1.0, np.inf], [3.0, 4.0]])
    np.savez(path, X=table, y=np.array([1, 0]))
    good = TaskSchema("tabular", (0, 1), features=("p", "q"))
    wide = TaskSchema("tabular", (0, 1), features=("p", "q", "r"))
    np.testing.assert_array_equal(load_site(path, "npz", good).x, [[1.0, np.nan], [3.0, 4.0]])
    _raises(path, lambda: load_site(path, "npz", wide), "(N, 3)", "(2, 2)")


def test_npz_wrong_keys_and_wrong_shape(tmp_path):
    keys = tmp_path / "keys.npz"
    np.savez(keys, data=np.zeros((2, 2, 2)), target=np.zeros(2))
    shaped = tmp_path / "shaped.npz"
    np.savez(shaped, x=np.zeros((2, 4, 4), dtype=np.uint8), y=np.zeros(2))
    schema = TaskSchema("image", (0, 1), input_shape=(1, 2, 2))
    _raises(keys, lambda: load_site(keys, "npz", schema), "['data', 'target']")
    _raises(shaped, lambda: load_site(shaped, "npz", schema), "(1, 2, 2)", "(1, 4, 4)")


# --- idx --------------------------------------------------------------------------------

IDX_SCHEMA = TaskSchema("image", tuple(range(10)), input_shape=(1, 5, 4))


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize("by_dir", [False, True])
def test_idx_round_trip(tmp_path, gz, by_dir):
    # Prepare
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(6, 5, 4), dtype=np.uint8)
    labels = np.array([9, 0, 3, 3, 7, 1], dtype=np.uint8)
    images_file = _write_idx(tmp_path, images, labels, gz)
    # Execute
    data = load_site(tmp_path if by_dir else images_file, "idx", IDX_SCHEMA)
    # Assert
    np.testing.assert_allclose(data.x, images[:, None] / 255.0, rtol=0, atol=1e-15)
    assert data.labels.tolist() == [9, 0, 3, 3, 7, 1]
    assert IDX_SCHEMA.label_index(data.labels).tolist() == [9, 0, 3, 3, 7, 1]


def test_idx_truncated_raw_file(tmp_path):
    images = np.zeros((6, 5, 4), dtype=np.uint8)
    images_file = _write_idx(tmp_path, images, np.zeros(6, dtype=np.uint8), gz=False)
    images_file.write_bytes(images_file.read_bytes()[:-10])
    message = _raises(images_file, lambda: load_site(tmp_path, "idx", IDX_SCHEMA), "truncated")
    assert "need 120 data bytes, found 110" in message  # 6 * 5 * 4 = 120


def test_idx_truncated_gzip(tmp_path):
    images = np.zeros((6, 5, 4), dtype=np.uint8)
    images_file = _write_idx(tmp_path, images, np.zeros(6, dtype=np.uint8), gz=True)
    images_file.write_bytes(images_file.read_bytes()[:-12])
    _raises(images_file, lambda: load_site(images_file, "idx", IDX_SCHEMA), "gzip")


def test_idx_bad_magic_count_mismatch_and_shape(tmp_path):
    images = np.zeros((6, 5, 4), dtype=np.uint8)
    images_file = _write_idx(tmp_path, images, np.zeros(5, dtype=np.uint8), gz=False)
    _raises(images_file, lambda: load_site(tmp_path, "idx", IDX_SCHEMA), "6 images", "5 labels")
    _write_idx(tmp_path, images, np.zeros(6, dtype=np.uint8), gz=False)
    square = TaskSchema("image", tuple(range(10)), input_shape=(1, 28, 28))
    _raises(tmp_path, lambda: load_site(tmp_path, "idx", square), "(1, 28, 28)", "(1, 5, 4)")
    images_file.write_bytes(_idx_bytes(images, 0x00000C03))  # type 0x0C: int32, not bytes
    _raises(images_file, lambda: load_site(tmp_path, "idx", IDX_SCHEMA), "magic", "0x00000803")


def test_idx_directory_must_hold_one_pair(tmp_path):
    images = np.zeros((2, 5, 4), dtype=np.uint8)
    _write_idx(tmp_path, images, np.zeros(2, dtype=np.uint8), gz=False)
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(_idx_bytes(images, IDX_IMAGES))
    _raises(tmp_path, lambda: load_site(tmp_path, "idx", IDX_SCHEMA), "exactly one")


# --- a folder of images -------------------------------------------------------------------


def _png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array).save(path, format="PNG")


def _gray(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(3, 4), dtype=np.uint8)


def test_image_folder_reads_sorted_and_keeps_unknown_classes(tmp_path):
    # Prepare: H=3, W=4; "7" is not a label; junk files are ignored.
    _png(tmp_path / "1" / "z.png", _gray(3))
    _png(tmp_path / "0" / "b.PNG", _gray(2))
    _png(tmp_path / "0" / "a.png", _gray(1))
    _png(tmp_path / "7" / "a.png", _gray(4))
    (tmp_path / "0" / ".DS_Store").write_bytes(b"\x00\x01junk")
    (tmp_path / "1" / "notes.txt").write_text("not an image")
    schema = TaskSchema("image", (0, 1), input_shape=(1, 3, 4))
    # Execute
    data = load_site(tmp_path, "images", schema)
    # Assert: folders then files in name order.
    want = np.stack([_gray(1), _gray(2), _gray(3), _gray(4)])[:, None] / 255.0
    np.testing.assert_allclose(data.x, want, rtol=0, atol=1e-15)
    assert data.labels.tolist() == [0, 0, 1, "7"]
    assert schema.label_index(data.labels).tolist() == [0, 0, 1, -1]


def test_image_folder_rgb_and_jpeg(tmp_path):
    rgb = np.random.default_rng(5).integers(0, 256, size=(3, 4, 3), dtype=np.uint8)
    _png(tmp_path / "cat" / "a.png", rgb)
    Image.new("RGB", (4, 3), (200, 100, 50)).save(tmp_path / "cat" / "b.JPG", format="JPEG")
    schema = TaskSchema("image", ("cat", "dog"), input_shape=(3, 3, 4))
    data = load_site(tmp_path, "images", schema)
    np.testing.assert_allclose(data.x[0], rgb.transpose(2, 0, 1) / 255.0, rtol=0, atol=1e-15)
    # JPEG is lossy: a flat colour comes back within a few levels.
    flat = np.array([200, 100, 50], dtype=np.float64)[:, None, None] / 255.0
    np.testing.assert_allclose(data.x[1], np.broadcast_to(flat, (3, 3, 4)), atol=4 / 255)
    assert data.labels.tolist() == ["cat", "cat"]


def test_image_folder_corrupt_and_wrong_size(tmp_path):
    _png(tmp_path / "0" / "a.png", _gray(1))
    bad = tmp_path / "1" / "bad.png"
    bad.parent.mkdir()
    bad.write_bytes(b"\x89PNG garbage, not a real image" * 3)
    schema = TaskSchema("image", (0, 1), input_shape=(1, 3, 4))
    _raises(bad, lambda: load_site(tmp_path, "images", schema), "cannot decode")
    bad.unlink()
    wide = tmp_path / "1" / "wide.png"
    _png(wide, np.zeros((3, 5), dtype=np.uint8))
    _raises(wide, lambda: load_site(tmp_path, "images", schema), "5x3", "4x3")


# --- common errors and schema inference -------------------------------------------------


def test_missing_path_unknown_format_and_kind_mismatch(tmp_path):
    schema = TaskSchema("image", (0, 1), input_shape=(1, 3, 4))
    missing = tmp_path / "nowhere.npz"
    _raises(missing, lambda: load_site(missing, "npz", schema), "no such file or directory")
    _raises(tmp_path, lambda: load_site(tmp_path, "hdf5", schema), "'hdf5'", str(FORMATS))
    _raises(tmp_path, lambda: load_site(tmp_path, "csv", schema), "tabular", "'image'")


def test_not_an_archive_is_a_loader_error(tmp_path):
    path = tmp_path / "site.npz"
    path.write_bytes(b"PK\x03\x04 truncated zip")
    schema = TaskSchema("image", (0, 1), input_shape=(1, 3, 4))
    _raises(path, lambda: load_site(path, "npz", schema), "cannot read as npz")


def test_infer_schema_tabular_and_images(tmp_path):
    csv = tmp_path / "site.csv"
    csv.write_text(CSV_TEXT)
    _png(tmp_path / "img" / "10" / "a.png", _gray(1))
    _png(tmp_path / "img" / "2" / "a.png", _gray(2))
    tabular = infer_schema(csv, "csv")
    assert tabular.features == ("id", "f1", "f2") and tabular.labels == (0, 1, 2)
    image = infer_schema(tmp_path / "img", "images")
    assert image.input_shape == (1, 3, 4) and image.labels == (2, 10)
    chosen = infer_schema(csv, "csv", labels=["0", "1", "2", "3"])
    assert chosen.labels == ("0", "1", "2", "3")


def test_infer_schema_idx_and_single_label(tmp_path):
    labels = np.array([4, 2, 4], dtype=np.uint8)
    _write_idx(tmp_path, np.zeros((3, 5, 4), dtype=np.uint8), labels, gz=True)
    schema = infer_schema(tmp_path, "idx")
    assert schema.input_shape == (1, 5, 4) and schema.labels == (2, 4)
    one = tmp_path / "one.npz"
    np.savez(one, x=np.zeros((2, 3)), y=np.array([1, 1]))
    _raises(one, lambda: infer_schema(one, "npz"), "cannot infer", "schema.labels=(1,)")


# --- the Debian package's Fashion-MNIST, when installed ---------------------------------


def _fashion_train() -> Path | None:
    patterns = ("fashion*mnist*", "*/fashion*mnist*", "*/*/fashion*mnist*")
    share = Path("/usr/share")
    found = [f for p in patterns for f in sorted(share.glob(f"{p}/train-images-idx3-ubyte*"))]
    return found[0] if found else None


@pytest.mark.skipif(_fashion_train() is None, reason="Fashion-MNIST IDX files not installed")
def test_fashion_mnist_from_debian_package():
    images_file = _fashion_train()
    schema = TaskSchema("image", tuple(range(10)), input_shape=(1, 28, 28))
    data = load_site(images_file, "idx", schema)
    # Published: 60,000 training images of 28x28, 6,000 per class.
    assert data.x.shape == (60000, 1, 28, 28)
    assert 0.0 <= data.x.min() and data.x.max() <= 1.0
    assert np.bincount(schema.label_index(data.labels), minlength=10).tolist() == [6000] * 10
    # The folder holds train and t10k: reading it as a whole is ambiguous.
    _raises(images_file.parent, lambda: load_site(images_file.parent, "idx", schema), "exactly one")
