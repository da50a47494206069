"""Tests for camjobs.layouts: one reader test per public layout, the real ISIC 2017 sample, bad inputs."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.fs as pafs
import pytest
from layout_fixtures import (
    ISIC_ARCHIVE_HEADER,
    isic_id,
    make_folder,
    make_ham10000,
    make_isic2017,
    make_isic2018,
    make_isic2019,
    make_isic2020,
    make_isic_archive,
    write_csv,
    write_image,
)

from camjobs import layouts
from camjobs.layouts import LAYOUTS, DatasetListing, LayoutError, detect_layout, list_images

ISIC2017_SAMPLE = Path(__file__).resolve().parents[1].parent / "shared/data/isic2017-sample"


def by_id(listing: DatasetListing) -> dict:
    return {r.image_id: r for r in listing.records}


def errors(listing: DatasetListing) -> dict[str, str]:
    return {r.image_id: r.error_type for r in listing.records if r.error_type}


def assert_matches_fixture(listing: DatasetListing, info) -> None:
    """The listing holds exactly the fixture's images, with their labels, paths and masks, no errors."""
    assert listing.layout == info.layout
    assert listing.classes == info.classes
    assert [r.image_id for r in listing.records] == info.image_ids  # sorted, one per image
    for record in listing.records:
        assert record.error_type is None and record.error_message is None, record
        assert record.label == info.labels[record.image_id]
        assert record.source_path == str(info.paths[record.image_id])
        assert os.path.isabs(record.source_path)
        mask = info.masks.get(record.image_id)
        assert record.mask_path == (str(mask) if mask else None)
    listed = {r.source_path for r in listing.records}
    assert not listed & {str(p) for p in info.decoys}


# --------------------------------------------------------------------------- one test per layout
def test_layout_names():
    assert LAYOUTS == ("ham10000", "isic2017", "isic2018", "isic2019", "isic2020", "isic-archive", "folder")
    assert issubclass(LayoutError, ValueError)


def test_group_sources_live_in_the_layout_specs():
    """Where training reads each layout's lesion (patient for ISIC 2020) ids: the first CSV that exists."""
    sources = {name: layouts.group_source(name) for name in LAYOUTS}
    assert sources["isic2017"] is None and sources["folder"] is None and layouts.group_source("auto") is None
    assert sources["ham10000"] == layouts.GroupSource(("HAM10000_metadata.csv",), "image_id", "lesion_id")
    groupings = "ISIC2018_Task3_Training_LesionGroupings.csv"
    assert sources["isic2018"] == layouts.GroupSource((groupings,), "image", "lesion_id")
    assert sources["isic2019"] == layouts.GroupSource(("ISIC_2019_Training_Metadata.csv",), "image", "lesion_id")
    assert sources["isic2020"] == layouts.GroupSource(
        ("ISIC_2020_Training_GroundTruth_v2.csv", "ISIC_2020_Training_GroundTruth.csv"), "image_name", "patient_id"
    )
    assert sources["isic-archive"] == layouts.GroupSource(
        ("metadata.csv",), "isic_id", "lesion_id", fallback_columns=("patient_id",), image_depth=0
    )


def test_ham10000(tmp_path):
    info = make_ham10000(tmp_path, n=9, n_masks=3, dataset_column=True)
    assert detect_layout(str(tmp_path)) == "ham10000"
    listing = list_images(str(tmp_path))
    assert listing.root == str(tmp_path)
    assert len(listing.records) == 9
    assert_matches_fixture(listing, info)
    # images come from both parts; labels cover the whole vocabulary
    assert {Path(r.source_path).parent.name for r in listing.records} == {
        "HAM10000_images_part_1",
        "HAM10000_images_part_2",
    }
    assert Counter(r.label for r in listing.records)["akiec"] == 2
    assert sum(r.mask_path is not None for r in listing.records) == 3


def test_ham10000_alternative_part_dir_names(tmp_path):
    info = make_ham10000(tmp_path, n=4, n_masks=0, part_dirs=("HAM10000_images_part1", "HAM10000_images_part2"))
    assert_matches_fixture(list_images(str(tmp_path)), info)


