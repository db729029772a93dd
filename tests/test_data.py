"""advlab.data: every format from tiny files made here, bad input, checked downloads (file:// and
an unreachable host), and the real MNIST / Fashion-MNIST folders when ../shared is present."""

from __future__ import annotations

import gzip
import hashlib
import io
import os
import pickle
import tarfile
import warnings

import numpy as np
import pytest
import torch

from advlab._util import AdvlabError
from advlab.data import download as dl
from advlab.data import list_datasets, load_dataset, read_idx
from advlab.data.download import RemoteFile, Source, download_file, verify_file
from advlab.data.prepare import download_dataset

OFFLINE_URL = "http://127.0.0.1:9/"  # discard port: connection refused at once


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch, tmp_path):
    """No test reads the user's mirror or data settings."""
    monkeypatch.delenv(dl.ENV_MIRROR, raising=False)
    monkeypatch.setenv(dl.ENV_DATA, str(tmp_path / "default-data"))


def _check(ds, n, shape, num_classes=10):
    assert len(ds) == n
    assert ds.images.shape == (n, *shape)
    assert ds.images.dtype == torch.float32 and ds.labels.dtype == torch.int64
    assert float(ds.images.min()) >= 0.0 and float(ds.images.max()) <= 1.0
    assert ds.num_classes == num_classes == len(ds.classes)


def _sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- IDX (MNIST, Fashion-MNIST)

