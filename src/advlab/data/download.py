"""Official dataset files and checked downloads.

``SOURCES`` lists, per dataset, the official file names, their mirrors and their checksums.
``download_file`` fetches one URL (``http(s)://`` or ``file://``) into a temporary file beside
the destination while hashing it, checks SHA-256 / MD5, and only then renames it into place, so a
failed or corrupt download never leaves a file behind.

Files already present in a dataset folder are used as they are, without a checksum: a folder the
user fills by hand may hold a subset in the official format (``../shared/data/mnist-10k`` is one).
Only what ``download=True`` fetches is verified.

Mirrors: ``mirrors=[...]`` (argument) or the environment variable ``ADVLAB_MIRROR`` (base URLs or
local folders, separated by whitespace or commas) replace the official mirror list; the file name
is appended to each base.
"""

from __future__ import annotations

import hashlib
import os
import sys
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .._util import AdvlabError, atomic_path, unknown_name

ENV_MIRROR = "ADVLAB_MIRROR"
ENV_DATA = "ADVLAB_DATA"


@dataclass(frozen=True)
class RemoteFile:
    """One official file: its name and the checksums known for it (hex digests, or None)."""

    name: str
    sha256: Optional[str] = None
    md5: Optional[str] = None


@dataclass(frozen=True)
class Source:
    """Where a dataset's official files come from: mirror base URLs and the files of each split."""

    mirrors: Tuple[str, ...]
    files: Dict[str, Tuple[RemoteFile, ...]] = field(default_factory=dict)
    homepage: str = ""


# Checksums. SHA-256 and MD5 are both recorded where both are published; downloads verify every
# digest recorded. MNIST and Fashion-MNIST SHA-256 match tensorflow-datasets' url_checksums and
# the MD5 the ones torchvision checks (Fashion-MNIST's MD5 are also in its README). CIFAR-10: MD5
# from the CIFAR page / torchvision, SHA-256 of the same tarball. SVHN: SHA-256 from
# tensorflow-datasets, MD5 from torchvision.
_MNIST_FILES = {
    "train": (
        RemoteFile("train-images-idx3-ubyte.gz",
                   "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
                   "f68b3c2dcbeaaa9fbdd348bbdeb94873"),
        RemoteFile("train-labels-idx1-ubyte.gz",
                   "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
                   "d53e105ee54ea40749a09fcbcd1e9432"),
    ),
    "test": (
        RemoteFile("t10k-images-idx3-ubyte.gz",
                   "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
                   "9fb629c4189551a2d022fa330f9573f3"),
        RemoteFile("t10k-labels-idx1-ubyte.gz",
                   "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
                   "ec29112dd5afa0611ce80d1b7f02629c"),
    ),
}

_FASHION_FILES = {
    "train": (
        RemoteFile("train-images-idx3-ubyte.gz",
                   "3aede38d61863908ad78613f6a32ed271626dd12800ba2636569512369268a84",
                   "8d4fb7e6c68d591d4c3dfef9ec88bf0d"),
        RemoteFile("train-labels-idx1-ubyte.gz",
                   "a04f17134ac03560a47e3764e11b92fc97de4d1bfaf8ba1a3aa29af54cc90845",
                   "25c81989df183df01b3e8a0aad5dffbe"),
    ),
    "test": (
        RemoteFile("t10k-images-idx3-ubyte.gz",
                   "346e55b948d973a97e58d2351dde16a484bd415d4595297633bb08f03db6a073",
                   "bef4ecab320f06d8554ea6380940ec79"),
        RemoteFile("t10k-labels-idx1-ubyte.gz",
                   "67da17c76eaffca5446c3361aaab5c3cd6d1c2608764d35dfb1850b086bf8dd5",
                   "bb300cfdad3c16e7a12a480ee83cd310"),
    ),
}

CIFAR10_TARBALL = RemoteFile("cifar-10-python.tar.gz",
                             "6d958be074577803d12ecdefd02955f39262c83c16fe9348329d7fe0b5c001ce",
                             "c58f30108f718f92721af3b95e74349a")