def test_isic2017_all_splits(tmp_path):
    train = make_isic2017(tmp_path, n=6, split="Training", n_masks=4)
    val = make_isic2017(tmp_path, n=3, split="Validation", start=100)
    test = make_isic2017(tmp_path, n=3, split="Test_v2", start=200, n_masks=0)
    assert detect_layout(str(tmp_path)) == "isic2017"
    listing = list_images(str(tmp_path))
    assert len(listing.records) == 12  # the 12 _superpixels.png decoys are not records
    info = train
    for other in (val, test):
        info.labels |= other.labels
        info.paths |= other.paths
        info.masks |= other.masks
        info.decoys += other.decoys
    assert_matches_fixture(listing, info)
    assert Counter(r.label for r in listing.records) == {"melanoma": 4, "seborrheic_keratosis": 4, "nevus": 4}
    assert sum(r.mask_path is not None for r in listing.records) == 4 + 3 + 0


def test_isic2018(tmp_path):
    info = make_isic2018(tmp_path, n=7, n_masks=2)
    assert detect_layout(str(tmp_path)) == "isic2018"
    listing = list_images(str(tmp_path))
    assert_matches_fixture(listing, info)
    assert [r.label for r in listing.records] == ["MEL", "NV", "BCC", "AKIEC", "BKL", "DF", "VASC"]


def test_isic2018_ground_truth_inside_its_folder(tmp_path):
    info = make_isic2018(tmp_path, n=3, gt_in_folder=True)
    assert (tmp_path / "ISIC2018_Task3_Training_GroundTruth" / "ISIC2018_Task3_Training_GroundTruth.csv").is_file()
    assert_matches_fixture(list_images(str(tmp_path)), info)


def test_isic2019_downsampled_ids(tmp_path):
    info = make_isic2019(tmp_path, n=9)
    assert detect_layout(str(tmp_path)) == "isic2019"
    listing = list_images(str(tmp_path))
    assert_matches_fixture(listing, info)
    assert by_id(listing)["ISIC_0000000_downsampled"].label == "MEL"
    assert by_id(listing)["ISIC_0000008"].label == "UNK"
    assert listing.classes == ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


@pytest.mark.parametrize("v2", [False, True])
def test_isic2020(tmp_path, v2):
    info = make_isic2020(tmp_path, n=6, v2=v2)
    assert detect_layout(str(tmp_path)) == "isic2020"
    listing = list_images(str(tmp_path))
    assert_matches_fixture(listing, info)
    assert Counter(r.label for r in listing.records) == {"benign": 4, "malignant": 2}


def test_folder_names_spaces_unicode_and_case(tmp_path):
    info = make_folder(tmp_path)
    assert detect_layout(str(tmp_path)) == "folder"
    listing = list_images(str(tmp_path))
    assert_matches_fixture(listing, info)
    assert [r.image_id for r in listing.records] == [
        "a",
        "b",
        "c",
        "sub dir/deeper/x",
        "sub dir/Ünïcode name",
        "z/ISIC_0024306",
    ]
    assert listing.classes == []


def test_explicit_layout_and_wrapping_folder(tmp_path):
    info = make_ham10000(tmp_path / "skin-cancer-mnist-ham10000", n=3, n_masks=1)
    assert detect_layout(str(tmp_path)) == "ham10000"
    listing = list_images(str(tmp_path), "ham10000")
    assert listing.root == str(tmp_path)
    assert_matches_fixture(listing, info)
    # forcing "folder" on the same tree lists every image file with a relative id, no labels
    as_folder = list_images(str(tmp_path), "folder")
    assert len(as_folder.records) == 3 + 1  # three images and one mask
    assert all(r.label is None for r in as_folder.records)