def _idx_bytes(arr: np.ndarray) -> bytes:
    arr = np.ascontiguousarray(arr, dtype=np.uint8)
    header = bytes([0, 0, 0x08, arr.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in arr.shape)
    return header + arr.tobytes()


def _write_idx_pair(root, prefix, images, labels, gz=True):
    root.mkdir(parents=True, exist_ok=True)
    for kind, arr in (("images-idx3", images), ("labels-idx1", labels)):
        raw = _idx_bytes(arr)
        name = f"{prefix}-{kind}-ubyte" + (".gz" if gz else "")
        (root / name).write_bytes(gzip.compress(raw) if gz else raw)


@pytest.fixture
def tiny_idx(tmp_path):
    rng = np.random.RandomState(0)
    data = {}
    for prefix, n in (("train", 12), ("t10k", 5)):
        imgs = rng.randint(0, 256, size=(n, 28, 28)).astype(np.uint8)
        imgs[0, 0, 0], imgs[0, 0, 1] = 0, 255
        labels = (np.arange(n) % 10).astype(np.uint8)
        _write_idx_pair(tmp_path / "idx", prefix, imgs, labels)
        data[prefix] = (imgs, labels)
    return tmp_path / "idx", data


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist"])
def test_idx_datasets_load_official_layout(tiny_idx, name):
    root, data = tiny_idx
    train = load_dataset(name, root, "train")
    test = load_dataset(name, root, split="test")
    _check(train, 12, (1, 28, 28))
    _check(test, 5, (1, 28, 28))
    np.testing.assert_array_equal((train.images[:, 0] * 255).round().numpy().astype(np.uint8), data["train"][0])
    assert train.labels.tolist() == data["train"][1].tolist()
    assert float(train.images.min()) == 0.0 and float(train.images.max()) == 1.0
    assert train.name == name and test.split == "test"


def test_idx_uncompressed_files_are_accepted(tmp_path):
    imgs = np.full((3, 4, 5), 51, np.uint8)
    _write_idx_pair(tmp_path, "train", imgs, np.array([1, 2, 3], np.uint8), gz=False)
    ds = load_dataset("mnist", tmp_path, "train")
    _check(ds, 3, (1, 4, 5))
    assert torch.allclose(ds.images, torch.full_like(ds.images, 0.2))


def test_idx_missing_files_message(tmp_path):
    _write_idx_pair(tmp_path, "train", np.zeros((2, 3, 3), np.uint8), np.zeros(2, np.uint8))
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(AdvlabError) as e:
        load_dataset("mnist", tmp_path, "train")
    msg = str(e.value)
    assert "train-labels-idx1-ubyte.gz" in msg and str(tmp_path) in msg and "download=True" in msg
    assert "https://" in msg  # says where the official file comes from


def test_idx_default_root_comes_from_env(tmp_path):
    with pytest.raises(AdvlabError, match="default-data"):
        load_dataset("fashion-mnist", split="test")


def test_idx_truncated(tmp_path):
    raw = _idx_bytes(np.zeros((4, 5, 5), np.uint8))
    (tmp_path / "a.gz").write_bytes(gzip.compress(raw[:-7]))
    with pytest.raises(AdvlabError, match="truncated"):
        read_idx(tmp_path / "a.gz")
    (tmp_path / "b").write_bytes(raw[:10])
    with pytest.raises(AdvlabError, match="truncated"):
        read_idx(tmp_path / "b")


def test_idx_wrong_magic(tmp_path):
    raw = bytearray(_idx_bytes(np.zeros((2, 3, 3), np.uint8)))
    raw[2] = 0x42  # unknown type code
    (tmp_path / "x.gz").write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(AdvlabError, match="magic"):
        read_idx(tmp_path / "x.gz")
    (tmp_path / "y").write_bytes(b"PK\x03\x04 not idx")
    with pytest.raises(AdvlabError, match="magic"):
        read_idx(tmp_path / "y")


def test_idx_corrupt_gzip(tmp_path):
    blob = bytearray(gzip.compress(_idx_bytes(np.arange(300, dtype=np.uint8).reshape(3, 10, 10))))
    blob[len(blob) // 2] ^= 0xFF
    (tmp_path / "c.gz").write_bytes(bytes(blob))
    with pytest.raises(AdvlabError, match="corrupt gzip"):
        read_idx(tmp_path / "c.gz")
    (tmp_path / "d.gz").write_bytes(gzip.compress(b"x" * 100)[:20])  # cut short
    with pytest.raises(AdvlabError, match="corrupt gzip"):
        read_idx(tmp_path / "d.gz")
    (tmp_path / "e.gz").write_bytes(_idx_bytes(np.zeros((1, 2, 2), np.uint8)))  # .gz name, not gzip
    with pytest.raises(AdvlabError, match="corrupt gzip"):
        read_idx(tmp_path / "e.gz")


def test_idx_mismatched_counts_and_bad_labels(tmp_path):
    _write_idx_pair(tmp_path, "train", np.zeros((4, 3, 3), np.uint8), np.zeros(3, np.uint8))
    with pytest.raises(AdvlabError, match="4 images but .* 3 labels"):
        load_dataset("mnist", tmp_path, "train")
    _write_idx_pair(tmp_path, "train", np.zeros((2, 3, 3), np.uint8), np.array([0, 12], np.uint8))
    with pytest.raises(AdvlabError, match=r"labels outside \[0, 9\]"):
        load_dataset("mnist", tmp_path, "train")


# ---------------------------------------------------------------- registry, digits, options

def test_list_datasets_and_unknown_name():
    names = list_datasets()
    assert set(names) >= {"digits", "mnist", "fashion-mnist", "cifar10", "svhn", "folder"}
    with pytest.raises(AdvlabError) as e:
        load_dataset("imagenet-42")
    for n in names:
        assert n in str(e.value)


def test_bad_split_and_option_are_named(tiny_idx):
    root, _ = tiny_idx
    with pytest.raises(AdvlabError, match="split must be one of train, test"):
        load_dataset("mnist", root, "validation")
    with pytest.raises(AdvlabError, match="grayscale"):
        load_dataset("mnist", root, grayscale=True)


def test_digits_split_is_fixed_and_a_partition():
    from sklearn.datasets import load_digits

    tr, te = load_dataset("digits", split="train"), load_dataset("digits", split="test")
    _check(tr, 1438, (1, 8, 8))
    _check(te, 359, (1, 8, 8))
    again = load_dataset("digits", split="test")
    assert torch.equal(te.images, again.images) and torch.equal(te.labels, again.labels)

    def rows(x, y):
        r = np.concatenate([x.reshape(len(y), -1), y.reshape(-1, 1)], 1)
        return r[np.lexsort(r.T[::-1])]

    full = load_digits()
    union = rows(torch.cat([tr.images, te.images]).numpy() * 16, torch.cat([tr.labels, te.labels]).numpy())
    np.testing.assert_allclose(union, rows(full.images.astype(np.float32), full.target), atol=1e-5)
    # every class is in both splits, in the 80/20 proportion
    for c in range(10):
        n_tr, n_te = int((tr.labels == c).sum()), int((te.labels == c).sum())
        assert n_te == (n_tr + n_te) - round(0.8 * (n_tr + n_te))


# ---------------------------------------------------------------- downloads

def test_download_file_success_from_file_url(tmp_path):
    src = tmp_path / "src" / "blob.bin"
    src.parent.mkdir()
    src.write_bytes(os.urandom(3000))
    dest = tmp_path / "out" / "blob.bin"
    got = download_file(src.as_uri(), dest, sha256=_sha256(src), md5=hashlib.md5(src.read_bytes()).hexdigest(),
                        progress=False)
    assert got == dest and dest.read_bytes() == src.read_bytes()
    assert verify_file(dest, sha256=_sha256(src)) == dest
    assert sorted(p.name for p in dest.parent.iterdir()) == ["blob.bin"]  # no temporary left behind


def test_download_file_checksum_mismatch_writes_nothing(tmp_path):
    src = tmp_path / "blob.bin"
    src.write_bytes(b"hello")
    out = tmp_path / "out"
    with pytest.raises(AdvlabError, match="checksum mismatch.*sha256"):
        download_file(src.as_uri(), out / "blob.bin", sha256="0" * 64, progress=False)
    with pytest.raises(AdvlabError, match="checksum mismatch.*md5"):
        download_file(src.as_uri(), out / "blob.bin", md5="0" * 32, progress=False)
    assert not out.exists() or list(out.iterdir()) == []
    with pytest.raises(AdvlabError, match="checksum mismatch"):
        verify_file(src, sha256="1" * 64)


def test_download_file_offline_and_missing(tmp_path):
    with pytest.raises(AdvlabError, match="could not download http://127.0.0.1:9/x.gz"):
        download_file(OFFLINE_URL + "x.gz", tmp_path / "x.gz", timeout=5, progress=False)
    with pytest.raises(AdvlabError, match="could not download file://"):
        download_file((tmp_path / "absent.bin").as_uri(), tmp_path / "y.bin", progress=False)
    with pytest.raises(AdvlabError, match="timeout"):
        download_file(OFFLINE_URL, tmp_path / "z", timeout=0)
    assert list(tmp_path.iterdir()) == []  # no destination, no temporary file


@pytest.fixture
def idx_mirror(tmp_path, monkeypatch):
    """A file:// mirror with tiny MNIST-format files, registered with their real checksums."""
    mirror = tmp_path / "mirror"
    rng = np.random.RandomState(1)
    for prefix, n in (("train", 10), ("t10k", 4)):
        _write_idx_pair(mirror, prefix, rng.randint(0, 256, (n, 6, 6)), np.arange(n) % 10)
    files = {split: tuple(RemoteFile(f.name, _sha256(mirror / f.name), None) for f in dl.SOURCES["mnist"].files[split])
             for split in ("train", "test")}
    monkeypatch.setitem(dl.SOURCES, "mnist", Source(mirrors=(OFFLINE_URL,), files=files, homepage="https://x"))
    return mirror


def test_download_through_mirror_argument(idx_mirror, tmp_path):
    root = tmp_path / "data"
    ds = load_dataset("mnist", root, "test", download=True, mirrors=[idx_mirror.as_uri()])
    _check(ds, 4, (1, 6, 6))
    assert sorted(p.name for p in root.iterdir()) == ["t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]


def test_download_through_env_mirror_falls_back_in_order(idx_mirror, tmp_path, monkeypatch):
    # the first mirror is unreachable, the second (a plain folder path) works
    monkeypatch.setenv(dl.ENV_MIRROR, f"{OFFLINE_URL} {idx_mirror}")
    paths = download_dataset("mnist", tmp_path / "data")
    assert len(paths) == 4 and all(p.is_file() for p in paths)
    assert load_dataset("mnist", tmp_path / "data", "train").images.shape == (10, 1, 6, 6)


def test_download_offline_error_names_files_urls_and_folder(idx_mirror, tmp_path):
    root = tmp_path / "data"
    with pytest.raises(AdvlabError) as e:
        load_dataset("mnist", root, "train", download=True)  # the patched source lists only OFFLINE_URL
    msg = str(e.value)
    for part in ("train-images-idx3-ubyte.gz", OFFLINE_URL + "train-images-idx3-ubyte.gz", str(root),
                 "ADVLAB_MIRROR", "still missing", "train-labels-idx1-ubyte.gz"):
        assert part in msg
    assert not root.exists() or list(root.iterdir()) == []


def test_download_checksum_mismatch_with_official_checksums(tmp_path):
    mirror = tmp_path / "mirror"
    _write_idx_pair(mirror, "t10k", np.zeros((2, 4, 4), np.uint8), np.zeros(2, np.uint8))
    root = tmp_path / "data"
    with pytest.raises(AdvlabError) as e:
        load_dataset("fashion-mnist", root, "test", download=True, mirrors=[mirror.as_uri()])
    assert "checksum mismatch" in str(e.value) and "t10k-images-idx3-ubyte.gz" in str(e.value)
    assert not root.exists() or list(root.iterdir()) == []


def test_files_present_are_not_checksummed_and_not_redownloaded(tiny_idx):
    root, _ = tiny_idx
    ds = load_dataset("mnist", root, "train", download=True, mirrors=[OFFLINE_URL])
    assert len(ds) == 12


def test_official_checksums_are_well_formed():
    for name, src in dl.SOURCES.items():
        assert src.mirrors and all(m.endswith("/") for m in src.mirrors)
        for files in src.files.values():
            for f in files:
                assert f.sha256 is not None and len(f.sha256) == 64 and int(f.sha256, 16) >= 0
                assert f.md5 is None or (len(f.md5) == 32 and int(f.md5, 16) >= 0)


# ---------------------------------------------------------------- CIFAR-10

def _cifar_batch(n, seed):
    rng = np.random.RandomState(seed)
    return {"batch_label": f"batch {seed}", "labels": [int(v) for v in rng.randint(0, 10, n)],
            "data": rng.randint(0, 256, (n, 3072)).astype(np.uint8), "filenames": [f"{i}.png" for i in range(n)]}


def _write_cifar(folder, train_batches, test_n=3, meta=True):
    folder.mkdir(parents=True)
    batches = {}
    for i, n in enumerate(train_batches, 1):
        batches[f"data_batch_{i}"] = _cifar_batch(n, i)
    batches["test_batch"] = _cifar_batch(test_n, 99)
    for name, b in batches.items():
        (folder / name).write_bytes(pickle.dumps(b, protocol=2))
    if meta:
        names = ["plane", "car", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]
        (folder / "batches.meta").write_bytes(pickle.dumps({"label_names": names, "num_vis": 3072}, protocol=2))
    return batches


def _tar(folder, tar_path, extra=()):
    with tarfile.open(tar_path, "w:gz") as tar:
        for p in sorted(folder.iterdir()):
            tar.add(p, arcname=f"cifar-10-batches-py/{p.name}")
        for name, data in extra:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


def test_cifar10_folder_layout(tmp_path):
    batches = _write_cifar(tmp_path / "c" / "cifar-10-batches-py", [2, 1, 2, 1, 2])
    train = load_dataset("cifar10", tmp_path / "c", "train")
    test = load_dataset("cifar10", tmp_path / "c", "test")
    _check(train, 8, (3, 32, 32))
    _check(test, 3, (3, 32, 32))
    assert train.classes[1] == "car"
    b = batches["test_batch"]
    # official layout: 1024 red, then green, then blue values, each row-major 32x32
    assert round(float(test.images[1, 2, 5, 7]) * 255) == b["data"][1, 2 * 1024 + 5 * 32 + 7]
    assert test.labels.tolist() == b["labels"]
    assert train.labels[:2].tolist() == batches["data_batch_1"]["labels"]


def test_cifar10_tarball_with_two_batches_is_read_in_memory(tmp_path):
    _write_cifar(tmp_path / "src", [4, 3], meta=False)
    root = tmp_path / "root"
    root.mkdir()
    _tar(tmp_path / "src", root / "cifar-10-python.tar.gz")
    with pytest.warns(UserWarning, match="2 batch file"):
        train = load_dataset("cifar10", root, "train")
    _check(train, 7, (3, 32, 32))
    assert train.classes[0] == "airplane"  # default names when batches.meta is absent
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _check(load_dataset("cifar10", root, "test"), 3, (3, 32, 32))
    assert [p.name for p in root.iterdir()] == ["cifar-10-python.tar.gz"]  # nothing extracted


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def _py2_batch_pickle(data: np.ndarray, labels) -> bytes:
    """A batch pickled the way the official files are (Python 2, numpy 1.x, protocol 2): str keys
    and array bytes as BINSTRING, numpy.core.multiarray._reconstruct. Written opcode by opcode."""
    def s(b):  # SHORT_BINSTRING or BINSTRING (a Python 2 str)
        return (b"U" + bytes([len(b)]) + b) if len(b) < 256 else (b"T" + len(b).to_bytes(4, "little") + b)

    def k(v):
        return b"K" + bytes([v])

    n = data.shape[0]
    dtype = (b"cnumpy\ndtype\n" + s(b"u1") + k(0) + k(1) + b"\x87R"
             + b"(" + k(3) + s(b"|") + b"NNN" + b"J\xff\xff\xff\xffJ\xff\xff\xff\xff" + k(0) + b"tb")
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + k(0) + b"\x85" + s(b"b")
             + b"\x87R" + b"(" + k(1) + k(n) + b"M\x00\x0c\x86" + dtype + b"\x89" + s(data.tobytes()) + b"tb")
    lab = b"](" + b"".join(k(int(v)) for v in labels) + b"e"
    return b"\x80\x02}(" + s(b"data") + array + s(b"labels") + lab + b"u."


def test_cifar10_reads_python2_numpy1_pickles(tmp_path):
    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    data = np.random.RandomState(5).randint(0, 256, (3, 3072)).astype(np.uint8)
    (folder / "test_batch").write_bytes(_py2_batch_pickle(data, [7, 0, 9]))
    ds = load_dataset("cifar10", tmp_path, "test")
    _check(ds, 3, (3, 32, 32))
    assert ds.labels.tolist() == [7, 0, 9]
    np.testing.assert_array_equal((ds.images.reshape(3, -1) * 255).round().numpy().astype(np.uint8), data)


@pytest.mark.filterwarnings("ignore:CIFAR-10 train split")
def test_cifar10_restricted_unpickler_refuses_code(tmp_path):
    marker = tmp_path / "pwned"
    folder = tmp_path / "c"
    _write_cifar(folder, [2])
    (folder / "data_batch_1").write_bytes(pickle.dumps({"data": _Evil(marker), "labels": [0]}, protocol=2))
    with pytest.raises(AdvlabError, match="refusing to unpickle global"):
        load_dataset("cifar10", folder, "train")
    assert not marker.exists()


@pytest.mark.filterwarnings("ignore:CIFAR-10 train split")
def test_cifar10_bad_batches(tmp_path):
    folder = tmp_path / "c"
    _write_cifar(folder, [2])
    b = _cifar_batch(3, 1)
    b["labels"] = b["labels"][:2]
    (folder / "data_batch_1").write_bytes(pickle.dumps(b, protocol=2))
    with pytest.raises(AdvlabError, match="3 images but 2 labels"):
        load_dataset("cifar10", folder, "train")
    (folder / "test_batch").write_bytes(b"\x80\x02}q\x00(X")  # truncated pickle
    with pytest.raises(AdvlabError, match="test_batch is not a readable CIFAR pickle"):
        load_dataset("cifar10", folder, "test")
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdvlabError, match="cifar-10-python.tar.gz"):
        load_dataset("cifar10", tmp_path / "empty")
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "cifar-10-python.tar.gz").write_bytes(b"not a tarball at all")
    with pytest.raises(AdvlabError, match="corrupt CIFAR-10 tarball"):
        load_dataset("cifar10", tmp_path / "bad")


