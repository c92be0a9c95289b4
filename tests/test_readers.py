"""Tests of the CVUSA / CVACT / VIGOR readers on tiny hand-built layouts."""

import logging
import os

import cv2
import numpy as np
import pytest
import scipy.io

from cvgl_jax.data import cvact
from cvgl_jax.data import cvusa
from cvgl_jax.data import readers
from cvgl_jax.data import vigor


def _image(path):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  assert cv2.imwrite(path, np.full((4, 8, 3), 128, np.uint8))


def _write(path, lines):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path, "w") as f:
    f.write("".join(line + "\n" for line in lines))


# --------------------------------------------------------------------- CVUSA


@pytest.fixture
def cvusa_root(tmp_path):
  root = str(tmp_path / "cvusa")
  lines = []
  for i in [7, 3, 12, 5, 40, 1]:
    sid = f"{i:07d}"
    _image(os.path.join(root, "bingmap", "19", sid + ".jpg"))
    _image(os.path.join(root, "streetview", "panos", sid + ".jpg"))
    lines.append(f"bingmap/19/{sid}.jpg,streetview/panos/{sid}.jpg,"
                 f"streetview/annotations/{sid}.png")
  _write(os.path.join(root, "splits", "train-19zl.csv"), lines[:4] + [""])
  _write(os.path.join(root, "splits", "val-19zl.csv"), lines[4:])
  return root


def test_cvusa_pairs(cvusa_root):
  train = cvusa.read(cvusa_root, "train")
  assert train.name == "cvusa/train"
  assert list(train.ground_ids) == ["0000007", "0000003", "0000012",
                                    "0000005"]
  np.testing.assert_array_equal(train.positive, np.arange(4))
  for q in range(4):
    sid = train.ground_ids[q]
    assert train.ground_paths[q] == os.path.join(
        cvusa_root, "streetview", "panos", sid + ".jpg")
    assert train.satellite_paths[train.positive[q]] == os.path.join(
        cvusa_root, "bingmap", "19", sid + ".jpg")
    assert train.satellite_ids[q] == sid
  assert train.ground_coords is None and train.coord_kind == ""
  val = cvusa.read(cvusa_root, "val")
  assert list(val.ground_ids) == ["0000040", "0000001"]
  assert val.derived_paths("g2a")[1] == os.path.join(cvusa_root, "g2a",
                                                     "0000001.png")


def test_cvusa_missing_root_and_split(tmp_path, cvusa_root):
  with pytest.raises(FileNotFoundError, match="(?s)CVUSA root .*nowhere.*"
                     "Expected layout.*train-19zl.csv"):
    cvusa.read(str(tmp_path / "nowhere"), "train")
  os.remove(os.path.join(cvusa_root, "splits", "val-19zl.csv"))
  with pytest.raises(FileNotFoundError, match="val-19zl.csv does not exist"):
    cvusa.read(cvusa_root, "val")
  with pytest.raises(ValueError, match="'train', 'val'.*'test'"):
    cvusa.read(cvusa_root, "test")


@pytest.mark.parametrize("line,expected", [
    ("bingmap/19/0000009.jpg", "expected 'satellite path,panorama path"),
    ("bingmap/19/0000009.jpg,streetview/panos/abc.jpg,x.png",
     "expected a panorama file with a numeric name.*abc.jpg"),
])
def test_cvusa_malformed_line(cvusa_root, line, expected):
  csv = os.path.join(cvusa_root, "splits", "val-19zl.csv")
  with open(csv, "a") as f:
    f.write(line + "\n")
  with pytest.raises(ValueError, match=f"val-19zl.csv:3: {expected}"):
    cvusa.read(cvusa_root, "val")


