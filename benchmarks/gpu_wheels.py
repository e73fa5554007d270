"""Download the wheels that benchmarks/gpu_check.sh needs on a lent GPU and the GPU's image lacks, into .whl/.

    python benchmarks/gpu_wheels.py [--into .whl] [--python-version 3.12]

The lent machines' image (the device tool's KINDS.md) has torch, transformers, pytest, numpy, safetensors, tiktoken
and httpx, but not soundfile (every audio read) nor the `serve` extra's stack (fastapi and what it stands on:
step 7, `qwenaudio serve` under load). This takes them from the package index as wheels for the image's Python
(3.12, x86_64 manylinux), each at the version this checkout's own environment runs, so the GPU runs the stack the
tests ran: soundfile and the serve extra's requirements, with everything they require except numpy (the image's
torch is built against its own). .whl/ is ignored by git; the device tool carries it when `carry` names it, and the
command there installs it before the check (BENCHMARKS.md, "GPU", gives the whole command).
"""

from __future__ import annotations

import argparse
import importlib.metadata as metadata
import subprocess
import sys
from pathlib import Path

from packaging.requirements import Requirement
from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename

ROOT = Path(__file__).resolve().parents[1]
ROOTS = ["soundfile"]  # with the serve extra's requirements, read from qwenaudio's installed metadata
KEEP_THE_IMAGES = {"numpy"}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]


def serve_extra() -> list[str]:
    """The names the `serve` extra requires (setup.cfg, as installed)."""
    try:
        requirements = [Requirement(r) for r in metadata.requires("qwenaudio") or []]
    except metadata.PackageNotFoundError:
        raise SystemExit("qwenaudio is not installed in this Python: run this with the environment the tests run in "
                         "(./scripts/setup test makes .venv)") from None
    return [r.name for r in requirements if r.marker is not None and r.marker.evaluate({"extra": "serve"})]


def closure(names: list[str], python_version: str) -> dict[str, str]:
    """Each name and everything it requires (no extras; markers evaluated for the target Python), with the version
    installed here: name -> version."""
    found: dict[str, str] = {}
    todo = list(names)
    environment = {"python_version": python_version, "extra": ""}
    while todo:
        name = todo.pop()
        key = canonicalize_name(name)
        if key in found or key in KEEP_THE_IMAGES:
            continue
        try:
            found[key] = metadata.version(name)
        except metadata.PackageNotFoundError:
            raise SystemExit(f"{name} is required on Python {python_version} but not installed here, so its version "
                             "is unknown: run this from the environment the tests run in") from None
        for text in metadata.requires(name) or []:
            requirement = Requirement(text)
            if requirement.marker is None or requirement.marker.evaluate(environment):
                todo.append(requirement.name)
    return found


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--into", type=Path, default=ROOT / ".whl", help="the folder the device tool carries")
    parser.add_argument("--python-version", default="3.12", help="the image's Python (KINDS.md)")
    args = parser.parse_args()
    pins = closure(ROOTS + serve_extra(), args.python_version)
    args.into.mkdir(parents=True, exist_ok=True)
    try:
        held = {wheel: parse_wheel_filename(wheel.name)[0] for wheel in args.into.glob("*.whl")}
    except InvalidWheelFilename as e:
        raise SystemExit(f"{args.into}: {e}; pip would refuse it on the GPU: move it out") from None
    for wheel, name in held.items():  # one version of each: two would stop the install there
        if name in pins:
            wheel.unlink()
    platforms = [flag for platform in PLATFORMS for flag in ("--platform", platform)]
    done = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                           "--python-version", args.python_version, "--implementation", "cp", *platforms,
                           "-d", str(args.into), *(f"{name}=={version}" for name, version in sorted(pins.items()))])
    if done.returncode:
        raise SystemExit(f"pip download failed (exit {done.returncode}, above): {args.into} may hold only some wheels")
    wheels = sorted(args.into.glob("*.whl"))
    size = sum(wheel.stat().st_size for wheel in wheels) / 2**20
    print(f"{len(wheels)} wheels, {size:.1f} MiB, in {args.into}: {', '.join(f'{n}=={v}' for n, v in sorted(pins.items()))}")


if __name__ == "__main__":
    main()