def test_cifar10_download_verifies_then_extracts_only_batch_files(tmp_path, monkeypatch):
    _write_cifar(tmp_path / "src", [2, 2, 2, 2, 2])
    mirror = tmp_path / "mirror"
    mirror.mkdir()
    tarball = mirror / "cifar-10-python.tar.gz"
    _tar(tmp_path / "src", tarball, extra=[("cifar-10-batches-py/../../escaped", b"x"), ("elsewhere.txt", b"y")])
    remote = RemoteFile("cifar-10-python.tar.gz", _sha256(tarball), hashlib.md5(tarball.read_bytes()).hexdigest())
    monkeypatch.setattr(dl, "CIFAR10_TARBALL", remote)
    monkeypatch.setitem(dl.SOURCES, "cifar10", Source((mirror.as_uri() + "/",), {"train": (remote,), "test": (remote,)}))
    root = tmp_path / "data" / "cifar"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = load_dataset("cifar10", root, "train", download=True)
    _check(ds, 10, (3, 32, 32))
    assert sorted(p.name for p in (root / "cifar-10-batches-py").iterdir()) == sorted(
        ["batches.meta", "test_batch"] + [f"data_batch_{i}" for i in range(1, 6)])
    assert not (tmp_path / "data" / "escaped").exists() and not (root / "elsewhere.txt").exists()

    # a tarball in root that is not the official one is not extracted on download=True
    other = tmp_path / "other"
    other.mkdir()
    (other / "cifar-10-python.tar.gz").write_bytes(b"tampered")
    with pytest.raises(AdvlabError, match="checksum mismatch"):
        load_dataset("cifar10", other, download=True)


