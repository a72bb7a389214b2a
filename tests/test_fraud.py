"""The e-commerce fraud table (data/fraud.py): reading, checksums, IP → country, silos, split, and
that no test row reaches a training row's features.

Most tests use a hand-written 14-purchase table in the published csv layout (a test input for the
mechanics, not data for any result); the counts of the published table are checked when it is in
$FEDSHOP_DATA_DIR/ecommerce_fraud/ and skipped, saying so, when it is not (it is not in shared/data).
"""

import os
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fedshop.data import fraud
from fedshop.data.fraud import FraudSettings, build_fraud_dataset, load_fraud
from fedshop.errors import DataError

HEADER = ",".join(fraud.FRAUD_COLUMNS)
# Three countries' IP ranges with a gap (2000-2999) between the first two.
RANGES = """lower_bound_ip_address,upper_bound_ip_address,country
1000,1999,Atlantis
3000,3999,Borduria
4000,4999,Carpathia
"""
# user, signup, purchase, value, device, source, browser, sex, age, ip, class
PURCHASES = [
    (1, "2015-01-01 00:00:00", "2015-01-01 00:00:01", 30, "DEVA", "SEO", "Chrome", "M", 30, 1500.5, 1),
    (2, "2015-01-01 00:00:02", "2015-01-01 00:00:03", 30, "DEVA", "SEO", "Chrome", "M", 30, 1500.5, 1),
    (3, "2015-01-02 10:00:00", "2015-02-02 12:00:00", 45, "DEVB", "Ads", "Safari", "F", 41, 1200.0, 0),
    (4, "2015-01-03 10:00:00", "2015-03-01 09:00:00", 12, "DEVC", "Direct", "IE", "F", 25, 1999.0, 0),
    (5, "2015-01-04 10:00:00", "2015-03-05 09:00:00", 80, "DEVD", "Ads", "FireFox", "M", 52, 1000.0, 0),
    (6, "2015-02-01 10:00:00", "2015-06-01 09:00:00", 22, "DEVA", "SEO", "Chrome", "M", 30, 1500.5, 1),
    (7, "2015-02-02 10:00:00", "2015-06-02 09:00:00", 61, "DEVE", "SEO", "Opera", "F", 33, 1300.0, 0),
    (8, "2015-01-05 10:00:00", "2015-02-10 08:00:00", 19, "DEVF", "Ads", "Chrome", "M", 28, 3500.0, 0),
    (9, "2015-01-06 10:00:00", "2015-02-11 08:00:00", 27, "DEVG", "Ads", "Chrome", "F", 35, 3600.0, 1),
    (10, "2015-03-06 10:00:00", "2015-06-03 08:00:00", 33, "DEVG", "SEO", "IE", "F", 35, 3600.0, 0),
    (11, "2015-01-07 10:00:00", "2015-02-12 08:00:00", 50, "DEVH", "Direct", "Safari", "M", 60, 4500.0, 0),
    (12, "2015-03-07 10:00:00", "2015-06-04 08:00:00", 14, "DEVH", "Ads", "Safari", "M", 60, 4500.0, 1),
    (13, "2015-01-08 10:00:00", "2015-02-13 08:00:00", 70, "DEVI", "SEO", "Chrome", "F", 44, 2500.0, 0),
    (14, "2015-03-08 10:00:00", "2015-06-05 08:00:00", 9, "DEVI", "SEO", "Chrome", "F", 44, 2500.0, 1),
]  # fmt: skip
COUNTRIES = ["Atlantis"] * 7 + ["Borduria"] * 3 + ["Carpathia"] * 2 + [fraud.UNKNOWN] * 2
PARTIAL = dict(verify=False, require_complete=False)


def write_table(folder: Path, purchases=PURCHASES, header=HEADER, ranges=RANGES) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [header] + [",".join(str(v) for v in row) for row in purchases]
    (folder / fraud.FRAUD_CSV).write_text("\n".join(lines) + "\n")
    (folder / fraud.IP_CSV).write_text(ranges)
    return folder


@pytest.fixture
def data_root(tmp_path) -> Path:
    write_table(tmp_path / fraud.FOLDER)
    return tmp_path


def settings(**changes) -> FraudSettings:
    return FraudSettings(**{"verify": False, "require_complete": False, **changes})


def test_git_blob_id_is_what_git_prints():
    assert fraud.git_blob_sha1(b"hello\n") == "ce013625030ba8dba906f756967f9e9ca394464a"


