"""Built-in datasets and user data files: shapes, dtypes, determinism, and one-line errors on bad input."""

from __future__ import annotations

import json
import zipfile

import numpy as np
import pytest

from raysim.data import files, sources
from raysim.errors import ScenarioError


def assert_well_formed(ds: sources.ArrayDataset) -> None:
    for x, y in ((ds.x_train, ds.y_train), (ds.x_test, ds.y_test)):
        assert x.dtype == np.float32 and x.flags["C_CONTIGUOUS"]
        assert y.dtype == np.int64 and y.shape == (x.shape[0],)
        assert y.min() >= 0 and y.max() < ds.num_classes
        assert x.shape[1:] == ds.feature_shape
    if ds.natural_keys is not None:
        assert ds.natural_keys.dtype == np.int64 and ds.natural_keys.shape == ds.y_train.shape


# --- built-in sources -------------------------------------------------------------------------


def test_synthetic_has_the_requested_shape_and_is_seeded():
    ds = sources.synthetic(num_samples=1000, num_features=16, num_classes=5, seed=3)
    assert_well_formed(ds)
    assert ds.x_train.shape == (800, 16) and ds.x_test.shape == (200, 16)
    assert set(np.unique(ds.y_train).tolist()) == set(range(5))
    again = sources.synthetic(num_samples=1000, num_features=16, num_classes=5, seed=3)
    other = sources.synthetic(num_samples=1000, num_features=16, num_classes=5, seed=4)
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    np.testing.assert_array_equal(ds.y_test, again.y_test)
    assert not np.array_equal(ds.x_train, other.x_train)


def test_synthetic_offsets_in_blocks_exactly_as_one_dataset_sized_sum(monkeypatch):
    """The generator adds the cluster centres a block of rows at a time (no dataset-sized temporary);
    across several block boundaries it gives what one whole-array sum gives, bit for bit."""
    monkeypatch.setattr(sources, "ROWS_PER_BLOCK", 7)
    ds = sources.synthetic(num_samples=50, num_features=4, num_classes=3, seed=5)
    rng = np.random.default_rng(5)
    centres = rng.standard_normal((9, 4), dtype=np.float32) * np.float32(6.0 / 2.0)
    cluster = rng.integers(0, 9, size=50)
    x = rng.standard_normal((50, 4), dtype=np.float32) + centres[cluster]
    np.testing.assert_array_equal(np.concatenate([ds.x_train, ds.x_test]), x)
    np.testing.assert_array_equal(np.concatenate([ds.y_train, ds.y_test]), cluster % 3)
    assert ds.y_train.dtype == np.int64


def test_synthetic_is_learnable_but_not_linearly_trivial():
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier

    ds = sources.synthetic(num_samples=6000, num_features=16, num_classes=10, seed=0)
    linear = LogisticRegression(max_iter=300).fit(ds.x_train, ds.y_train).score(ds.x_test, ds.y_test)
    local = KNeighborsClassifier(5).fit(ds.x_train, ds.y_train).score(ds.x_test, ds.y_test)
    assert local > 0.9
    assert linear < 0.97


def test_fedprox_synthetic_keys_cover_every_device():
    ds = sources.fedprox_synthetic(alpha=1.0, beta=1.0, num_devices=30, seed=0)
    assert_well_formed(ds)
    assert ds.feature_shape == (60,) and ds.num_classes == 10
    np.testing.assert_array_equal(np.unique(ds.natural_keys), np.arange(30))
    # every device holds at least 50 samples, and about 20% of each is held out for testing
    assert np.bincount(ds.natural_keys).min() >= 50 - 10
    assert 0.18 < ds.x_test.shape[0] / (ds.x_test.shape[0] + ds.x_train.shape[0]) < 0.22
    again = sources.fedprox_synthetic(alpha=1.0, beta=1.0, num_devices=30, seed=0)
    np.testing.assert_array_equal(ds.x_train, again.x_train)
    np.testing.assert_array_equal(ds.y_train, again.y_train)


def test_fedprox_synthetic_with_zero_alpha_beta_still_varies_across_devices():
    ds = sources.fedprox_synthetic(alpha=0.0, beta=0.0, num_devices=5, num_features=8, num_classes=3, seed=1)
    assert_well_formed(ds)
    assert ds.feature_shape == (8,) and ds.num_classes == 3


