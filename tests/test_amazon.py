"""Amazon 2014 5-core: sequential and raw-review files, the leave-one-out split, random shards."""

import gzip

import numpy as np
import pandas as pd
import pytest

from fedshop.config import DataConfig, load_config
from fedshop.data import amazon
from fedshop.data.datasets import load_dataset
from fedshop.data.split import leave_last_out
from fedshop.errors import ConfigError, DataError

TOYS_USERS = 19_412
TOYS_ITEMS = 11_924
TOYS_INTERACTIONS = 167_597


@pytest.fixture(scope="session")
def toys(data_dir):
    return load_dataset(DataConfig(dataset="amazon-toys", data_dir=str(data_dir)), seed=3)


@pytest.fixture(scope="session")
def toys_lines(data_dir):
    text = (data_dir / "amazon-2014-5core" / "Toys_and_Games.txt").read_text()
    return [line.split() for line in text.splitlines() if line.strip()]


def test_official_counts(toys):
    assert toys.report["cleaning"] == {
        "users": TOYS_USERS,
        "items": TOYS_ITEMS,
        "interactions": TOYS_INTERACTIONS,
    }
    assert toys.report["file_format"] == "sequential"
    assert toys.n_users == TOYS_USERS
    split = toys.report["split"]
    assert split["users_too_little_history"] == 0  # 5-core: everyone has at least five items
    removed = split["test_items_unseen_in_training_removed"]
    assert split["train_pairs"] + split["test_pairs"] + removed == TOYS_INTERACTIONS
    assert split["test_users"] + split["test_users_empty_basket"] == TOYS_USERS
    assert toys.report["catalogue_items"] == toys.n_items <= TOYS_ITEMS


def test_last_item_of_each_line_is_the_test_item(toys, toys_lines):
    assert list(toys.user_ids) == [tokens[0] for tokens in toys_lines]
    catalogue = set(toys.item_ids.tolist())
    for index, (_, *items) in enumerate(toys_lines):
        row = toys.test[index]
        if row.nnz:
            assert toys.item_ids[row.indices].tolist() == [items[-1]]
        else:  # dropped only when nobody has the item in training
            assert items[-1] not in catalogue
        assert sorted(toys.item_ids[toys.train[index].indices]) == sorted(items[:-1])
    assert toys.test.multiply(toys.train).nnz == 0


def test_random_shards_are_even_and_seeded(toys, data_dir):
    assert toys.silo_names == tuple(f"shard {k}" for k in range(1, 11))
    sizes = np.bincount(toys.user_silo, minlength=10)
    assert sizes.sum() == TOYS_USERS and sizes.max() - sizes.min() <= 1
    assert [s["customers"] for s in toys.report["silos"]] == sizes.tolist()
    _, same = amazon.random_shards(TOYS_USERS, 10, seed=11)
    assert (amazon.random_shards(TOYS_USERS, 10, seed=11)[1] == same).all()
    assert (amazon.random_shards(TOYS_USERS, 10, seed=12)[1] != same).mean() > 0.8
    three = load_dataset(DataConfig(dataset="amazon-toys", data_dir=str(data_dir), silos=3))
    assert three.silo_names == ("shard 1", "shard 2", "shard 3")


# --- small files -----------------------------------------------------------------------------

SEQUENTIAL = """alice sku-1 sku-2 sku-3

bob   sku-2\tsku-3 sku-1 sku-4
carol sku-3 sku-4 sku-2
dave sku-9
"""


def heldout(dataset, user, matrix="test"):
    index = list(dataset.user_ids).index(user)
    row = getattr(dataset, matrix)[index]
    return sorted(dataset.item_ids[row.indices].tolist())


def load_sequential(path, **overrides):
    settings = {"silos": 2, **overrides}
    return load_dataset(DataConfig(dataset="amazon-sequential", path=str(path), **settings))