SOURCES: Dict[str, Source] = {
    "mnist": Source(
        mirrors=("https://ossci-datasets.s3.amazonaws.com/mnist/",
                 "https://storage.googleapis.com/cvdf-datasets/mnist/"),
        files=_MNIST_FILES,
        homepage="http://yann.lecun.com/exdb/mnist/",
    ),
    "fashion-mnist": Source(
        mirrors=("http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/",),
        files=_FASHION_FILES,
        homepage="https://github.com/zalandoresearch/fashion-mnist",
    ),
    "cifar10": Source(
        mirrors=("https://www.cs.toronto.edu/~kriz/",),
        files={"train": (CIFAR10_TARBALL,), "test": (CIFAR10_TARBALL,)},
        homepage="https://www.cs.toronto.edu/~kriz/cifar.html",
    ),
    "svhn": Source(
        mirrors=("http://ufldl.stanford.edu/housenumbers/",),
        files={
            "train": (RemoteFile("train_32x32.mat",
                                 "435e94d69a87fde4fd4d7f3dd208dfc32cb6ae8af2240d066de1df7508d083b8",
                                 "e26dedcc434d2e4c54c9b2d4a06d8373"),),
            "test": (RemoteFile("test_32x32.mat",
                                "cdce80dfb2a2c4c6160906d0bd7c68ec5a99d7ca4831afa54f09182025b6a75b",
                                "eb5a983be6a315427106f1b164d9cef3"),),
            "extra": (RemoteFile("extra_32x32.mat",
                                 "a133a4beb38a00fcdda90c9489e0c04f900b660ce8a316a5e854838379a71eb3",
                                 "a93ce644f1a588dc4d68dda5feec44a7"),),
        },
        homepage="http://ufldl.stanford.edu/housenumbers/",
    ),
}

#: Official IDX file names per dataset and split (kept for code that used the first version).
IDX_FILES: Dict[str, Dict[str, List[str]]] = {
    name: {split: [f.name for f in files] for split, files in SOURCES[name].files.items()}
    for name in ("mnist", "fashion-mnist")
}


def default_root(name: str) -> Path:
    """Default folder of a dataset's files: ``$ADVLAB_DATA/<name>``, else ``~/.cache/advlab/<name>``."""
    base = os.environ.get(ENV_DATA)
    return (Path(base) if base else Path.home() / ".cache" / "advlab").expanduser() / name


def file_digest(path: str | os.PathLike, algorithm: str = "sha256") -> str:
    """Hex digest of a file, read in 1 MiB chunks."""
    h = hashlib.new(algorithm, usedforsecurity=False)
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _compare(what: str, got: Dict[str, str], sha256: Optional[str], md5: Optional[str]) -> None:
    for algo, want in (("sha256", sha256), ("md5", md5)):
        if want is not None and got[algo] != want.lower():
            raise AdvlabError(f"checksum mismatch for {what}: {algo} expected {want.lower()}, got {got[algo]}")


def verify_file(path: str | os.PathLike, sha256: Optional[str] = None, md5: Optional[str] = None) -> Path:
    """Check a file's SHA-256 and/or MD5 (those given, hex strings) and return its path; raise
    ``AdvlabError`` naming the file when it is missing or a digest does not match.

    ``path``: the file; ``sha256``, ``md5``: expected hex digests (None: not checked)."""
    path = Path(path)
    if not path.is_file():
        raise AdvlabError(f"file not found: {path}")
    got = {algo: (file_digest(path, algo) if want is not None else "")
           for algo, want in (("sha256", sha256), ("md5", md5))}
    _compare(str(path), got, sha256, md5)
    return path


def _show_progress(progress: Optional[bool]) -> bool:
    if progress is None:
        return sys.stderr.isatty() and not os.environ.get("ADVLAB_QUIET")
    return bool(progress)


def download_file(url: str, dest: str | os.PathLike, sha256: Optional[str] = None, md5: Optional[str] = None,
                  timeout: float = 60.0, progress: Optional[bool] = None) -> Path:
    """Download ``url`` to ``dest`` and return ``dest``.

    The bytes go to a temporary file in ``dest``'s folder while SHA-256 and MD5 are computed;
    when a given checksum does not match, the temporary file is deleted and AdvlabError is
    raised, otherwise it is renamed onto ``dest``. Works for ``http(s)://`` and ``file://``.
    Unreachable hosts, HTTP errors and timeouts raise AdvlabError naming the URL.
    ``progress`` shows a tqdm bar (default: when stderr is a terminal and ADVLAB_QUIET is unset).

    ``sha256``, ``md5``: the expected hex digests (None: not checked); ``timeout``: seconds per request.
    """
    dest = Path(dest)
    if timeout is None or not (float(timeout) > 0):
        raise AdvlabError(f"timeout must be > 0 seconds, got {timeout}")
    hashes = {"sha256": hashlib.sha256(), "md5": hashlib.md5(usedforsecurity=False)}
    try:
        with urllib.request.urlopen(url, timeout=float(timeout)) as resp, atomic_path(dest) as tmp:
            total = resp.headers.get("Content-Length") if getattr(resp, "headers", None) else None
            from tqdm.auto import tqdm

            with open(tmp, "wb") as fh, tqdm(total=int(total) if total and total.isdigit() else None, unit="B",
                                              unit_scale=True, desc=dest.name, leave=False, file=sys.stderr,
                                              disable=not _show_progress(progress)) as bar:
                for chunk in iter(lambda: resp.read(1 << 20), b""):
                    fh.write(chunk)
                    for h in hashes.values():
                        h.update(chunk)
                    bar.update(len(chunk))
                fh.flush()
                os.fsync(fh.fileno())
            _compare(url, {a: h.hexdigest() for a, h in hashes.items()}, sha256, md5)
    except AdvlabError as e:
        raise AdvlabError(f"{e}; nothing was written to {dest}") from None
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        raise AdvlabError(f"could not download {url}: {reason}") from None
    return dest