def test_digits_are_8x8_images_in_unit_range_with_a_stratified_split():
    ds = sources.digits(seed=0)
    assert_well_formed(ds)
    assert ds.feature_shape == (1, 8, 8) and ds.num_classes == 10
    assert ds.x_train.shape[0] + ds.x_test.shape[0] == 1797
    assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
    assert np.bincount(ds.y_test, minlength=10).min() >= 35
    np.testing.assert_array_equal(ds.y_test, sources.digits(seed=0).y_test)


@pytest.mark.parametrize(
    ("call", "field"),
    [
        (lambda: sources.synthetic(num_samples=100, num_features=4, num_classes=1, seed=0), "data.num_classes"),
        (lambda: sources.synthetic(num_samples=100, num_features=4, num_classes=2, test_fraction=1.0, seed=0),
         "data.test_fraction"),
        (lambda: sources.fedprox_synthetic(alpha=-1.0, beta=0.0, num_devices=3, seed=0), "data.alpha"),
        (lambda: sources.fedprox_synthetic(alpha=1.0, beta=1.0, num_devices=0, seed=0), "num_clients"),
    ],
)
def test_bad_source_arguments_name_the_field(call, field):
    with pytest.raises(ScenarioError, match=rf"^{field}: "):
        call()


# --- user files -------------------------------------------------------------------------------


@pytest.fixture
def table_rows() -> dict:
    rng = np.random.default_rng(0)
    n = 50
    return {
        "f0": rng.standard_normal(n).tolist(),
        "f1": rng.standard_normal(n).tolist(),
        "label": rng.choice(["cat", "dog", "eel"], size=n).tolist(),
        "writer": rng.choice(["ann", "bob", "cy", "di"], size=n).tolist(),
    }


def load(path, **kwargs):
    options = {"label_column": "label", "feature_columns": None, "test_path": None, "test_fraction": 0.2, "seed": 0}
    return files.load_table(str(path), **(options | kwargs))


def check_table_round_trip(ds: sources.ArrayDataset, rows: dict) -> None:
    assert_well_formed(ds)
    assert ds.feature_shape == (2,) and ds.num_classes == 3
    assert ds.x_train.shape[0] + ds.x_test.shape[0] == len(rows["label"])
    names = np.array(["cat", "dog", "eel"])
    features = np.stack([rows["f0"], rows["f1"]], axis=1).astype(np.float32)
    by_row = {tuple(f): name for f, name in zip(features.tolist(), rows["label"])}
    for x, y in zip(ds.x_train.tolist(), ds.y_train):
        assert by_row[tuple(x)] == names[y]