def test_cvusa_missing_files_threshold(cvusa_root, caplog):
  gone = os.path.join(cvusa_root, "streetview", "panos", "0000012.jpg")
  os.remove(gone)
  # 1 of the 8 files of the train split: 12.5%.
  with pytest.raises(FileNotFoundError, match=r"1 of 8 image files .*"
                     r"0000012.jpg.*max_missing_fraction=0.1"):
    cvusa.read(cvusa_root, "train", max_missing_fraction=0.1)
  with pytest.raises(FileNotFoundError, match="1 of 8"):
    cvusa.read(cvusa_root, "train")  # The default, 1%.
  with caplog.at_level(logging.WARNING):
    train = cvusa.read(cvusa_root, "train", max_missing_fraction=0.125)
  assert "1 of 8 image files are missing" in caplog.text
  assert gone in caplog.text
  assert list(train.ground_ids) == ["0000007", "0000003", "0000005"]
  assert list(train.satellite_ids) == ["0000007", "0000003", "0000005"]
  np.testing.assert_array_equal(train.positive, np.arange(3))
  with pytest.raises(ValueError, match="max_missing_fraction must lie"):
    cvusa.read(cvusa_root, "train", max_missing_fraction=1.5)


def test_cvusa_missing_folder(cvusa_root):
  panos = os.path.join(cvusa_root, "streetview", "panos")
  for n in os.listdir(panos):
    os.remove(os.path.join(panos, n))
  os.rmdir(panos)
  with pytest.raises(FileNotFoundError,
                     match="Image folder .*streetview/panos is not a dir"):
    cvusa.read(cvusa_root, "train", max_missing_fraction=1.0)


# --------------------------------------------------------------------- CVACT

_ACT_IDS = [f"{c}{'x' * 20}{k}" for k, c in enumerate("ABCDEFG")]  # 22 chars


def _act_mat(path, **drop):
  n = len(_ACT_IDS)
  fields = {
      "panoIds": np.array(_ACT_IDS),  # A char matrix, as in the real file.
      "utm": np.stack([6.09e6 + np.arange(n), 6.9e5 + 10 * np.arange(n)], 1),
      # Fields in the real file's order: the indices are the second one.
      "trainSet": {"trainNum": np.array([[4.0]]),
                   "trainInd": np.array([[5], [1], [3], [2]], np.int32)},
      "valSet": {"valNum": np.array([[2.0]]),
                 "valInd": np.array([[7], [4]], np.int32)},
  }
  for key, value in drop.items():
    if value is None:
      del fields[key]
    else:
      fields[key] = value
  scipy.io.savemat(path, fields)


@pytest.fixture(params=["ANU_data_small", ""])
def cvact_root(tmp_path, request):
  root = str(tmp_path / "cvact")
  small = os.path.join(root, request.param)
  for i in _ACT_IDS:
    _image(os.path.join(small, "streetview", i + "_grdView.jpg"))
    _image(os.path.join(small, "satview_polish", i + "_satView_polish.jpg"))
  for i in _ACT_IDS[:3] + ["Zunknown"]:
    test = os.path.join(root, "ANU_data_test")
    _image(os.path.join(test, "streetview", i + "_grdView.jpg"))
    _image(os.path.join(test, "satview_polish", i + "_satView_polish.jpg"))
  _act_mat(os.path.join(root, "ACT_data.mat"))
  return root


def test_cvact_mat_reads_like_the_public_loaders(cvact_root):
  mat = scipy.io.loadmat(os.path.join(cvact_root, "ACT_data.mat"))
  np.testing.assert_array_equal(mat["trainSet"][0][0][1] - 1,
                                [[4], [0], [2], [1]])
  assert mat["panoIds"][4] + "_grdView.jpg" == _ACT_IDS[4] + "_grdView.jpg"