def test_reads_the_csv_pair_and_maps_countries(data_root):
    table = load_fraud(data_root, **PARTIAL)
    frame = table.purchases
    assert len(frame) == 14 and table.counts["frauds"] == 6
    assert frame["country"].tolist() == COUNTRIES
    assert table.counts["unmapped_ips"] == 2 and table.counts["unmapped_frauds"] == 1
    assert table.counts["ip_ranges"] == 3 and table.counts["countries"] == 3
    assert frame["purchase_time"].dtype.kind == "M" and frame["class"].dtype == np.int8


def test_ip_lookup_bounds_and_gaps():
    ranges = fraud.parse_ranges(pd.read_csv(pd.io.common.StringIO(RANGES), dtype=str))
    ips = np.array([999, 1000, 1999, 1999.5, 2500, 3000, 4999, 5000])
    got = fraud.map_countries(ips, ranges).tolist()
    unknown = fraud.UNKNOWN
    assert got == [
        unknown,
        "Atlantis",
        "Atlantis",
        unknown,
        unknown,
        "Borduria",
        "Carpathia",
        unknown,
    ]


def test_the_kaggle_zip_reads_the_same(data_root, tmp_path):
    archive = tmp_path / "zipped" / fraud.FOLDER / fraud.KAGGLE_ZIP
    archive.parent.mkdir(parents=True)
    with zipfile.ZipFile(archive, "w") as out:
        for name in (fraud.FRAUD_CSV, fraud.IP_CSV):
            out.write(data_root / fraud.FOLDER / name, name)
    zipped = load_fraud(tmp_path / "zipped", **PARTIAL).purchases
    pd.testing.assert_frame_equal(zipped, load_fraud(data_root, **PARTIAL).purchases)


def test_checksum_and_completeness_are_checked(data_root):
    with pytest.raises(DataError, match="not the published file"):
        load_fraud(data_root, require_complete=False)
    with pytest.raises(DataError, match="151,112"):
        load_fraud(data_root, verify=False)


def test_clear_errors_for_missing_or_malformed_files(tmp_path, offline):
    with pytest.raises(DataError, match="FEDSHOP_DATA_DIR"):
        load_fraud(offline)
    with pytest.raises(
        DataError, match=r"could not download.*could not download.*kaggle\.com/datasets"
    ):
        load_fraud(offline, download=True)  # Kaggle, then the pinned mirror, both refused
    bad = write_table(tmp_path / "a" / fraud.FOLDER, header=HEADER.replace("device_id", "device"))
    with pytest.raises(DataError, match=r"missing columns \['device_id'\]"):
        load_fraud(bad.parent, **PARTIAL)
    labels = [(*row[:-1], 2) for row in PURCHASES]
    bad = write_table(tmp_path / "b" / fraud.FOLDER, purchases=labels)
    with pytest.raises(DataError, match="class must be 0 or 1"):
        load_fraud(bad.parent, **PARTIAL)
    bad = write_table(tmp_path / "c" / fraud.FOLDER, ranges=RANGES.replace("country", "land"))
    with pytest.raises(DataError, match=r"missing columns \['country'\]"):
        load_fraud(bad.parent, **PARTIAL)
    broken = tmp_path / "d" / fraud.FOLDER / fraud.KAGGLE_ZIP
    broken.parent.mkdir(parents=True)
    broken.write_bytes(b"not a zip")
    with pytest.raises(DataError, match="cannot read"):
        load_fraud(tmp_path / "d", **PARTIAL)


def test_silo_layout(data_root):
    names = lambda **kw: build_fraud_dataset(settings(**kw), data_root).silo_names  # noqa: E731
    assert names() == ["Atlantis", "Borduria", "Carpathia", fraud.UNKNOWN]
    assert names(countries=1) == ["Atlantis", fraud.OTHER, fraud.UNKNOWN]
    assert names(countries=1, rest="drop", unknown="drop") == ["Atlantis"]
    assert names(countries=1, unknown="other") == ["Atlantis", fraud.OTHER]
    dataset = build_fraud_dataset(settings(countries=1, split="time"), data_root)
    other = next(s for s in dataset.report["silos"] if s["silo"] == fraud.OTHER)
    assert other["countries"] == 2 and other["train_rows"] + other["test_rows"] == 5


def test_time_split_and_contract(data_root):
    dataset = build_fraud_dataset(settings(split="time", test_from="2015-05-01"), data_root)
    assert dataset.kind == "binary" and dataset.report["test_from"] == "2015-05-01"
    assert dataset.numeric_names == fraud.NUMERIC_NAMES and dataset.cardinalities == [4, 6, 3]
    cut = pd.Timestamp("2015-05-01").timestamp()
    for silo in dataset.silos:
        assert (silo.train.extra["purchase_time"] < cut).all()
        assert (silo.test.extra["purchase_time"] >= cut).all()
    sizes = {s["silo"]: (s["train_rows"], s["test_rows"]) for s in dataset.report["silos"]}
    assert sizes == {"Atlantis": (5, 2), "Borduria": (2, 1), "Carpathia": (1, 1), "Unknown": (1, 1)}
    default = build_fraud_dataset(
        settings(split="time"), data_root
    )  # the day by which 80 % had purchased
    assert default.report["test_from"] == "2015-06-02"