def test_sequential_file_with_text_ids(tmp_path):
    path = tmp_path / "shop.txt"
    path.write_text(SEQUENTIAL)
    dataset = load_sequential(path)
    assert list(dataset.user_ids) == ["alice", "bob", "carol", "dave"]
    assert heldout(dataset, "alice") == ["sku-3"]
    assert heldout(dataset, "bob") == ["sku-4"]
    assert heldout(dataset, "carol") == ["sku-2"]
    assert heldout(dataset, "dave") == []  # one item: kept for training, not evaluated
    assert heldout(dataset, "dave", "train") == ["sku-9"]
    split = dataset.report["split"]
    assert split["users_too_little_history"] == 1
    assert split["test_users"] == 3
    assert dataset.n_silos == 2
    assert dataset.report["source"] == f"file {path}"

    with_validation = load_sequential(path, validation=True)
    assert heldout(with_validation, "bob", "validation") == ["sku-1"]
    assert heldout(with_validation, "bob", "train") == ["sku-2", "sku-3"]
    # carol's validation item sku-4 is now nobody's training item; alice's sku-2 still is.
    assert heldout(with_validation, "alice", "validation") == ["sku-2"]
    assert with_validation.report["split"]["users_too_little_history"] == 1


REVIEWS = [
    # Out of time order on purpose; equal times keep file order.
    "{'reviewerID': 'alice', 'asin': 'sku-2', 'unixReviewTime': 1300000100, 'helpful': [0, 0]}",
    '{"reviewerID": "bob", "asin": "sku-3", "unixReviewTime": 1300000200, "overall": 5.0}',
    '{"reviewerID": "alice", "asin": "sku-1", "unixReviewTime": 1300000000}',
    "",
    "{'reviewerID': 'bob', 'asin': 'sku-2', 'unixReviewTime': 1300000100, 'summary': \"It's fine\"}",
    '{"reviewerID": "alice", "asin": "sku-3", "unixReviewTime": 1300000300}',
    '{"reviewerID": "bob", "asin": "sku-1", "unixReviewTime": 1300000200}',
    '{"reviewerID": "carol", "asin": "sku-4", "unixReviewTime": 1300000000}',
    "{'reviewerID': 'bob', 'asin': 'sku-4', 'unixReviewTime': 1300000900}",
    '{"reviewerID": "carol", "asin": "sku-2", "unixReviewTime": 1300000500}',
    '{"reviewerID": "carol", "asin": "sku-3", "unixReviewTime": 1299999999}',
    '{"reviewerID": "dave", "asin": "sku-9", "unixReviewTime": 1300000000}',
]


def test_raw_reviews_give_the_same_sequences_as_the_sequential_file(tmp_path):
    sequential = tmp_path / "shop.txt"
    sequential.write_text(SEQUENTIAL)
    plain = tmp_path / "reviews_Shop_5.json"
    plain.write_text("\n".join(REVIEWS) + "\n")
    compressed = tmp_path / "reviews_Shop_5.json.gz"
    compressed.write_bytes(gzip.compress(plain.read_bytes()))

    expected = amazon.read_sequences(sequential)
    for path in (plain, compressed):
        got = amazon.read_sequences(path)
        assert got.file_format == "reviews"
        assert got.time_range == (1299999999, 1300000900)
        pd.testing.assert_frame_equal(got.events, expected.events)

    from_text = load_sequential(sequential)
    from_reviews = load_sequential(compressed)
    assert list(from_reviews.user_ids) == list(from_text.user_ids)
    assert list(from_reviews.item_ids) == list(from_text.item_ids)
    assert (from_reviews.train != from_text.train).nnz == 0
    assert (from_reviews.test != from_text.test).nnz == 0
    assert from_reviews.report["date_range"][0].startswith("2011-03-13")


def test_format_is_told_by_content_not_by_name(tmp_path):
    disguised = tmp_path / "shop.json.gz"  # a plain sequential file with a misleading name
    disguised.write_text(SEQUENTIAL)
    assert amazon.read_sequences(disguised).file_format == "sequential"
    gzipped_text = tmp_path / "shop.txt"
    gzipped_text.write_bytes(gzip.compress(SEQUENTIAL.encode()))
    assert amazon.read_sequences(gzipped_text).file_format == "sequential"


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("alice sku-1 sku-2\n\nbob\n", r"line 3: user 'bob' has no items"),
        ("\n  \n", r"is empty"),
        ("", r"is empty"),
        ("alice sku-1\nalice sku-2\n", r"line 2: user 'alice' already has a sequence on line 1"),
        ("user,item,rating\n1,2,5\n", r"line 1: user 'user,item,rating' has no items"),
        (REVIEWS[2] + "\n" + '{"reviewerID": "bob", "unixReviewTime": 1}\n', r"line 2.*no asin"),
        (REVIEWS[2] + "\nnot a review\n", r"line 2: not a review record"),
        (REVIEWS[2] + "\n[1, 2]\n", r"line 2: not a review record"),
        ('{"reviewerID": "a", "asin": "b", "unixReviewTime": "soon"}', r"line 1: unixReviewTime"),
    ],
)
def test_malformed_files_are_data_errors(tmp_path, content, message):
    path = tmp_path / "shop.txt"
    path.write_text(content)
    with pytest.raises(DataError, match=message):
        load_sequential(path)