def test_npz_round_trip_with_natural_keys_and_a_seeded_split(tmp_path):
    x = np.random.default_rng(0).standard_normal((40, 3, 2))
    y = np.arange(40) % 4
    np.savez(tmp_path / "d.npz", x=x, y=y, keys=np.arange(40) // 10)
    ds = files.load_npz(str(tmp_path / "d.npz"), test_path=None, test_fraction=0.25, seed=0)
    assert_well_formed(ds)
    assert ds.feature_shape == (3, 2) and ds.num_classes == 4 and ds.x_test.shape[0] == 12  # 3 of each class
    for xi, yi, ki in zip(ds.x_train, ds.y_train, ds.natural_keys):
        row = int(np.flatnonzero((x.astype(np.float32) == xi).all(axis=(1, 2)))[0])
        assert (yi, ki) == (y[row], row // 10)
    again = files.load_npz(str(tmp_path / "d.npz"), test_path=None, test_fraction=0.25, seed=0)
    np.testing.assert_array_equal(ds.x_test, again.x_test)


def test_npz_with_a_separate_test_file(tmp_path):
    np.savez(tmp_path / "train.npz", x=np.ones((6, 2)), y=np.array([0, 1, 2, 0, 1, 2]))
    np.savez(tmp_path / "test.npz", x=np.zeros((3, 2)), y=np.array([0, 3, 1]))
    ds = files.load_npz(str(tmp_path / "train.npz"), test_path=str(tmp_path / "test.npz"), test_fraction=0.2, seed=0)
    assert ds.x_train.shape == (6, 2) and ds.x_test.shape == (3, 2) and ds.num_classes == 4


def test_csv_round_trip(tmp_path, table_rows):
    import pandas as pd

    pd.DataFrame(table_rows).drop(columns="writer").to_csv(tmp_path / "d.csv", index=False)
    check_table_round_trip(load(tmp_path / "d.csv"), table_rows)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.csv"]  # no cache next to the data


def test_jsonl_round_trip_with_a_natural_column(tmp_path, table_rows):
    with open(tmp_path / "d.jsonl", "w") as out:
        for i in range(len(table_rows["label"])):
            out.write(json.dumps({k: v[i] for k, v in table_rows.items()}) + "\n")
    ds = load(tmp_path / "d.jsonl", natural_column="writer")
    check_table_round_trip(ds, table_rows)
    assert set(np.unique(ds.natural_keys).tolist()) <= {0, 1, 2, 3}


def test_parquet_round_trip_with_chosen_feature_columns(tmp_path, table_rows):
    import pandas as pd

    pd.DataFrame(table_rows).to_parquet(tmp_path / "d.parquet")
    check_table_round_trip(load(tmp_path / "d.parquet", feature_columns=["f0", "f1"]), table_rows)


def test_save_to_disk_folder_with_train_and_test_splits_and_a_list_feature(tmp_path):
    import datasets

    def split(n, offset):
        return datasets.Dataset.from_dict(
            {"x": [[float(i), float(i) + 0.5] for i in range(offset, offset + n)], "label": [i % 3 for i in range(n)]}
        )

    datasets.DatasetDict({"train": split(30, 0), "test": split(9, 100)}).save_to_disk(str(tmp_path / "folder"))
    ds = load(tmp_path / "folder")
    assert_well_formed(ds)
    assert ds.x_train.shape == (30, 2) and ds.x_test.shape == (9, 2) and ds.num_classes == 3
    np.testing.assert_array_equal(ds.x_test[:, 0], np.arange(100, 109))


def test_single_dataset_folder_gets_a_seeded_split(tmp_path):
    import datasets

    datasets.Dataset.from_dict({"a": list(range(20)), "label": [i % 2 for i in range(20)]}).save_to_disk(
        str(tmp_path / "one")
    )
    ds = load(tmp_path / "one", test_fraction=0.5)
    assert ds.x_train.shape == (10, 1) and ds.x_test.shape == (10, 1)


def write_npz(tmp_path, name="d.npz", **arrays):
    np.savez(tmp_path / name, **arrays)
    return str(tmp_path / name)


def truncated_npz(tmp_path):
    path = write_npz(tmp_path, x=np.ones((100, 4)), y=np.zeros(100, dtype=np.int64))
    data = open(path, "rb").read()
    with open(path, "wb") as out:
        out.write(data[: len(data) // 2])
    return path


def npz_named_txt(tmp_path):
    with open(tmp_path / "d.txt", "wb") as out:
        np.savez(out, x=np.ones((3, 2)), y=np.zeros(3))
    return str(tmp_path / "d.txt")


def npz_with_a_corrupt_member(tmp_path):
    path = str(tmp_path / "bad.npz")
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY garbage")
        archive.writestr("y.npy", b"nope")
    return path


BAD_NPZ = {
    "missing file": (
        lambda tmp: str(tmp / "absent.npz"), r"^data\.path: file not found: .*absent\.npz; check the path$"
    ),
    "wrong extension": (npz_named_txt, r"^data\.path: unsupported file type '\.txt'"),
    "truncated": (truncated_npz, r"^data\.path: cannot read .*truncated or corrupt"),
    "corrupt member": (npz_with_a_corrupt_member, r"^data\.path: cannot read"),
    "no x": (lambda tmp: write_npz(tmp, features=np.ones((3, 2)), y=np.zeros(3)), r"^data\.path: .*no array 'x'"),
    "no y": (lambda tmp: write_npz(tmp, x=np.ones((3, 2))), r"^data\.path: .*no array 'y'"),
    "length mismatch": (
        lambda tmp: write_npz(tmp, x=np.ones((3, 2)), y=np.zeros(4)), r"^data\.path: x has 3 .* y has 4"
    ),
    "keys length mismatch": (
        lambda tmp: write_npz(tmp, x=np.ones((3, 2)), y=np.zeros(3), keys=np.zeros(2)), r"^data\.path: keys has 2"
    ),
    "infinite label": (lambda tmp: write_npz(tmp, x=np.ones((2, 2)), y=np.array([0.0, np.inf])),
                       r"^data\.path: labels must be non-negative integers \(found inf\)"),
    "negative label": (lambda tmp: write_npz(tmp, x=np.ones((3, 2)), y=np.array([0, -1, 1])),
                       r"^data\.path: labels must be non-negative integers \(found -1\)"),
    "fractional label": (lambda tmp: write_npz(tmp, x=np.ones((3, 2)), y=np.array([0.0, 0.5, 1.0])),
                         r"^data\.path: labels must be non-negative integers \(found 0\.5\)"),
    "empty": (lambda tmp: write_npz(tmp, x=np.ones((0, 2)), y=np.zeros(0)), r"^data\.path: the dataset is empty"),
    "nan feature": (lambda tmp: write_npz(tmp, x=np.array([[1.0], [np.nan], [2.0]]), y=np.zeros(3)),
                    r"^data\.path: features contain NaN or Inf .*row 1"),
    "inf feature": (
        lambda tmp: write_npz(tmp, x=np.array([[1.0], [np.inf]]), y=np.zeros(2)), r"^data\.path: .*NaN or Inf"
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_NPZ))
def test_bad_npz_input_raises_a_one_line_error_naming_the_field(tmp_path, case):
    make, message = BAD_NPZ[case]
    with pytest.raises(ScenarioError, match=message) as error:
        files.load_npz(make(tmp_path), test_path=None, test_fraction=0.2, seed=0)
    assert "\n" not in str(error.value)


def test_bad_test_file_names_the_test_path_field(tmp_path):
    train = write_npz(tmp_path, x=np.ones((4, 2)), y=np.zeros(4))
    with pytest.raises(ScenarioError, match=r"^data\.test_path: file not found"):
        files.load_npz(train, test_path=str(tmp_path / "absent.npz"), test_fraction=0.2, seed=0)
    test = write_npz(tmp_path, name="t.npz", x=np.ones((2, 3)), y=np.zeros(2))
    with pytest.raises(ScenarioError, match=r"^data\.test_path: test samples have shape"):
        files.load_npz(train, test_path=test, test_fraction=0.2, seed=0)


def test_unsupported_table_extension_names_the_field(tmp_path):
    (tmp_path / "d.xlsx").write_bytes(b"not really")
    with pytest.raises(ScenarioError, match=r"^data\.path: unsupported file type '\.xlsx'"):
        load(tmp_path / "d.xlsx")


def test_missing_label_column_names_the_field(tmp_path):
    (tmp_path / "d.csv").write_text("a,b,target\n1,2,0\n3,4,1\n")
    with pytest.raises(ScenarioError, match=r"^data\.label_column: no column 'label' .*columns: a, b, target"):
        load(tmp_path / "d.csv")


def test_table_errors_name_the_field(tmp_path):
    (tmp_path / "nan.csv").write_text("a,label\n1.0,0\n,1\n")
    with pytest.raises(ScenarioError, match=r"^data\.path: features contain NaN"):
        load(tmp_path / "nan.csv")
    (tmp_path / "neg.csv").write_text("a,label\n1.0,0\n2.0,-3\n")
    with pytest.raises(ScenarioError, match=r"^data\.label_column: labels must be non-negative integers \(found -3\)"):
        load(tmp_path / "neg.csv")
    (tmp_path / "text.csv").write_text("a,name,label\n1.0,x,0\n2.0,y,1\n")
    with pytest.raises(ScenarioError, match=r"^data\.feature_columns: column 'name' .* not numbers"):
        load(tmp_path / "text.csv")
    (tmp_path / "empty.csv").write_text("a,label\n")
    with pytest.raises(ScenarioError, match=r"^data\.path: .*empty"):
        load(tmp_path / "empty.csv")
    (tmp_path / "broken.parquet").write_bytes(b"PAR1 truncated")
    with pytest.raises(ScenarioError, match=r"^data\.path: cannot read .*broken\.parquet as parquet"):
        load(tmp_path / "broken.parquet")
    with pytest.raises(ScenarioError, match=r"^data\.path: file not found: .*absent\.csv; check the path$"):
        load(tmp_path / "absent.csv")