def test_cvact_train_val(cvact_root):
  train = cvact.read(cvact_root, "train")
  expected = [_ACT_IDS[i] for i in (4, 0, 2, 1)]
  assert list(train.ground_ids) == expected
  assert list(train.satellite_ids) == expected
  np.testing.assert_array_equal(train.positive, np.arange(4))
  folder = os.path.dirname(os.path.dirname(train.ground_paths[0]))
  assert os.path.isdir(os.path.join(folder, "satview_polish"))
  assert train.ground_paths[0] == os.path.join(
      folder, "streetview", _ACT_IDS[4] + "_grdView.jpg")
  assert train.satellite_paths[0] == os.path.join(
      folder, "satview_polish", _ACT_IDS[4] + "_satView_polish.jpg")
  assert train.coord_kind == "utm"
  np.testing.assert_allclose(train.ground_coords[:, 1],
                             6.9e5 + 10 * np.array([4, 0, 2, 1]))
  np.testing.assert_array_equal(train.satellite_coords, train.ground_coords)
  val = cvact.read(cvact_root, "val")
  assert list(val.ground_ids) == [_ACT_IDS[6], _ACT_IDS[3]]
  np.testing.assert_allclose(val.ground_coords[:, 0],
                             6.09e6 + np.array([6, 3]))


def test_cvact_cell_array_ids(cvact_root):
  cells = np.empty((len(_ACT_IDS), 1), dtype=object)
  cells[:, 0] = _ACT_IDS
  _act_mat(os.path.join(cvact_root, "ACT_data.mat"), panoIds=cells)
  assert list(cvact.read(cvact_root, "val").ground_ids) == [_ACT_IDS[6],
                                                            _ACT_IDS[3]]


def test_cvact_test_split(cvact_root, caplog):
  with caplog.at_level(logging.WARNING):
    test = cvact.read(cvact_root, "test")
  assert list(test.ground_ids) == _ACT_IDS[:3] + ["Zunknown"]
  assert test.ground_paths[3] == os.path.join(
      cvact_root, "ANU_data_test", "streetview", "Zunknown_grdView.jpg")
  np.testing.assert_array_equal(test.positive, np.arange(4))
  np.testing.assert_allclose(test.ground_coords[:3, 0], 6.09e6 + np.arange(3))
  assert np.isnan(test.ground_coords[3]).all()
  assert "1 of 4 ids are not in" in caplog.text
  os.remove(os.path.join(cvact_root, "ACT_data.mat"))
  test = cvact.read(cvact_root, "test")
  assert test.ground_coords is None and test.coord_kind == ""
  # A panorama without its tile counts one missing file of 8.
  os.remove(os.path.join(cvact_root, "ANU_data_test", "satview_polish",
                         _ACT_IDS[1] + "_satView_polish.jpg"))
  with pytest.raises(FileNotFoundError,
                     match=f"1 of 8 image files.*{_ACT_IDS[1]}_satView"):
    cvact.read(cvact_root, "test")
  test = cvact.read(cvact_root, "test", max_missing_fraction=0.2)
  assert list(test.ground_ids) == [_ACT_IDS[0], _ACT_IDS[2], "Zunknown"]


def test_cvact_missing_train_image(cvact_root):
  train = cvact.read(cvact_root, "train")
  os.remove(train.satellite_paths[2])
  with pytest.raises(FileNotFoundError, match="1 of 8 image files"):
    cvact.read(cvact_root, "train", max_missing_fraction=0.1)
  train = cvact.read(cvact_root, "train", max_missing_fraction=0.2)
  assert list(train.ground_ids) == [_ACT_IDS[i] for i in (4, 0, 1)]
  np.testing.assert_allclose(train.ground_coords[:, 1],
                             6.9e5 + 10 * np.array([4, 0, 1]))


