"""CSV loading, its error messages, the validation split, duplicates and torchvision's MNIST."""

import gzip
import struct
import zipfile

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from conftest import SHARED_MNIST, digits_frame, om, synthetic_digits, write_kaggle_csvs

HEADER = "label," + ",".join(om.PIXEL_COLUMNS)


def row(label, pixels):
    return ",".join(str(v) for v in ([label] if label is not None else []) + list(pixels))


def csv_text(rows, header=HEADER):
    return header + "\n" + "".join(r + "\n" for r in rows)


def good_rows(count=3):
    return [row(i % 10, [0] * 783 + [i]) for i in range(count)]


def read(path, with_label=True):
    return om.read_digits_csv(om.CsvSource(str(path), path), with_label=with_label)


def test_reads_train_csv_into_uint8(tmp_path):
    images, labels = synthetic_digits(30, seed=0)
    path = tmp_path / "train.csv"
    digits_frame(images, labels).to_csv(path, index=False)
    x, y = read(path)
    assert x.dtype == np.uint8
    assert x.shape == (30, 28, 28)
    assert np.array_equal(x, images)
    assert np.array_equal(y, labels)


def test_reads_gzip_and_reordered_columns(tmp_path):
    images, labels = synthetic_digits(12, seed=3)
    frame = digits_frame(images, labels)
    frame = frame[list(reversed(frame.columns))]
    path = tmp_path / "train.csv.gz"
    frame.to_csv(path, index=False)
    x, y = read(path)
    assert np.array_equal(x, images)
    assert np.array_equal(y, labels)


def test_test_csv_with_label_is_accepted(tmp_path, capsys):
    path = tmp_path / "test.csv"
    path.write_text(csv_text(good_rows(4)))
    x, y = read(path, with_label=False)
    assert x.shape == (4, 28, 28)
    assert y is None
    assert "ignored" in capsys.readouterr().err


BAD_FILES = [
    ("empty", b"", "empty"),
    ("header only", csv_text([]).encode(), "no data rows"),
    ("no label", csv_text([row(None, [0] * 784)], header=",".join(om.PIXEL_COLUMNS)).encode(), "no 'label' column"),
    ("pandas index", csv_text(["0," + row(1, [0] * 784)], header="Unnamed: 0," + HEADER).encode(), "pandas index"),
    ("unknown column", csv_text([row(1, [0] * 784) + ",5"], header=HEADER + ",extra").encode(), "unknown column"),
    ("missing pixel", csv_text([row(1, [0] * 783)], header=HEADER.rsplit(",", 1)[0]).encode(), "missing column"),
    ("too many values", csv_text(good_rows(2) + [row(1, [0] * 785)]).encode(), "line 4: 786 values"),
    ("too few values", csv_text(good_rows(2) + [row(1, [0] * 700)]).encode(), "line 4: 701 values"),
    ("empty cell", csv_text([row(1, [0] * 783) + ","]).encode(), "pixel783: missing value"),
    ("text cell", csv_text([row(1, [0] * 10 + ["x"] + [0] * 773)]).encode(), "pixel10: 'x' is not a number"),
    ("fraction", csv_text([row(1, [0] * 5 + ["3.5"] + [0] * 778)]).encode(), "pixel5: '3.5' is not a whole number"),
    ("pixel 256", csv_text(good_rows(2) + [row(1, [0] * 7 + [256] + [0] * 776)]).encode(), "data row 3, column pixel7: pixel 256"),
    ("negative pixel", csv_text([row(1, [-1] + [0] * 783)]).encode(), "pixel0: pixel -1 is outside 0-255"),
    ("label 10", csv_text(good_rows(1) + [row(10, [0] * 784)]).encode(), "data row 2, column label: label 10"),
]


@pytest.mark.parametrize("name,content,message", BAD_FILES, ids=[case[0] for case in BAD_FILES])
def test_bad_csv_names_the_problem(tmp_path, name, content, message):
    path = tmp_path / "train.csv"
    path.write_bytes(content)
    with pytest.raises(om.InputError) as caught:
        read(path)
    assert message in str(caught.value)
    assert "train.csv" in str(caught.value)


def test_truncated_gzip_is_clear_error(tmp_path):
    images, labels = synthetic_digits(200, seed=0)
    path = tmp_path / "train.csv.gz"
    digits_frame(images, labels).to_csv(path, index=False)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(om.InputError, match="truncated or corrupt"):
        read(path)


def test_corrupt_gzip_is_clear_error(tmp_path):
    path = tmp_path / "train.csv.gz"
    path.write_bytes(b"\x1f\x8b\x08\x00" + b"garbage" * 50)
    with pytest.raises(om.InputError, match="train.csv.gz"):
        read(path)