# ---------------------------------------------------------------- SVHN

def _svhn(path, n, seed=0, labels=None):
    from scipy.io import savemat

    rng = np.random.RandomState(seed)
    x = rng.randint(0, 256, (32, 32, 3, n)).astype(np.uint8)
    y = (np.arange(n) % 10 + 1 if labels is None else np.asarray(labels)).reshape(-1, 1).astype(np.uint8)
    savemat(path, {"X": x, "y": y})
    return x, y


def test_svhn_mat_files(tmp_path):
    x, y = _svhn(tmp_path / "train_32x32.mat", 12)
    _svhn(tmp_path / "test_32x32.mat", 4, seed=1)
    train = load_dataset("svhn", tmp_path, "train")
    _check(train, 12, (3, 32, 32))
    _check(load_dataset("svhn", tmp_path, "test"), 4, (3, 32, 32))
    assert train.labels.tolist() == [1, 2, 3, 4, 5, 6, 7, 8, 9, 0, 1, 2]  # label 10 is the digit 0
    assert round(float(train.images[3, 1, 4, 9]) * 255) == x[4, 9, 1, 3]  # X is (H, W, C, N)
    with pytest.raises(AdvlabError, match="extra_32x32.mat"):
        load_dataset("svhn", tmp_path, "extra")