@pytest.mark.parametrize("drop,error,expected", [
    ({"valSet": None}, KeyError, "has no field 'valSet'"),
    ({"utm": None}, KeyError, "has no field 'utm'"),
    ({"panoIds": None}, KeyError, "has no field 'panoIds'"),
    ({"utm": np.zeros((3, 2))}, ValueError,
     r"'utm' must be a numeric \[7, 2\]"),
    ({"valSet": np.array([[7], [4]])}, ValueError,
     "'valSet' must be a MATLAB struct"),
    ({"valSet": {"valNum": 1, "valInd": np.array([[0], [4]])}}, ValueError,
     r"valSet.valInd must hold 1-based integer indices .*\[1, 7\].*\[0, 4\]"),
    ({"valSet": {"valNum": 1, "valInd": np.array([[8.0], [4.0]])}}, ValueError,
     r"in \[1, 7\]"),
    ({"valSet": {"valNum": 1, "valInd": np.array([[1.5], [4.0]])}}, ValueError,
     "1-based integer indices"),
    # Damage that loads: a flipped exponent byte, a repeated id, an index
    # that moved into the other split.
    ({"utm": np.stack([6.09e6 + np.arange(7), [6.9e5] * 6 + [6.9e35]], 1)},
     ValueError, r"'utm' has 1 rows that are not UTM metres.*row 6"),
    ({"panoIds": np.array(_ACT_IDS[:6] + _ACT_IDS[:1])}, ValueError,
     "'panoIds' repeats 1 ids"),
    ({"valSet": {"valNum": 2, "valInd": np.array([[7], [5]], np.int32)}},
     ValueError, "trainSet and valSet share 1 panoramas"),
])
def test_cvact_bad_mat(cvact_root, drop, error, expected):
  path = os.path.join(cvact_root, "ACT_data.mat")
  _act_mat(path, **drop)
  with pytest.raises(error, match=f"ACT_data.mat.*{expected}"):
    cvact.read(cvact_root, "val")


def test_cvact_unreadable_mat(cvact_root):
  with open(os.path.join(cvact_root, "ACT_data.mat"), "wb") as f:
    f.write(b"\x89HDF\r\n" + bytes(200))
  with pytest.raises(ValueError, match="ACT_data.mat cannot be read by "
                     "scipy.io.loadmat.*expected a MATLAB v5 file"):
    cvact.read(cvact_root, "train")


def test_cvact_missing_root_mat_and_test_folder(tmp_path, cvact_root):
  with pytest.raises(FileNotFoundError, match="(?s)CVACT root .*nowhere.*"
                     "Expected layout.*ACT_data.mat"):
    cvact.read(str(tmp_path / "nowhere"), "train")
  os.remove(os.path.join(cvact_root, "ACT_data.mat"))
  with pytest.raises(FileNotFoundError,
                     match="CVACT index .*ACT_data.mat does not exist"):
    cvact.read(cvact_root, "train")
  os.rename(os.path.join(cvact_root, "ANU_data_test"),
            os.path.join(cvact_root, "other"))
  with pytest.raises(FileNotFoundError, match="ANU_data_test is not a dir"):
    cvact.read(cvact_root, "test")
  with pytest.raises(ValueError, match="'train', 'val' or 'test'"):
    cvact.read(cvact_root, "valSetAll")


# --------------------------------------------------------------------- VIGOR


def _tile(city_k, t):
  return f"satellite_{40 + city_k + t / 100:.6f}_{-80 + city_k:.6f}.png"


def _pano(city_k, p):
  return f"-p{city_k}_{p}Xy,{40 + city_k + p / 1000:.6f},{-80.5 + city_k},.jpg"


@pytest.fixture
def vigor_root(tmp_path):
  """Four cities of 3 tiles and 4 panoramas; panorama p lies in tile p % 3,
  semi-positives the other two tiles and again tile p % 3."""
  root = str(tmp_path / "vigor")
  for k, city in enumerate(vigor.CITIES):
    tiles = [_tile(k, t) for t in range(3)]
    for t in tiles:
      _image(os.path.join(root, city, "satellite", t))
    lines = []
    for p in range(4):
      _image(os.path.join(root, city, "panorama", _pano(k, p)))
      order = [p % 3, (p + 1) % 3, (p + 2) % 3, p % 3]
      lines.append(" ".join([_pano(k, p)] + [
          f"{tiles[t]} {p + 0.5 * j:.1f} {-p - j:.1f}"
          for j, t in enumerate(order)]))
    splits = os.path.join(root, "splits", city)
    _write(os.path.join(splits, "satellite_list.txt"), tiles + [tiles[0]])
    _write(os.path.join(splits, "same_area_balanced_train.txt"), lines[:3])
    _write(os.path.join(splits, "same_area_balanced_test.txt"), lines[3:])
    _write(os.path.join(splits, "pano_label_balanced.txt"), lines)
  return root


