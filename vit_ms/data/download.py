"""The MindSpore ViT tutorial's dataset (an ImageNet subset): downloaded once, checked and extracted safely."""
from __future__ import annotations

import logging
import os
import shutil
import stat
import tempfile
import zipfile
from pathlib import Path
from typing import List

from .files import DatasetError, default_data_root

logger = logging.getLogger(__name__)

TUTORIAL_URL = ("https://mindspore-website.obs.cn-north-4.myhuaweicloud.com/notebook/datasets/"
                "vit_imagenet_dataset.zip")
TUTORIAL_ARCHIVE = "vit_imagenet_dataset.zip"
TUTORIAL_DIR = "imagenet_subset"


def _safe_members(archive: zipfile.ZipFile, archive_path: Path) -> List[zipfile.ZipInfo]:
    """All members, after rejecting any that could write outside the extraction folder."""
    members = archive.infolist()
    for info in members:
        name = info.filename.replace("\\", "/")
        parts = [p for p in name.split("/") if p not in ("", ".")]
        mode = info.external_attr >> 16
        if name.startswith("/") or (len(name) > 1 and name[1] == ":") or ".." in parts:
            raise DatasetError(f"{archive_path} member {info.filename!r} would be written outside the target "
                               f"folder; refusing to extract this archive")
        kind = stat.S_IFMT(mode)  # 0 when the archiver stored no Unix file type (plain files)
        if kind and kind not in (stat.S_IFREG, stat.S_IFDIR):
            raise DatasetError(f"{archive_path} member {info.filename!r} is a link or special file; refusing "
                               f"to extract this archive")
    return members


def _extract_zip(archive_path: Path, dest: Path) -> None:
    """Extract into `dest` (which must exist) after checking every member, then verify every CRC."""
    try:
        with zipfile.ZipFile(archive_path) as archive:
            members = _safe_members(archive, archive_path)  # all checked before anything is written
            for info in members:
                parts = [p for p in info.filename.replace("\\", "/").split("/") if p not in ("", ".")]
                if not parts:
                    continue
                out = dest.joinpath(*parts)
                if info.is_dir():
                    out.mkdir(parents=True, exist_ok=True)
                    continue
                out.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(info) as src, open(out, "wb") as dst:  # open() checks the CRC at EOF
                    shutil.copyfileobj(src, dst, 1 << 20)
    except (zipfile.BadZipFile, EOFError, zipfile.LargeZipFile) as error:
        raise DatasetError(f"{archive_path} is not a complete zip archive ({error}); delete it and run again, "
                           f"or place a complete copy of {TUTORIAL_URL} there") from error


def download_tutorial_dataset(root=None, url: str = TUTORIAL_URL, timeout: float = 30.0,
                              progressbar: bool = True) -> Path:
    """The MindSpore ViT tutorial's ImageNet subset, downloaded and extracted once into ROOT/imagenet_subset.

    The archive is fetched with the `download` package into ROOT/vit_imagenet_dataset.zip (the package
    writes a `.part` file and renames it when the size matches), every member is checked (no `..`,
    absolute paths or links), the archive is extracted into a hidden temporary folder beside the target,
    and the {train,val,infer} folder is renamed into place only when extraction is complete. An archive
    placed there by hand is used without any network access.

    Args:
        root: the data root (default: `default_data_root()`: $VIT_MS_DATA, ./datasets, or the cache).
        url: where to fetch the archive (a mirror, or a local server in tests).
        timeout: seconds to wait for the server to answer.
        progressbar: show a download progress bar.

    Returns:
        ROOT/imagenet_subset, holding train/, val/ and infer/.

    Raises:
        DatasetError: the download failed (the message says where to place the archive by hand), or the
            archive is incomplete or unsafe.
    """
    root = Path(root).expanduser().resolve() if root is not None else default_data_root()
    target = root / TUTORIAL_DIR
    if (target / "train").is_dir():
        return target
    if target.exists():
        raise DatasetError(f"{target} exists but has no train/ folder; remove it and run again")
    root.mkdir(parents=True, exist_ok=True)
    archive = root / TUTORIAL_ARCHIVE
    downloaded = False
    if not archive.is_file():
        from download import download  # imported here: only this function needs it

        logger.info("downloading %s into %s", url, archive)
        try:
            download(url, str(archive), kind="file", replace=True, timeout=timeout, progressbar=progressbar,
                     verbose=progressbar)
        except Exception as error:  # the package wraps every failure in RuntimeError; name the fix
            raise DatasetError(f"could not download {url} ({str(error).splitlines()[-1]}). Without network, "
                               f"download it elsewhere and place it at {archive}, then run again") from error
        if not archive.is_file():
            raise DatasetError(f"download of {url} did not produce {archive}; place the archive there by hand")
        downloaded = True
    tmp = Path(tempfile.mkdtemp(prefix=f".{TUTORIAL_DIR}.tmp-", dir=root))
    try:
        logger.info("extracting %s", archive)
        tmp.chmod(0o755)
        _extract_zip(archive, tmp)
        # The archive holds dataset/{train,val,infer}; accept the splits at the top level too.
        candidates = [tmp] + sorted(p for p in tmp.iterdir() if p.is_dir())
        source = next((c for c in candidates if (c / "train").is_dir()), None)
        if source is None:
            raise DatasetError(f"{archive} has no train/ folder (top level: "
                               f"{sorted(p.name for p in tmp.iterdir())}); is it the tutorial's archive?")
        os.rename(source, target)
    except DatasetError:
        if downloaded:  # a broken download is useless; a hand-placed archive is the user's to delete
            archive.unlink(missing_ok=True)
        raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if downloaded:
        archive.unlink()  # the extracted copy is what the pipelines read; keep the disk usage single
    logger.info("tutorial dataset ready in %s", target)
    return target


__all__ = ["TUTORIAL_URL", "TUTORIAL_ARCHIVE", "TUTORIAL_DIR", "download_tutorial_dataset"]