def test_svhn_bad_files(tmp_path):
    _svhn(tmp_path / "train_32x32.mat", 3, labels=[1, 11, 2])
    with pytest.raises(AdvlabError, match="1..10"):
        load_dataset("svhn", tmp_path)
    (tmp_path / "test_32x32.mat").write_bytes(b"MATLAB? no" * 20)
    with pytest.raises(AdvlabError, match="not a readable SVHN .mat file"):
        load_dataset("svhn", tmp_path, "test")
    from scipy.io import savemat

    savemat(tmp_path / "train_32x32.mat", {"X": np.zeros((32, 32, 3, 2), np.uint8), "y": np.ones((3, 1))})
    with pytest.raises(AdvlabError, match="2 images but 3 labels"):
        load_dataset("svhn", tmp_path)


# ---------------------------------------------------------------- image folders

def _png(path, size, value, mode="RGB"):
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, value).save(path)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "imgs"
    for ci, cls in enumerate(["cat", "dog", "owl"]):
        for i in range(5 + ci):
            _png(root / cls / f"{i:02d}.png", (6, 4), (40 * ci, 10 * i, 200))
    (root / "cat" / "notes.txt").write_text("not an image, ignored")
    return root


def test_folder_stratified_seeded_split(image_folder):
    tr = load_dataset("folder", image_folder, "train")
    te = load_dataset("folder", image_folder, "test")
    _check(tr, 15, (3, 4, 6), num_classes=3)
    _check(te, 3, (3, 4, 6), num_classes=3)
    assert tr.classes == ["cat", "dog", "owl"]
    assert torch.bincount(te.labels, minlength=3).tolist() == [1, 1, 1]  # round(0.2 * n) for n = 5, 6, 7
    assert torch.equal(load_dataset("folder", image_folder, "test").images, te.images)
    all_ = load_dataset("folder", image_folder, "all")
    assert len(all_) == 18
    # disjoint: each (pixel pattern, label) appears once in the whole folder
    key = lambda d: {(tuple((d.images[i, :, 0, 0] * 255).round().int().tolist()), int(d.labels[i])) for i in range(len(d))}
    assert key(tr).isdisjoint(key(te)) and key(tr) | key(te) == key(all_)
    other = load_dataset("folder", image_folder, "test", seed=3, test_fraction=0.5)
    assert torch.bincount(other.labels, minlength=3).tolist() == [2, 3, 4]  # round half to even: 2.5 -> 2, 3.5 -> 4


