"""Install a role's PEX as a slim venv inside an image build, with only the base's Python.

`python3.11 install_venv.py PEX VENV [--keep-source PKG ...]`, in the build stage: the PEX
becomes a venv (`PEX_TOOLS=1 PEX venv VENV`), so a cold start unzips nothing; then

- third-party modules become sourceless bytecode (``module.pyc`` beside where ``module.py`` was):
  a read-only root filesystem cannot cache bytecode, and source plus bytecode would double the
  size. Tracebacks through them keep file, line and function, without the source line;
- the packages named by ``--keep-source`` (ours) keep their source and get compiled bytecode
  in ``__pycache__``, so their tracebacks show the code, and Alembic finds our migrations;
- type stubs, C and Cython sources are dropped, and so is the tzdata package when the base
  has the system's time zones;
- shared objects lose what the loader never reads (debug sections, symbol tables, section
  headers), as ``sstrip`` does: the file is cut after its last loadable byte.

Prints the venv's size before and after.
"""

from __future__ import annotations

import argparse
import os
import py_compile
import shutil
import struct
import subprocess
import sys
from pathlib import Path

DROPPED_SUFFIXES = {".pyi", ".pyx", ".pxd", ".c", ".h"}
ELF_MAGIC = b"\x7fELF"


def tree_size(root: Path) -> int:
    """Bytes in the regular files under root."""
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file() and not p.is_symlink())


def site_packages(venv: Path) -> Path:
    """The venv's one site-packages folder."""
    (found,) = venv.glob("lib/python3.*/site-packages")
    return found


def is_kept(path: Path, site: Path, keep: set[str]) -> bool:
    """Whether path belongs to a top-level package whose source stays."""
    return path.relative_to(site).parts[0] in keep


def compile_modules(site: Path, keep: set[str]) -> None:
    """Bytecode for every module: sourceless for third-party code, cached for ours."""
    for cache in [p for p in site.rglob("__pycache__") if p.is_dir()]:
        shutil.rmtree(cache)
    for source in sorted(site.rglob("*.py")):
        kept = is_kept(source, site, keep)
        py_compile.compile(
            str(source),
            cfile=None if kept else str(source.with_suffix(".pyc")),
            dfile=str(source),
            doraise=True,
            # Hash-based and unchecked: the same bytes on every build, no stat of the source.
            invalidation_mode=py_compile.PycInvalidationMode.UNCHECKED_HASH,
        )
        if not kept:
            source.unlink()


def loadable_end(data: bytes) -> int | None:
    """End of the last byte a loader maps from this 64-bit little-endian ELF file, else None."""
    if data[:4] != ELF_MAGIC or data[4] != 2 or data[5] != 1:
        return None
    phoff, _shoff = struct.unpack_from("<QQ", data, 0x20)
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    end = int(phoff + phentsize * phnum)
    for index in range(phnum):
        entry = phoff + index * phentsize
        offset, _vaddr, _paddr, filesz = struct.unpack_from("<QQQQ", data, entry + 8)
        end = max(end, offset + filesz)
    return end


def strip_shared_object(path: Path) -> None:
    """Cut a shared object after its last loadable byte and drop its section header table."""
    data = path.read_bytes()
    end = loadable_end(data)
    if end is None or end >= len(data):
        return
    head = bytearray(data[:end])
    # e_shoff, then e_shnum and e_shstrndx: no section headers any more.
    struct.pack_into("<Q", head, 0x28, 0)
    struct.pack_into("<HH", head, 0x3C, 0, 0)
    path.write_bytes(bytes(head))


def slim(venv: Path, keep: set[str]) -> None:
    """Slim the venv in place (see the module's docstring)."""
    site = site_packages(venv)
    for path in [p for p in site.rglob("*") if p.is_file() and p.suffix in DROPPED_SUFFIXES]:
        path.unlink()
    # zoneinfo reads the system's time zones first: the tzdata package is a second copy.
    if Path("/usr/share/zoneinfo/UTC").is_file() and (site / "tzdata").is_dir():
        shutil.rmtree(site / "tzdata")
    compile_modules(site, keep)
    for path in site.rglob("*.so*"):
        if path.is_file() and not path.is_symlink():
            strip_shared_object(path)


def main(argv: list[str] | None = None) -> int:
    """Command line: install one PEX as a slim venv."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("pex", type=Path)
    parser.add_argument("venv", type=Path)
    parser.add_argument("--keep-source", nargs="*", default=[], metavar="PKG")
    args = parser.parse_args(argv)
    subprocess.run(
        [sys.executable, str(args.pex), "venv", str(args.venv)],
        env={**os.environ, "PEX_TOOLS": "1"},
        check=True,
    )
    before = tree_size(args.venv)
    slim(args.venv, set(args.keep_source))
    after = tree_size(args.venv)
    print(f"{args.venv}: {before / 1e6:.1f} MB -> {after / 1e6:.1f} MB", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