def test_missing_class_is_rejected(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    images, labels = synthetic_digits(100, seed=0)
    keep = labels != 3
    digits_frame(images[keep], labels[keep]).to_csv(folder / "train.csv", index=False)
    digits_frame(images[:10], None).to_csv(folder / "test.csv", index=False)
    with pytest.raises(om.InputError, match="digit\\(s\\) 3"):
        om.load_data(om.default_config(data_dir=str(folder)))


def test_only_train_csv_names_missing_test(tmp_path):
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.csv").write_text(csv_text(good_rows()))
    with pytest.raises(om.InputError, match="no test.csv"):
        om.locate_data(folder)


def test_stratified_split_keeps_class_shares():
    labels = np.repeat(np.arange(10), [100, 200, 50, 80, 120, 90, 110, 60, 70, 120])
    train, val = om.stratified_split(labels, 0.1, seed=7)
    assert len(np.intersect1d(train, val)) == 0
    assert len(train) + len(val) == len(labels)
    for digit, count in enumerate([100, 200, 50, 80, 120, 90, 110, 60, 70, 120]):
        assert (labels[val] == digit).sum() == round(count * 0.1)
    again_train, again_val = om.stratified_split(labels, 0.1, seed=7)
    assert np.array_equal(val, again_val)
    assert len(om.stratified_split(labels, 0.0, seed=7)[1]) == 0


def test_count_duplicates_finds_exact_copies():
    images, _ = synthetic_digits(50, seed=0)
    queries = images[[3, 7, 7]].copy()
    queries[2, 0, 0] ^= 1  # one pixel differs
    assert om.count_duplicates(images, queries) == 2


def test_zip_archive_is_read_directly(tmp_path):
    folder = write_kaggle_csvs(tmp_path / "unpacked", train_rows=40, test_rows=12)
    pd.DataFrame({"ImageId": range(1, 13), "Label": 0}).to_csv(folder / "sample_submission.csv", index=False)
    archive = tmp_path / "digit-recognizer.zip"
    with zipfile.ZipFile(archive, "w") as zipped:
        for name in ("train.csv", "test.csv", "sample_submission.csv"):
            zipped.write(folder / name, name)
    data = om.load_data(om.default_config(data_dir=str(archive), val_fraction=0.25))
    assert len(data.train_y) + len(data.val_y) == 40
    assert data.test_x.shape == (12, 28, 28)
    assert np.array_equal(data.sample_submission_ids, np.arange(1, 13))


def write_idx(path, array, magic):
    with gzip.open(path, "wb") if str(path).endswith(".gz") else open(path, "wb") as handle:
        handle.write(struct.pack(">I", magic) + b"".join(struct.pack(">I", d) for d in array.shape))
        handle.write(array.astype(np.uint8).tobytes())


def test_torchvision_mnist_from_local_files(tmp_path):
    raw = tmp_path / "MNIST" / "raw"
    raw.mkdir(parents=True)
    train_x, train_y = synthetic_digits(60, seed=0)
    test_x, test_y = synthetic_digits(20, seed=1)
    write_idx(raw / "train-images-idx3-ubyte", train_x, 2051)
    write_idx(raw / "train-labels-idx1-ubyte", train_y, 2049)
    write_idx(raw / "t10k-images-idx3-ubyte", test_x, 2051)
    write_idx(raw / "t10k-labels-idx1-ubyte", test_y, 2049)
    data = om.load_data(om.default_config(data_dir=str(tmp_path), val_fraction=0.2))
    assert "torchvision" in data.source
    assert np.array_equal(data.test_x, test_x)
    assert np.array_equal(data.test_y, test_y)
    assert len(data.val_y) == 10  # round(6 images per class * 0.2) = 1 per class


def test_offline_download_is_clear_error(tmp_path, monkeypatch):
    from torchvision import datasets

    # Port 9 (discard) on the loopback address: nothing listens, so the connection is refused at once.
    monkeypatch.setattr(datasets.MNIST, "mirrors", ["http://127.0.0.1:9/"])
    with pytest.raises(om.InputError, match="downloading MNIST there failed"):
        om.load_data(om.default_config(data_dir=str(tmp_path / "empty")))


@pytest.mark.skipif(not (SHARED_MNIST / "test.csv.gz").exists(), reason="shared MNIST CSVs not present")
def test_real_test_csv_loads():
    x, y = read(SHARED_MNIST / "test.csv.gz", with_label=False)
    assert x.shape == (10_000, 28, 28)
    assert y is None
    assert x.max() == 255


cell = st.one_of(st.integers(-300, 300).map(str), st.sampled_from(["", "x", "1.5", "2.0", " 7", "nan", "1e3"]))
# A row is 783-787 zeros with a few random cells written over them: small for
# hypothesis to generate, yet it reaches every kind of malformed row.
malformed_row = st.tuples(
    st.integers(783, 787),
    st.lists(st.tuples(st.integers(0, 786), cell), max_size=4),
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=st.lists(malformed_row, min_size=0, max_size=4), header_drop=st.booleans())
def test_loader_returns_data_or_clear_error(tmp_path, rows, header_drop):
    header = HEADER if not header_drop else HEADER.replace("pixel5,", "")
    lines = []
    for length, changes in rows:
        values = ["0"] * length
        for index, value in changes:
            if index < length:
                values[index] = value
        lines.append(",".join(values) + "\n")
    path = tmp_path / "train.csv"
    path.write_text(header + "\n" + "".join(lines))
    try:
        x, y = read(path)
    except om.InputError as error:
        assert "train.csv" in str(error)
        return
    assert x.dtype == np.uint8
    assert x.shape == (len(rows), 28, 28)
    assert y.min() >= 0
    assert y.max() <= 9


def test_leakage_report_counts_and_warns(capsys):
    train_x, train_y = synthetic_digits(200, seed=0)
    data = om.Dataset(train_x=train_x[:150], train_y=train_y[:150], val_x=train_x[[150, 3]], val_y=train_y[[150, 3]],
                      test_x=np.concatenate([train_x[:40], synthetic_digits(10, seed=9)[0]]), test_y=None,
                      source="synthetic")
    counts = om.report_leakage(data)
    assert counts == {"test_in_train": 40, "val_in_train": 1}
    captured = capsys.readouterr()
    assert "40 of 50 test images" in captured.out
    assert "leaderboard" in captured.err


def test_submission_checked_against_sample(tmp_path):
    with pytest.raises(om.InputError, match="sample_submission.csv"):
        om.write_submission(np.zeros(5), tmp_path / "submission.csv", sample_ids=np.arange(1, 7))
    assert not (tmp_path / "submission.csv").exists()
    om.write_submission(np.array([3, 1, 4]), tmp_path / "submission.csv", sample_ids=np.arange(1, 4))
    assert (tmp_path / "submission.csv").read_text() == "ImageId,Label\n1,3\n2,1\n3,4\n"


def test_test_csv_label_column_may_hold_anything(tmp_path):
    path = tmp_path / "test.csv"
    path.write_text(csv_text([row(-1, [0] * 784), row("", [1] * 784)]))
    x, y = read(path, with_label=False)
    assert x.shape == (2, 28, 28)
    assert y is None


def test_duplicate_header_column_is_named(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(csv_text([row(1, [0] * 785)], header=HEADER + ",pixel5"))
    with pytest.raises(om.InputError, match="duplicate column name\\(s\\) pixel5"):
        read(path)


def test_huge_value_gives_no_pandas_warning(tmp_path):
    import warnings

    path = tmp_path / "train.csv"
    path.write_text(csv_text([row(1, ["1e20"] + [0] * 783)]))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with pytest.raises(om.InputError, match="pixel0"):
            read(path)
    assert [str(w.message) for w in caught] == []


def test_sample_submission_mismatch_fails_before_training(tmp_path):
    folder = write_kaggle_csvs(tmp_path / "data", train_rows=40, test_rows=12)
    pd.DataFrame({"ImageId": range(1, 11), "Label": 0}).to_csv(folder / "sample_submission.csv", index=False)
    with pytest.raises(om.InputError, match="sample_submission.csv: its 10 ImageIds are not 1 to 12"):
        om.load_data(om.default_config(data_dir=str(folder)))


@pytest.mark.parametrize("overrides,message", [
    ({"num_classes": 5}, "labels go up to 9, but --num-classes is 5"),
    ({"val_fraction": 0.99}, "leaves 0 of 40 rows for training"),
])
def test_settings_that_do_not_fit_the_data(tmp_path, overrides, message):
    folder = write_kaggle_csvs(tmp_path / "data", train_rows=40, test_rows=12)
    with pytest.raises(om.InputError, match=message):
        om.load_data(om.default_config(data_dir=str(folder), **overrides))


def test_spaces_after_commas_are_read(tmp_path):
    path = tmp_path / "train.csv"
    path.write_text(", ".join(["label"] + om.PIXEL_COLUMNS) + "\n" + ", ".join(["3", "7"] + ["0"] * 783) + "\n")
    x, y = read(path)
    assert y.tolist() == [3]
    assert x[0, 0, 0] == 7
