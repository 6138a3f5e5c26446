"""Drops folders from a wheel (and their RECORD rows), in place: bench/gpu_wheels.sh strips
Ray's Java jar and dashboard front end (31 MiB) so Ray fits what a device call carries.

    python bench/strip_wheel.py WHEEL PREFIX [PREFIX ...]
"""

from __future__ import annotations

import csv
import io
import os
import sys
import zipfile


def strip(path: str, drop: tuple[str, ...]) -> int:
    """Files removed (0: none matched, the wheel is left as it was)."""
    with zipfile.ZipFile(path) as src:
        infos = src.infolist()
        keep = [i for i in infos if not i.filename.startswith(drop)]
        if len(keep) == len(infos):
            return 0
        tmp = path + ".tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as out:
            for info in keep:
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    rows = csv.reader(io.StringIO(data.decode()))
                    buf = io.StringIO()
                    csv.writer(buf, lineterminator="\n").writerows(
                        r for r in rows if r and not r[0].startswith(drop)
                    )
                    data = buf.getvalue().encode()
                out.writestr(info, data)  # the ZipInfo keeps each file's mode bits
    os.replace(tmp, path)
    return len(infos) - len(keep)


if __name__ == "__main__":
    removed = strip(sys.argv[1], tuple(sys.argv[2:]))
    print(f"{sys.argv[1]}: {removed} files under {' '.join(sys.argv[2:])} removed")