def test_device_and_ip_counts_look_only_at_earlier_rows(data_root):
    dataset = build_fraud_dataset(settings(split="time", test_from="2015-05-01"), data_root)
    atlantis = dataset.silos[0]
    device = fraud.NUMERIC_NAMES.index("log_device_seen")
    seen = lambda part: np.rint(np.expm1(part.numeric[:, device] * 3)).astype(int)  # noqa: E731
    order = np.argsort(atlantis.train.extra["user_id"])
    # DEVA bought as users 1 and 2 (training), then as user 6 (test): 0, 1 earlier, then 2.
    assert seen(atlantis.train)[order].tolist() == [0, 1, 0, 0, 0]
    assert dict(zip(atlantis.test.extra["user_id"], seen(atlantis.test), strict=True)) == {
        6: 2,
        7: 0,
    }


def test_no_test_row_reaches_training_features(data_root, tmp_path):
    """Changing or removing every test-period purchase leaves each silo's training rows as they were."""
    base = build_fraud_dataset(settings(split="time", test_from="2015-05-01"), data_root)
    late = [row[2] >= "2015-05-01" for row in PURCHASES]
    rewired = [
        (*row[:4], "DEVA", *row[5:9], 1500.5, 1 - row[10]) if is_late else row
        for row, is_late in zip(PURCHASES, late, strict=True)
    ]
    kept = [row for row, is_late in zip(PURCHASES, late, strict=True) if not is_late]
    for variant, rows in (("rewired", rewired), ("kept", kept)):
        other = write_table(tmp_path / variant / fraud.FOLDER, purchases=rows)
        changed = build_fraud_dataset(settings(split="time", test_from="2015-05-01"), other.parent)
        for silo in changed.silos:
            before = next(s for s in base.silos if s.name == silo.name)
            np.testing.assert_array_equal(silo.train.numeric, before.train.numeric)
            np.testing.assert_array_equal(silo.train.categorical, before.train.categorical)
            np.testing.assert_array_equal(silo.train.target, before.train.target)


def test_day_split_keeps_days_whole_and_the_same_for_every_silo(data_root):
    dataset = build_fraud_dataset(settings(split="days", test_fraction=0.5, seed=1), data_root)
    first = pd.Timestamp("2015-01-01").timestamp()
    for silo in dataset.silos:
        for part, odd in ((silo.train, 0), (silo.test, 1)):
            days = (part.extra["purchase_time"] - first) // 86_400
            assert (days % 2 == odd).all(), silo.name
    assert dataset.report["test_days"] == 7  # days 41, 43, 59, 63, 151, 153, 155 after Jan 1


def test_random_split_is_stratified_per_silo_and_seeded(data_root):
    one = build_fraud_dataset(settings(split="random", test_fraction=0.5, seed=3), data_root)
    two = build_fraud_dataset(settings(split="random", test_fraction=0.5, seed=3), data_root)
    atlantis = one.silos[0]  # 4 legitimate, 3 fraud: 2 and 2 (rounded half to even: 1.5 → 2)
    assert len(atlantis.test) == 4 and atlantis.test.target.sum() == 2
    for a, b in zip(one.silos, two.silos, strict=True):
        np.testing.assert_array_equal(a.test.extra["user_id"], b.test.extra["user_id"])


@pytest.fixture(scope="module")
def published() -> Path:
    """The published table, when $FEDSHOP_DATA_DIR holds it (shared/data does not yet)."""
    base = Path(os.environ.get("FEDSHOP_DATA_DIR") or ".")
    if fraud.find_source(base) in (None, fraud.embedded_path()):
        pytest.skip(f"the e-commerce fraud table is not in $FEDSHOP_DATA_DIR/{fraud.FOLDER}/")
    return base


def test_published_table_counts(published):
    table = load_fraud(published)  # verifies the git blob ids (or the pinned sha256) and the counts
    counts = table.counts
    assert (counts["rows"], counts["frauds"]) == (151_112, 14_151)
    if "ip_ranges" in counts:
        assert counts["ip_ranges"] == fraud.PUBLISHED["ip_ranges"]
    assert 0.75 < 1 - counts["unmapped_ips"] / counts["rows"] < 0.9  # about 85 % of IPs map
    dataset = build_fraud_dataset(table=table)
    assert sum(len(s.train) + len(s.test) for s in dataset.silos) == 151_112