def test_relative_path_and_file_uri(tmp_path, monkeypatch):
    info = make_isic2020(tmp_path / "data", n=2)
    monkeypatch.chdir(tmp_path)
    assert_matches_fixture(list_images("data"), info)
    assert_matches_fixture(list_images(f"file://{tmp_path}/data"), info)


@pytest.fixture
def fake_s3(tmp_path, monkeypatch):
    """Serve tmp_path/<bucket>/... as s3://<bucket>/... through a non-local pyarrow file system."""

    def from_uri(uri):
        assert uri.startswith("s3://"), uri
        return pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem()), uri[len("s3://") :]

    monkeypatch.setattr(layouts, "open_filesystem", from_uri)
    return tmp_path


def test_remote_filesystem_paths_keep_the_scheme(fake_s3):
    make_isic2017(fake_s3 / "bucket" / "isic", n=3, n_masks=1)
    listing = list_images("s3://bucket/isic")
    assert listing.layout == "isic2017" and listing.root == "s3://bucket/isic"
    assert [(r.image_id, r.source_path, r.label) for r in listing.records] == [
        ("ISIC_0000000", "s3://bucket/isic/ISIC-2017_Training_Data/ISIC_0000000.jpg", "melanoma"),
        ("ISIC_0000001", "s3://bucket/isic/ISIC-2017_Training_Data/ISIC_0000001.jpg", "seborrheic_keratosis"),
        ("ISIC_0000002", "s3://bucket/isic/ISIC-2017_Training_Data/ISIC_0000002.jpg", "nevus"),
    ]
    assert [r.mask_path for r in listing.records] == [
        "s3://bucket/isic/ISIC-2017_Training_Part1_GroundTruth/ISIC_0000000_segmentation.png",
        None,
        None,
    ]

    make_folder(fake_s3 / "bucket" / "plain")
    folder = list_images("s3://bucket/plain")
    assert folder.layout == "folder"
    assert [r.image_id for r in folder.records] == [
        "a",
        "b",
        "c",
        "sub dir/deeper/x",
        "sub dir/Ünïcode name",
        "z/ISIC_0024306",
    ]
    assert by_id(folder)["sub dir/Ünïcode name"].source_path == "s3://bucket/plain/sub dir/Ünïcode name.jpg"


def test_does_not_import_ray_or_torch():
    code = "import sys, camjobs.layouts; assert not {'ray', 'torch'} & set(sys.modules), sorted(sys.modules)"
    subprocess.run([sys.executable, "-c", code], check=True)


# --------------------------------------------------------------------------- an ISIC Archive download
def metadata_rows(root: Path) -> list[dict]:
    """metadata.csv as the csv module reads it: the oracle for labels and classes."""
    with open(root / "metadata.csv", newline="", encoding="utf8") as f:
        return list(csv.DictReader(f))


def test_isic_archive_download(isic2017_mini, tmp_path):
    """isic-cli's layout is found as such (also inside a wrapping folder); its labels are diagnosis_3's,
    an empty cell is no label; metadata.csv, attribution.txt, licenses/ and partial downloads are no images."""
    info = make_isic_archive(tmp_path / "download", isic2017_mini, copies=2)
    for root in (info.root, tmp_path):
        assert detect_layout(str(root)) == "isic-archive"
        listing = list_images(str(root))
        assert_matches_fixture(listing, info)
    assert listing.classes == ["Melanoma Invasive", "Nevus", "Seborrheic keratosis"]
    assert by_id(listing)["ISIC_1099999"].label is None and len(listing.records) == 13
    assert_matches_fixture(list_images(str(info.root), "isic-archive", label_column="diagnosis_3"), info)


@pytest.mark.parametrize("column", ["diagnosis_1", "diagnosis_2", "diagnosis_3", "benign_malignant", "sex"])
def test_isic_archive_labels_from_the_chosen_column(isic2017_mini, tmp_path, column):
    make_isic_archive(tmp_path, isic2017_mini)
    expected = {row["isic_id"]: row[column] or None for row in metadata_rows(tmp_path)}
    listing = list_images(str(tmp_path), label_column=column)
    assert {r.image_id: r.label for r in listing.records} == expected
    assert listing.classes == sorted({label for label in expected.values() if label})
    assert errors(listing) == {}