def test_vigor_same_area(vigor_root):
  test = vigor.read(vigor_root, "test", "same_area")
  assert test.name == ("vigor/same_area/Chicago+NewYork+SanFrancisco+Seattle"
                       "/test")
  assert test.num_satellite == 12  # Every tile once, duplicates dropped.
  assert test.num_ground == 4
  assert list(test.ground_ids) == [f"-p{k}_3Xy" for k in range(4)]
  for k, city in enumerate(vigor.CITIES):
    assert test.ground_paths[k] == os.path.join(vigor_root, city, "panorama",
                                                _pano(k, 3))
    # Panorama 3 lies in tile 0, semi-positives tiles 1, 2, 0.
    assert test.satellite_paths[test.positive[k]] == os.path.join(
        vigor_root, city, "satellite", _tile(k, 0))
    np.testing.assert_array_equal(test.semi_positives[k],
                                  3 * k + np.array([1, 2, 0]))
  np.testing.assert_array_equal(
      test.offsets[0], [[3, -3], [3.5, -4], [4, -5], [4.5, -6]])
  assert test.offsets.dtype == np.float32 and test.offsets.shape == (4, 4, 2)
  assert test.coord_kind == "latlon"
  np.testing.assert_allclose(test.ground_coords[2], [42.003, -78.5])
  np.testing.assert_allclose(test.satellite_coords[4], [41.01, -79.0])
  assert list(test.satellite_ids[:2]) == [_tile(0, 0)[:-4], _tile(0, 1)[:-4]]
  train = vigor.read(vigor_root, "train", "same_area")
  assert train.num_ground == 12 and train.num_satellite == 12
  np.testing.assert_array_equal(train.positive[:3], [0, 1, 2])


def test_vigor_cross_area_and_cities(vigor_root):
  train = vigor.read(vigor_root, "train", "cross_area")
  assert train.name == "vigor/cross_area/NewYork+Seattle/train"
  assert train.num_ground == 8 and train.num_satellite == 6
  assert train.satellite_paths[0].endswith(os.path.join(
      "NewYork", "satellite", _tile(1, 0)))
  np.testing.assert_array_equal(train.positive, [0, 1, 2, 0, 3, 4, 5, 3])
  np.testing.assert_array_equal(train.semi_positives[4], [4, 5, 3])
  test = vigor.read(vigor_root, "test", "cross_area")
  assert [p.split(os.sep)[-3] for p in test.ground_paths] == (
      ["Chicago"] * 4 + ["SanFrancisco"] * 4)
  one = vigor.read(vigor_root, "test", "cross_area", cities=["Seattle"])
  assert one.name == "vigor/cross_area/Seattle/test"
  assert list(one.ground_ids) == [f"-p3_{p}Xy" for p in range(4)]
  with pytest.raises(ValueError, match="distinct names from.*Paris"):
    vigor.read(vigor_root, "test", "cross_area", cities=["Paris"])
  with pytest.raises(ValueError, match="mode must be one of"):
    vigor.read(vigor_root, "test", "same")
  with pytest.raises(ValueError, match="'train' or 'test'"):
    vigor.read(vigor_root, "val", "same_area")


def test_vigor_missing_tile_and_panorama(vigor_root, caplog):
  city = os.path.join(vigor_root, "NewYork")
  os.remove(os.path.join(city, "satellite", _tile(1, 1)))
  os.remove(os.path.join(city, "panorama", _pano(1, 3)))
  # 2 of 8 panoramas + 6 tiles are missing: 1/7.
  with pytest.raises(FileNotFoundError, match=r"2 of 14 image files .*"
                     + _pano(1, 3).replace("-", r"\-")):
    vigor.read(vigor_root, "train", "cross_area", max_missing_fraction=0.14)
  with caplog.at_level(logging.WARNING):
    train = vigor.read(vigor_root, "train", "cross_area",
                       max_missing_fraction=0.15)
  assert "2 of 14 image files are missing" in caplog.text
  # NewYork panorama 1 lost its positive tile, panorama 3 its image.
  assert list(train.ground_ids) == (["-p1_0Xy", "-p1_2Xy"] +
                                    [f"-p3_{p}Xy" for p in range(4)])
  assert train.num_satellite == 5
  assert _tile(1, 1)[:-4] not in train.satellite_ids
  np.testing.assert_array_equal(train.positive, [0, 1, 2, 3, 4, 2])
  # Tile 1 was the semi-positive of panorama 0 and 2: now -1.
  np.testing.assert_array_equal(train.semi_positives[:2], [[-1, 1, 0],
                                                           [0, -1, 1]])
  np.testing.assert_array_equal(train.semi_positives[2], [3, 4, 2])
  np.testing.assert_array_equal(train.offsets[1, 0], [2, -2])
  np.testing.assert_allclose(train.ground_coords[1], [41.002, -79.5])