def test_folder_resize_grayscale_and_presplit(tmp_path):
    root = tmp_path / "f"
    _png(root / "train" / "a" / "1.png", (10, 20), (255, 255, 255))
    _png(root / "train" / "a" / "2.jpg", (7, 7), (0, 0, 0))
    _png(root / "train" / "b" / "1.png", (3, 5), 128, mode="L")
    _png(root / "test" / "b" / "1.png", (8, 8), (255, 0, 0))
    tr = load_dataset("folder", root, "train", size=(8, 9), grayscale=True)
    _check(tr, 3, (1, 8, 9), num_classes=2)
    assert tr.labels.tolist() == [0, 0, 1]
    assert float(tr.images[0].min()) == 1.0 and float(tr.images[1].max()) < 0.05
    te = load_dataset("folder", root, "test", size=8)
    _check(te, 1, (3, 8, 8), num_classes=2)
    assert te.labels.tolist() == [1] and te.classes == ["a", "b"]
    assert te.images[0, 0].min() == 1.0 and te.images[0, 1].max() == 0.0


def test_folder_errors(tmp_path, image_folder):
    with pytest.raises(AdvlabError, match="pass size="):
        _png(image_folder / "dog" / "big.png", (9, 9), (1, 2, 3))
        load_dataset("folder", image_folder, "all")
    (image_folder / "owl" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    with pytest.raises(AdvlabError, match="unreadable image .*broken.png"):
        load_dataset("folder", image_folder, "all", size=(4, 4))
    (tmp_path / "e" / "empty_class").mkdir(parents=True)
    _png(tmp_path / "e" / "full" / "x.png", (2, 2), (0, 0, 0))
    with pytest.raises(AdvlabError, match="empty_class holds no images"):
        load_dataset("folder", tmp_path / "e")
    (tmp_path / "flat").mkdir()
    _png(tmp_path / "flat.png", (2, 2), (0, 0, 0))
    with pytest.raises(AdvlabError, match="no class subfolders"):
        load_dataset("folder", tmp_path / "flat")
    with pytest.raises(AdvlabError, match="needs root"):
        load_dataset("folder")
    with pytest.raises(AdvlabError, match="size must be"):
        load_dataset("folder", image_folder, size=(0, 3))
    with pytest.raises(AdvlabError, match="test_fraction"):
        load_dataset("folder", image_folder, test_fraction=1.0)


# ---------------------------------------------------------------- real data (../shared)

def _balance(ds):
    return torch.bincount(ds.labels, minlength=10).tolist()


def test_real_mnist_10k(mnist_root):
    train, test = load_dataset("mnist", mnist_root, "train"), load_dataset("mnist", mnist_root, "test")
    _check(train, 8000, (1, 28, 28))
    _check(test, 2000, (1, 28, 28))
    assert float(train.images.max()) == 1.0 and float(train.images.min()) == 0.0
    assert min(_balance(train)) > 0 and min(_balance(test)) > 0
    assert 0.10 < float(train.images.mean()) < 0.16  # MNIST's mean pixel is about 0.13


def test_real_fashion_mnist(fashion_root):
    train, test = load_dataset("fashion-mnist", fashion_root, "train"), load_dataset("fashion-mnist", fashion_root, "test")
    _check(train, 60000, (1, 28, 28))
    _check(test, 10000, (1, 28, 28))
    assert _balance(train) == [6000] * 10 and _balance(test) == [1000] * 10
    assert train.classes[9] == "Ankle boot"