def test_isic_archive_label_column_mistakes_are_usage_errors(isic2017_mini, tmp_path):
    make_isic_archive(tmp_path / "archive", isic2017_mini)
    with pytest.raises(LayoutError, match="--label-column 'diagnosis'") as excinfo:
        list_images(str(tmp_path / "archive"), label_column="diagnosis")
    assert excinfo.value.exit_code == 2
    assert str(excinfo.value).endswith(f"its columns: {', '.join(ISIC_ARCHIVE_HEADER[1:])}")
    make_isic2020(tmp_path / "2020", n=2)
    with pytest.raises(LayoutError, match="--label-column is for the isic-archive layout; isic2020"):
        list_images(str(tmp_path / "2020"), label_column="benign_malignant")
    with pytest.raises(LayoutError, match="--label-column is for the isic-archive layout; folder"):
        list_images(str(isic2017_mini / "ISIC-2017_Training_Data"), label_column="diagnosis_3")


def test_isic_archive_without_the_default_column_warns_and_lists_unlabelled(isic2017_mini, tmp_path, caplog):
    make_isic_archive(tmp_path, isic2017_mini)
    rows = metadata_rows(tmp_path)
    header = [c for c in rows[0] if c != "diagnosis_3"]
    write_csv(tmp_path / "metadata.csv", header, [[row[c] for c in header] for row in rows])
    with caplog.at_level("WARNING", logger="camjobs.layouts"):
        listing = list_images(str(tmp_path))
    assert listing.layout == "isic-archive" and len(listing.records) == len(rows)
    assert all(r.label is None for r in listing.records) and listing.classes == []
    assert "'diagnosis_3'" in caplog.text and "--label-column" in caplog.text and "diagnosis_1" in caplog.text


def test_isic_archive_detection_steals_nothing(isic2017_mini, tmp_path):
    """Only a metadata.csv with an isic_id column beside ISIC_*.jpg files is an Archive download."""
    plain = make_folder(tmp_path / "plain")
    write_csv(plain.root / "metadata.csv", ["isic_id", "diagnosis_3"], [["ISIC_0024306", "Nevus"]])
    assert detect_layout(str(plain.root)) == "folder"  # ISIC_0024306.png is not beside it, but in z/
    beside = tmp_path / "beside"
    write_image(beside / "ISIC_0000001.jpg")
    write_csv(beside / "metadata.csv", ["image", "diagnosis"], [["ISIC_0000001", "nevus"]])
    assert detect_layout(str(beside)) == "folder"  # no isic_id column
    ham = make_ham10000(tmp_path / "ham", n=2)
    write_csv(ham.root / "metadata.csv", ["isic_id"], [["ISIC_0024306"]])
    write_image(ham.root / "ISIC_0024306.jpg")
    with pytest.raises(LayoutError, match="several layouts"):  # both: never silently one of them
        detect_layout(str(ham.root))
    with pytest.raises(LayoutError, match="none of the expected files/folders: metadata.csv$"):
        list_images(str(tmp_path / "plain" / "sub dir"), "isic-archive")


def test_isic_archive_missing_image_and_remote_paths(isic2017_mini, fake_s3):
    info = make_isic_archive(fake_s3 / "bucket" / "isic", isic2017_mini)
    info.paths["ISIC_1001000"].unlink()
    listing = list_images("s3://bucket/isic")
    assert listing.layout == "isic-archive"
    assert errors(listing) == {"ISIC_1001000": "missing_file"}
    assert by_id(listing)["ISIC_1001000"].source_path == "s3://bucket/isic/ISIC_1001000.jpg"
    assert by_id(listing)["ISIC_1001000"].label == "Melanoma Invasive"
    assert by_id(listing)["ISIC_1000000"].source_path == "s3://bucket/isic/ISIC_1000000.jpg"