def _parse_mirrors(value) -> List[str]:
    if value is None:
        return []
    if isinstance(value, (str, os.PathLike)):
        value = str(value).replace(",", " ").split()
    return [str(v) for v in value if str(v).strip()]


def mirrors_for(name: str, mirrors: Sequence[str] | str | None = None) -> List[str]:
    """Mirror base URLs for dataset ``name``: ``mirrors`` if given, else ``$ADVLAB_MIRROR`` if set,
    else the official list. A base without a URL scheme is a local folder."""
    if name not in SOURCES:
        raise unknown_name("downloadable dataset", name, SOURCES)
    chosen = _parse_mirrors(mirrors) or _parse_mirrors(os.environ.get(ENV_MIRROR)) or list(SOURCES[name].mirrors)
    return chosen


def file_url(base: str, filename: str) -> str:
    """URL of ``filename`` under mirror ``base`` (a URL, or a local folder turned into ``file://``)."""
    if "://" not in base:
        base = Path(base).expanduser().resolve().as_uri()
    return base.rstrip("/") + "/" + filename


def fetch_file(name: str, remote: RemoteFile, root: Path, mirrors=None, timeout: float = 60.0,
               progress: Optional[bool] = None) -> Path:
    """Download one official file of dataset ``name`` into ``root``, trying each mirror in turn;
    every checksum recorded for it is verified. Raise AdvlabError listing what was tried."""
    errors = []
    for base in mirrors_for(name, mirrors):
        url = file_url(base, remote.name)
        try:
            return download_file(url, Path(root) / remote.name, sha256=remote.sha256, md5=remote.md5,
                                 timeout=timeout, progress=progress)
        except AdvlabError as e:
            errors.append(str(e))
    raise AdvlabError(
        f"could not download {name} file {remote.name} into {root}:\n  " + "\n  ".join(errors) +
        f"\nDownload it by hand (home page {SOURCES[name].homepage}) and put it in {root}, "
        f"or set {ENV_MIRROR} (or --mirror) to a mirror or local folder that holds it")


def split_files(name: str, split: str) -> Tuple[RemoteFile, ...]:
    src = SOURCES.get(name)
    if src is None:
        raise unknown_name("downloadable dataset", name, SOURCES)
    if split not in src.files:
        raise AdvlabError(f"split must be one of {', '.join(src.files)} for {name}, got {split!r}")
    return src.files[split]


def _present(root: Path, filename: str) -> Optional[Path]:
    """The file as given, or for IDX files its decompressed twin (``x-ubyte.gz`` -> ``x-ubyte``)."""
    for candidate in (root / filename, root / filename[:-3] if filename.endswith("-ubyte.gz") else None):
        if candidate is not None and candidate.is_file():
            return candidate
    return None


def ensure_files(name: str, root: str | os.PathLike, split: str, download: bool = False, mirrors=None,
                 timeout: float = 60.0, progress: Optional[bool] = None) -> List[Path]:
    """Paths of the official files of ``name``/``split`` in ``root`` (a ``.gz`` file may also be
    present decompressed, for IDX). Missing files are downloaded and verified when ``download`` is true;
    otherwise AdvlabError says which files are missing, where they come from and where to put them."""
    root = Path(root)
    remotes = split_files(name, split)
    found = {r.name: _present(root, r.name) for r in remotes}
    missing = [r for r in remotes if found[r.name] is None]
    if missing and not download:
        urls = [file_url(mirrors_for(name, mirrors)[0], r.name) for r in missing]
        raise AdvlabError(
            f"{name} {split} files missing in {root}: {', '.join(r.name for r in missing)}; "
            f"put the official files there (from {', '.join(urls)}) or pass download=True (--download)")
    for r in missing:
        root.mkdir(parents=True, exist_ok=True)
        try:
            found[r.name] = fetch_file(name, r, root, mirrors=mirrors, timeout=timeout, progress=progress)
        except AdvlabError as e:
            left = [m.name for m in missing if found[m.name] is None]
            raise AdvlabError(f"{e}\n{name} {split} files still missing in {root}: {', '.join(left)}") from None
    return [found[r.name] for r in remotes]