def test_binary_and_truncated_files_are_data_errors(tmp_path):
    truncated = tmp_path / "reviews_Shop_5.json.gz"
    truncated.write_bytes(gzip.compress(("\n".join(REVIEWS) * 50).encode())[:200])
    with pytest.raises(DataError, match="could not read"):
        load_sequential(truncated)
    binary = tmp_path / "shop.bin"
    binary.write_bytes(bytes(range(128, 256)) * 4)
    with pytest.raises(DataError, match="could not read"):
        load_sequential(binary)


def test_missing_files_and_impossible_sources(tmp_path, monkeypatch):
    with pytest.raises(DataError, match="not found"):
        load_sequential(tmp_path / "absent.txt")
    with pytest.raises(ConfigError, match=r"amazon-sequential.*needs.*path"):
        load_config(overrides={"data.dataset": "amazon-sequential"})
    with pytest.raises(DataError, match=r"needs data\.path"):
        load_dataset(DataConfig(dataset="amazon-sequential"))  # built without validation
    with pytest.raises(DataError, match="no embedded copy"):
        load_dataset(DataConfig(dataset="amazon-toys", source="embedded"))
    with pytest.raises(DataError, match="no official download"):
        load_dataset(DataConfig(dataset="amazon-sequential", path="x.txt", source="download"))
    with pytest.raises(ConfigError, match="silos must be at least 1"):
        load_config(overrides={"data.silos": 0})
    path = tmp_path / "shop.txt"
    path.write_text(SEQUENTIAL)
    with pytest.raises(DataError, match=r"data\.silos = 5 is more than the 4 users"):
        load_sequential(path, silos=5)


def test_download_impossible_is_a_clear_error(offline):
    empty = offline
    expected = r"could not download .*reviews_Sports_and_Outdoors_5\.json\.gz"
    with pytest.raises(DataError, match=expected):
        load_dataset(DataConfig(dataset="amazon-sports", data_dir=str(empty)))
    with pytest.raises(DataError, match=r"could not download .*reviews_Beauty_5\.json\.gz"):
        load_dataset(DataConfig(dataset="amazon-beauty", source="download"))


# --- the shared leave-one-out split ------------------------------------------------------------


def pairs(frame):
    return set(map(tuple, frame[["user", "item"]].to_numpy().tolist()))


def test_leave_last_out_rules():
    events = pd.DataFrame(
        [
            (0, 10, 1),
            (0, 12, 3),  # user 0's last
            (0, 11, 2),
            (1, 10, 5),
            (1, 11, 5),  # tie with the row before: the later row is the later interaction
            (2, 13, 1),  # one interaction only: training only
            (3, 11, 1),
            (3, 11, 2),  # repeat of a training item: removed
            (4, 10, 1),
            (4, 14, 2),  # 14 is nobody's training item: removed
            (5, 12, 1),
            (5, 10, 2),
        ],
        columns=["user", "item", "order"],
    )
    split = leave_last_out(events)
    assert pairs(split.test) == {(0, 12), (1, 11), (5, 10)}
    assert pairs(split.train) == {(0, 10), (0, 11), (1, 10), (2, 13), (3, 11), (4, 10), (5, 12)}
    assert split.counts["users"] == 6
    assert split.counts["users_too_little_history"] == 1
    assert split.counts["test_repeat_items_removed"] == 1
    assert split.counts["test_items_unseen_in_training_removed"] == 1
    assert split.counts["test_users_empty_basket"] == 2
    assert split.counts["test_users"] == 3
    assert split.validation is None

    with_validation = leave_last_out(events, validation=True)
    assert pairs(with_validation.validation) == {(0, 11)}
    assert pairs(with_validation.test) == {(0, 12)}
    assert with_validation.counts["users_too_little_history"] == 5  # users 1 to 5: two or fewer