# --------------------------------------------------------------------------- the real ISIC 2017 sample
def test_isic2017_real_sample():
    if not ISIC2017_SAMPLE.is_dir():
        pytest.skip(f"{ISIC2017_SAMPLE} not present")
    with open(ISIC2017_SAMPLE / "ISIC-2017_Training_Part3_GroundTruth.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    expected = {}
    for row in rows:
        mel, sk = float(row["melanoma"]), float(row["seborrheic_keratosis"])
        expected[row["image_id"]] = "melanoma" if mel else "seborrheic_keratosis" if sk else "nevus"
    assert Counter(expected.values()) == {"nevus": 83, "seborrheic_keratosis": 40, "melanoma": 27}

    assert detect_layout(str(ISIC2017_SAMPLE)) == "isic2017"
    listing = list_images(str(ISIC2017_SAMPLE))
    assert listing.layout == "isic2017"
    assert len(listing.records) == 150
    assert {r.image_id: r.label for r in listing.records} == expected
    for record in listing.records:
        assert record.error_type is None
        assert Path(record.source_path).is_file()
        assert record.source_path.endswith(f"ISIC-2017_Training_Data/{record.image_id}.jpg")
        assert record.mask_path and Path(record.mask_path).is_file()
        assert Path(record.mask_path).name == f"{record.image_id}_segmentation.png"


# --------------------------------------------------------------------------- bad inputs
def test_missing_file_named_by_metadata(tmp_path):
    info = make_ham10000(tmp_path, n=4)
    info.paths["ISIC_0024307"].unlink()
    listing = list_images(str(tmp_path))
    assert len(listing.records) == 4
    record = by_id(listing)["ISIC_0024307"]
    assert record.error_type == "missing_file"
    assert record.label == info.labels["ISIC_0024307"]
    assert "HAM10000_images_part_1/ISIC_0024307.jpg" in record.error_message
    assert "HAM10000_images_part_2/ISIC_0024307.jpg" in record.error_message
    assert errors(listing) == {"ISIC_0024307": "missing_file"}


@pytest.mark.parametrize(
    "bad_id", ["..", "../outside", "../../etc/passwd", "/etc/passwd", "sub/../x", "a\\b", "a\0b", "C:\\x"]
)
def test_metadata_ids_escaping_the_root_are_invalid(tmp_path, bad_id):
    make_isic2018(tmp_path, n=2, n_masks=0)
    write_image(tmp_path / "outside.jpg")  # would be found if ../outside were resolved
    gt = tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv"
    with open(gt, "a", newline="") as f:
        csv.writer(f).writerow([bad_id, 1, 0, 0, 0, 0, 0, 0])
    listing = list_images(str(tmp_path))
    assert len(listing.records) == 3
    record = by_id(listing)[bad_id]
    assert record.error_type == "invalid_path"
    assert record.source_path == ""
    assert record.label == "MEL"
    assert errors(listing) == {bad_id: "invalid_path"}


def test_empty_metadata_id_is_invalid_not_dropped(tmp_path):
    make_isic2020(tmp_path, n=2)
    with open(tmp_path / "ISIC_2020_Training_GroundTruth.csv", "a", newline="") as f:
        csv.writer(f).writerow(["", "IP_1", "male", 40, "torso", "nevus", "benign", 0])
    listing = list_images(str(tmp_path))
    assert len(listing.records) == 3
    assert list(errors(listing).values()) == ["invalid_path"]


def test_symlink_outside_root(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    info = make_isic2019(root, n=3)
    target = write_image(outside / "secret.jpg")
    info.paths["ISIC_0000001"].unlink()
    info.paths["ISIC_0000001"].symlink_to(target)

    listing = list_images(str(root))
    assert len(listing.records) == 3
    record = by_id(listing)["ISIC_0000001"]
    assert record.error_type == "invalid_path"
    assert "symlink outside the dataset root; use --follow-symlinks to allow" in record.error_message
    assert errors(listing) == {"ISIC_0000001": "invalid_path"}

    allowed = list_images(str(root), follow_symlinks=True)
    assert errors(allowed) == {}
    assert by_id(allowed)["ISIC_0000001"].label == "NV"


def test_symlinks_inside_root_are_fine_and_folder_links_are_checked(tmp_path):
    root, outside = tmp_path / "data", tmp_path / "elsewhere"
    write_image(root / "real" / "a.jpg")
    (root / "alias.jpg").symlink_to(root / "real" / "a.jpg")  # file link inside the root: allowed
    (root / "loop").symlink_to(root)  # a folder loop must not multiply the listing
    (root / "alias_dir").symlink_to(root / "real")  # an aliased folder is listed once, by its real name
    write_image(outside / "x.jpg")
    (root / "linked").symlink_to(outside)  # a folder outside the root
    listing = list_images(str(root))
    assert sorted(by_id(listing)) == ["alias", "linked/x", "real/a"]
    assert errors(listing) == {"linked/x": "invalid_path"}
    assert errors(list_images(str(root), follow_symlinks=True)) == {}


def test_duplicate_ids_across_ham_parts(tmp_path):
    info = make_ham10000(tmp_path, n=4)
    copy = tmp_path / "HAM10000_images_part_2" / "ISIC_0024306.jpg"
    assert info.paths["ISIC_0024306"].parent.name == "HAM10000_images_part_1"
    copy.write_bytes(info.paths["ISIC_0024306"].read_bytes())
    listing = list_images(str(tmp_path))
    assert len(listing.records) == 5
    ids = [r.image_id for r in listing.records]
    assert len(set(ids)) == len(ids)
    first, second = by_id(listing)["ISIC_0024306"], by_id(listing)["ISIC_0024306#2"]
    assert first.error_type is None and first.source_path == str(info.paths["ISIC_0024306"])
    assert second.error_type == "duplicate_id" and second.source_path == str(copy)
    assert second.label == first.label == "akiec"
    assert errors(listing) == {"ISIC_0024306#2": "duplicate_id"}


def test_duplicate_ids_in_folder_layout(tmp_path):
    for name in ("a.png", "a.jpg", "a.JPEG", "b.jpg"):
        write_image(tmp_path / name)
    listing = list_images(str(tmp_path))
    assert [(r.image_id, Path(r.source_path).name, r.error_type) for r in listing.records] == [
        ("a", "a.JPEG", None),  # sorted by path: "a.JPEG" < "a.jpg" < "a.png"
        ("a#2", "a.jpg", "duplicate_id"),
        ("a#3", "a.png", "duplicate_id"),
        ("b", "b.jpg", None),
    ]


def test_upper_case_extension_in_isic_layout(tmp_path):
    info = make_isic2017(tmp_path, n=3)
    upper = info.paths["ISIC_0000001"].with_suffix(".JPG")
    info.paths["ISIC_0000001"].rename(upper)
    info.paths["ISIC_0000001"] = upper
    assert_matches_fixture(list_images(str(tmp_path)), info)


def test_images_not_in_metadata_are_records_without_label(tmp_path):
    make_isic2018(tmp_path, n=3)
    extra = write_image(tmp_path / "ISIC2018_Task3_Training_Input" / "ISIC_0099999.jpg")
    listing = list_images(str(tmp_path))
    assert len(listing.records) == 4
    record = by_id(listing)["ISIC_0099999"]
    assert (record.label, record.error_type, record.source_path) == (None, None, str(extra))


def test_unreadable_label_is_none_not_error(tmp_path):
    make_isic2018(tmp_path, n=2)
    with open(tmp_path / "ISIC2018_Task3_Training_GroundTruth.csv", "a", newline="") as f:
        csv.writer(f).writerow(["ISIC_0050000", *["0.0"] * 7])  # no class set
        csv.writer(f).writerow(["ISIC_0050001", "1.0", "1.0", *["0.0"] * 5])  # two classes set
    for image_id in ("ISIC_0050000", "ISIC_0050001"):
        write_image(tmp_path / "ISIC2018_Task3_Training_Input" / f"{image_id}.jpg")
    listing = list_images(str(tmp_path))
    assert errors(listing) == {}
    assert by_id(listing)["ISIC_0050000"].label is None
    assert by_id(listing)["ISIC_0050001"].label is None


def test_missing_csv_column_raises(tmp_path):
    make_ham10000(tmp_path, n=2)
    write_csv(
        tmp_path / "HAM10000_metadata.csv", ["lesion_id", "image_id", "dx_type"], [["HAM_1", "ISIC_0024306", "histo"]]
    )
    with pytest.raises(LayoutError, match=r"HAM10000_metadata\.csv.*'dx'"):
        list_images(str(tmp_path))


def test_empty_dir_raises_listing_what_was_looked_for(tmp_path):
    (tmp_path / "notes.txt").write_text("no images here")
    with pytest.raises(LayoutError) as excinfo:
        detect_layout(str(tmp_path))
    for marker in (
        "HAM10000_metadata.csv",
        "ISIC-2017_*_Data",
        "ISIC2018_Task3_",
        "ISIC_2019_Training_",
        "ISIC_2020_Training_GroundTruth.csv",
        "metadata.csv with an isic_id column",
        ".jpg",
    ):
        assert marker in str(excinfo.value)
    with pytest.raises(LayoutError):
        list_images(str(tmp_path))


def test_bad_roots_and_layout_names(tmp_path):
    with pytest.raises(LayoutError, match="does not exist"):
        list_images(str(tmp_path / "nope"))
    make_isic2020(tmp_path, n=1)
    with pytest.raises(LayoutError, match="unknown layout"):
        list_images(str(tmp_path), "isic2016")
    with pytest.raises(LayoutError, match="none of the expected"):
        list_images(str(tmp_path), "ham10000")


def test_ambiguous_root_raises(tmp_path):
    make_ham10000(tmp_path, n=2)
    make_isic2018(tmp_path, n=2)
    with pytest.raises(LayoutError, match="several layouts"):
        detect_layout(str(tmp_path))
    assert len(list_images(str(tmp_path), "isic2018").records) == 2


def test_csv_rows_and_files_matched_both_ways(tmp_path):
    """An id named twice gives one row per CSV row (the later a duplicate_id), a named id without a file
    keeps its mask, a file the CSV does not name is an input without label."""
    info = make_isic2017(tmp_path, n=4, n_masks=4)
    csv_path = tmp_path / "ISIC-2017_Training_Part3_GroundTruth.csv"
    with open(csv_path, "a") as f:
        f.write(f"{isic_id(0)},1,0\n")
    info.paths[isic_id(1)].unlink()
    unnamed = write_image(tmp_path / "ISIC-2017_Training_Data" / f"{isic_id(9)}.jpg")
    listing = list_images(str(tmp_path))
    rows = by_id(listing)
    assert sorted(rows) == sorted([isic_id(0), isic_id(0) + "#2", isic_id(1), isic_id(2), isic_id(3), isic_id(9)])
    assert errors(listing) == {isic_id(0) + "#2": "duplicate_id", isic_id(1): "missing_file"}
    assert rows[isic_id(0)].label == rows[isic_id(0) + "#2"].label == "melanoma"
    assert rows[isic_id(1)].label == info.labels[isic_id(1)]
    assert rows[isic_id(1)].mask_path == str(info.masks[isic_id(1)])
    assert rows[isic_id(9)].label is None and rows[isic_id(9)].source_path == str(unnamed)
    assert rows[isic_id(9)].mask_path is None
    for i in (0, 2, 3):
        assert rows[isic_id(i)].source_path == str(info.paths[isic_id(i)])
        assert rows[isic_id(i)].mask_path == str(info.masks[isic_id(i)])
        assert (rows[isic_id(i)].file_size, rows[isic_id(i)].file_mtime_ns) == (
            info.paths[isic_id(i)].stat().st_size,
            info.paths[isic_id(i)].stat().st_mtime_ns,
        )
