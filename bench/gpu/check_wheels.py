"""Check carried wheels against the packages already installed, before any GPU time is spent.

    python bench/gpu/check_wheels.py .whl        # exit 0: every requirement is met

The GPU machine has no network: the wheels in .whl/ are installed with `pip --no-deps`, which
checks nothing. So a carried package whose requirement the machine's preinstalled packages do
not meet (a too-old pyarrow for datasets, an fsspec pin, a huggingface_hub range) would only
fail at import, minutes into the run. This reads every wheel's METADATA and checks each of its
requirements (markers evaluated for this interpreter; extras ignored) against the carried wheels
first (they are installed in front of everything) and the installed distributions otherwise.
It prints one line per finding and exits 2 when a requirement is missing altogether or two
versions of one package are carried (pip would fail, or the import would). A version outside a
wheel's declared range is reported but not fatal: packages often work beyond their pins, so
acceptance.sh then lets an import of everything the run needs decide, and the report says which
wheel to carry if it fails.
"""

from __future__ import annotations

import argparse
import sys
import zipfile
from email.parser import Parser
from importlib import metadata
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version


def wheel_metadata(path: Path) -> tuple[str, str, list[str]]:
    """(name, version, Requires-Dist lines) from a wheel's *.dist-info/METADATA."""
    with zipfile.ZipFile(path) as zf:
        name = next(n for n in zf.namelist() if n.endswith(".dist-info/METADATA"))
        msg = Parser().parsestr(zf.read(name).decode("utf-8"))
    return msg["Name"], msg["Version"], msg.get_all("Requires-Dist") or []


def installed_version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def problems(wheels: list[Path], installed=installed_version) -> tuple[list[str], list[str]]:
    """(fatal, out_of_range): the carried wheels' unmet requirements, one line each."""
    carried: dict[str, tuple[str, Path]] = {}
    out: list[str] = []
    ranges: list[str] = []
    reqs: list[tuple[str, Requirement]] = []
    for path in wheels:
        name, version, requires = wheel_metadata(path)
        key = canonicalize_name(name)
        if key in carried:
            out.append(f"{name}: two wheels ({carried[key][1].name}, {path.name}); keep one")
        carried[key] = (version, path)
        reqs += [(f"{name} {version}", Requirement(line)) for line in requires]
    for who, req in reqs:
        if req.marker is not None and not req.marker.evaluate({"extra": ""}):
            continue  # an optional extra, or another Python/platform
        key = canonicalize_name(req.name)
        if key in carried:
            have, where = carried[key][0], "carried"
        else:
            have, where = installed(req.name), "installed"
        if have is None:
            out.append(f"{who} needs {req}: not installed and not carried; add its wheel")
        elif req.specifier and not req.specifier.contains(Version(have), prereleases=True):
            ranges.append(f"{who} needs {req}: {where} version is {have}; carry a wheel that fits")
    return out, ranges


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="the folder of wheels (.whl)")
    args = parser.parse_args(argv)
    wheels = sorted(args.folder.glob("*.whl"))
    if not wheels:
        print(f"no wheels in {args.folder}: run bench/gpu/fetch_wheels.sh where PyPI is reachable")
        return 2
    fatal, ranges = problems(wheels)
    for line in fatal:
        print(f"wheel check: ERROR {line}")
    for line in ranges:
        print(f"wheel check: WARNING {line}")
    print(f"wheel check: {len(wheels)} wheels, {len(fatal)} error(s), {len(ranges)} version warning(s)")
    return 2 if fatal else 0


if __name__ == "__main__":
    sys.exit(main())