def _label(pano, tile=_tile(2, 0), dx="2"):
  return " ".join([pano] + [f"{tile} 1 {dx}"] * 4)


@pytest.mark.parametrize("file,line,expected", [
    ("pano_label_balanced.txt", "a,1,2,.jpg sat 1 2",
     "expected 13 fields 'pano sat dy dx"),
    ("pano_label_balanced.txt", _label("noid.jpg"),
     "expected a panorama file name '<panoid>,<lat>,<lon>,.jpg'.*noid.jpg"),
    ("pano_label_balanced.txt", _label("a,1,2,.jpg", tile=_tile(2, 9)),
     "tile 'satellite_42.090000_-78.000000.png' is not in "
     "splits/SanFrancisco/satellite_list.txt"),
    ("pano_label_balanced.txt", _label("a,1,2,.jpg", dx="b"),
     "expected numeric offsets 'dy dx'.*'b'"),
    ("satellite_list.txt", "tile_1_2.png",
     "expected a tile file name 'satellite_<lat>_<lon>.png'"),
])
def test_vigor_malformed_line(vigor_root, file, line, expected):
  path = os.path.join(vigor_root, "splits", "SanFrancisco", file)
  number = len(open(path).readlines()) + 1
  with open(path, "a") as f:
    f.write(line + "\n")
  with pytest.raises(ValueError, match=f"{file}:{number}: {expected}"):
    vigor.read(vigor_root, "test", "cross_area")


def test_vigor_missing_split_file_and_root(tmp_path, vigor_root):
  with pytest.raises(FileNotFoundError, match="(?s)VIGOR root .*nowhere.*"
                     "Expected layout.*satellite_list.txt"):
    vigor.read(str(tmp_path / "nowhere"), "test", "same_area")
  os.remove(os.path.join(vigor_root, "splits", "Seattle",
                         "same_area_balanced_test.txt"))
  with pytest.raises(FileNotFoundError, match="VIGOR Seattle split file .*"
                     "Seattle/same_area_balanced_test.txt does not exist"):
    vigor.read(vigor_root, "test", "same_area")


def test_vigor_duplicate_id(vigor_root):
  path = os.path.join(vigor_root, "splits", "Chicago",
                      "pano_label_balanced.txt")
  with open(path, "a") as f:
    f.write(" ".join([_pano(0, 0).replace(",40", ",39")] +
                     [_tile(0, 0), "1 2"] * 4) + "\n")
  with pytest.raises(ValueError, match="id '-p0_0Xy' names two different"):
    vigor.read(vigor_root, "test", "cross_area", max_missing_fraction=1.0)


# ------------------------------------------------------------------- dispatch


def test_read_split(cvusa_root, vigor_root):
  a = readers.read_split("cvusa", cvusa_root, "val")
  np.testing.assert_array_equal(a.ground_paths,
                                cvusa.read(cvusa_root, "val").ground_paths)
  b = readers.read_split("vigor", vigor_root, "test", mode="cross_area",
                         cities=("Chicago",))
  assert b.name == "vigor/cross_area/Chicago/test"
  with pytest.raises(ValueError, match="Unknown dataset 'kitti'.*cvact"):
    readers.read_split("kitti", cvusa_root, "val")
