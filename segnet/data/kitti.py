"""Get the KITTI road data (data_road.zip) into data/kitti/ and check it.

    python -m segnet.data.kitti prepare --zip data_road.zip     # the archive from the KITTI website
    python -m segnet.data.kitti prepare --url URL                # a download link you were given

KITTI needs a registration to download, so segnet never fetches it on its own.
"""

import argparse
import sys
import urllib.request
import zipfile
from pathlib import Path

from segnet import errors
from segnet.data import check
from segnet.errors import DatasetError

# data_road as released: images per category.
EXPECTED = {
    "training": {"um": 95, "umm": 96, "uu": 98},
    "testing": {"um": 96, "umm": 94, "uu": 100},
}


def download(url: str, dest: Path) -> Path:
    """Download with a progress bar on stderr, through a temporary name so a broken transfer leaves nothing."""
    tmp = dest.with_name(dest.name + ".part")
    try:
        r = urllib.request.urlopen(url)
    except (OSError, ValueError) as e:
        raise errors.UserError(f"{url}: cannot download ({e}); check the link, or download it and pass --zip") from None
    with r, open(tmp, "wb") as f:
        total, done = int(r.headers.get("Content-Length") or 0), 0
        while chunk := r.read(1 << 20):
            f.write(chunk)
            done += len(chunk)
            bar = f"{done / total:6.1%}" if total else ""
            print(f"\rdownloading {dest.name}: {done >> 20} MiB {bar}", end="", file=sys.stderr)
    print(file=sys.stderr)
    tmp.replace(dest)
    return dest


def unpack(zip_path: Path, out: Path) -> Path:
    """Extract into out/ and return the data_road folder (the one holding training/)."""
    out.mkdir(parents=True, exist_ok=True)
    try:
        z = zipfile.ZipFile(zip_path)
    except zipfile.BadZipFile as e:
        raise DatasetError(f"{zip_path}: not a zip archive ({e}); download data_road.zip again") from None
    with z:
        for member in z.namelist():
            target = (out / member).resolve()
            if not target.is_relative_to(out.resolve()):  # a crafted archive must not write outside out/
                raise DatasetError(f"{zip_path}: refusing member {member!r} outside {out}")
        z.extractall(out)
    roots = sorted(p.parent for p in out.glob("**/training/image_2"))
    if not roots:
        raise DatasetError(f"{zip_path} holds no training/image_2: is it KITTI's data_road.zip?")
    return roots[0].parent if roots[0].name == "training" else roots[0]


def prepare(zip_path=None, url=None, out="data/kitti") -> tuple[Path, list[str]]:
    out = Path(out)
    if url:
        out.mkdir(parents=True, exist_ok=True)
        zip_path = download(url, out / "data_road.zip")
    if zip_path is None or not Path(zip_path).is_file():
        raise FileNotFoundError(f"{zip_path}: no such archive; download data_road.zip from the KITTI road page")
    root = unpack(Path(zip_path), out)
    counts, problems = check(root)
    for split, cats in EXPECTED.items():
        for cat, n in cats.items():
            got = counts.get(split, {}).get(cat, 0)
            if got != n:
                problems.append(f"{root / split / 'image_2'}: {got} {cat} images, data_road has {n}")
    return root, problems


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m segnet.data.kitti", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prepare", help="unpack (or download and unpack) data_road.zip and check it")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--zip", type=Path, help="data_road.zip you downloaded")
    src.add_argument("--url", help="a download link for data_road.zip")
    p.add_argument("--out", type=Path, default=Path("data/kitti"))
    p.add_argument("--debug", action="store_true", help="show the full traceback of an error")
    args = ap.parse_args(argv)
    with errors.reported(args.debug):
        root, problems = prepare(args.zip, args.url, args.out)
    for problem in problems:
        print(f"problem: {problem}")
    print(f"data_road is in {root}: train with `python train.py dataset=kitti dataset.root={root}`")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
