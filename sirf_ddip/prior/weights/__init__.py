"""Prior weights on disk (this package folder also holds the shipped ``default.*`` weights): a safetensors file plus a JSON card that says exactly what they are.

Files
-----
``NAME.safetensors``
    The network's state dict (no LoRA tensors). Stored as float16 by default (halves the size; the network
    is evaluated in float32 after loading — the fp16 rounding of weights, relative 5e-4, changes the
    predicted ε by far less than the training error). ``dtype="float32"`` stores full precision.
``NAME.card.json``
    ``format`` (``sirf_ddip-prior/1``), ``architecture`` (for :func:`~sirf_ddip.prior.network.build_network`),
    ``schedule`` (:meth:`NoiseSchedule.to_dict`), ``pet_scaling`` / ``mr_scaling`` (unfitted scaler specs),
    ``training`` (data description, steps, config, timing), ``weights_file``, ``weights_sha256``,
    ``weights_dtype``, ``num_parameters``, ``created``, ``versions``.

The SHA-256 of the safetensors file is checked on every load; a mismatch (corrupt or swapped file) is an
:class:`~sirf_ddip.errors.InputFileError`.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ...errors import ConfigError, InputFileError
from ...utils.atomic import atomic_path, write_text
from ...utils.provenance import check_output, versions
from ..network import ScoreNetwork, build_network
from ..scaling import MRScaler, PETScaler
from ..schedule import NoiseSchedule

FORMAT = "sirf_ddip-prior/1"
DEFAULT_DIR = Path(__file__).resolve().parent  # this package folder holds the shipped default weights
DEFAULT_NAME = "default"
#: priors shipped with the package, by name (usable wherever a weights path is accepted, e.g. ``--weights no-mr``)
SHIPPED_PRIORS = {"default": "default", "no-mr": "no_mr", "default-no-mr": "no_mr"}


def shipped_prior_names() -> list[str]:
    """Names of the shipped priors whose files are installed."""
    return [n for n, stem in SHIPPED_PRIORS.items() if (DEFAULT_DIR / f"{stem}.safetensors").is_file()]


@dataclass
class PriorBundle:
    """A loaded prior: network (eval mode, float32), schedule, unfitted scalers and the card."""

    network: ScoreNetwork
    schedule: NoiseSchedule
    pet_scaling: PETScaler
    mr_scaling: MRScaler | None
    card: dict[str, Any] = field(default_factory=dict)
    path: Path | None = None

    @property
    def uses_mr(self) -> bool:
        return self.network.uses_mr

    @property
    def mr_scaler_spec(self) -> dict[str, Any] | None:
        return None if self.mr_scaling is None else self.mr_scaling.to_dict()

    def to(self, device) -> "PriorBundle":
        self.network.to(device)
        return self


def sha256_file(path: str | Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def card_path_for(weights_path: str | Path) -> Path:
    p = Path(weights_path)
    return p.with_name(p.name[: -len(".safetensors")] + ".card.json") if p.name.endswith(".safetensors") \
        else p.with_name(p.name + ".card.json")


def save_prior(path: str | Path, network: ScoreNetwork, schedule: NoiseSchedule, pet_scaling: PETScaler,
               mr_scaling: MRScaler | None, training: dict[str, Any] | None = None, dtype: str = "float16",
               overwrite: bool = False, state_dict: dict[str, torch.Tensor] | None = None) -> Path:
    """Write ``path`` (``*.safetensors``) and its card ``*.card.json``.

    Parameters
    ----------
    path : path ending in ``.safetensors``
    network : ScoreNetwork
        Its ``arch`` goes in the card; its weights are saved unless ``state_dict`` is given (e.g. EMA weights).
    schedule, pet_scaling, mr_scaling
        Recorded in the card (scalers unfitted: method and parameters).
    training : dict, optional
        Free-form description (data, steps, config, time, machine).
    dtype : "float16" or "float32"
        Storage precision.
    overwrite : bool

    Returns
    -------
    Path of the card.
    """
    from safetensors.torch import save_file

    path = Path(path)
    if not path.name.endswith(".safetensors"):
        raise ConfigError(f"save_prior: {path}: weights file name must end with .safetensors")
    if dtype not in ("float16", "float32"):
        raise ConfigError(f"save_prior: dtype must be 'float16' or 'float32', got {dtype!r}")
    if network.uses_mr and mr_scaling is None:  # before anything is written
        raise ConfigError("save_prior: the network uses MR but no MR scaling was given")
    card_path = card_path_for(path)
    check_output(path, overwrite)
    check_output(card_path, overwrite)
    sd = state_dict if state_dict is not None else network.state_dict()
    if any("lora_" in k for k in sd):
        from ..adapters import base_state_dict

        sd = base_state_dict(network) if state_dict is None else {k: v for k, v in sd.items() if "lora_" not in k}
    tdt = torch.float16 if dtype == "float16" else torch.float32
    tensors = {k: v.detach().to("cpu", tdt if v.is_floating_point() else v.dtype).contiguous() for k, v in sd.items()}
    with atomic_path(path) as tmp:  # a temporary name, renamed when complete
        save_file(tensors, str(tmp), metadata={"format": FORMAT})
    card = {
        "format": FORMAT,
        "architecture": dict(network.arch),
        "schedule": schedule.to_dict(),
        **scaling_card_entries(pet_scaling, mr_scaling),
        "training": training or {},
        "weights_file": path.name,
        "weights_sha256": sha256_file(path),
        "weights_dtype": dtype,
        "num_parameters": int(sum(v.numel() for v in sd.values() if v.is_floating_point())),
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": versions(),
    }
    write_text(card_path, json.dumps(card, indent=2, default=str))
    return card_path


def scaling_card_entries(pet_scaling, mr_scaling) -> dict[str, Any]:
    """The card's ``pet_scaling`` / ``mr_scaling`` entries (unfitted specs, tagged with their kind).

    One definition for :func:`save_prior`, which writes them, and for checks that compare a config with a
    card (``prior.train.initial_prior``).
    """
    return {"pet_scaling": {"kind": "pet", **pet_scaling.spec_unfitted()},
            "mr_scaling": None if mr_scaling is None else {"kind": "mr", **mr_scaling.spec_unfitted()}}


def _resolve(path_or_dir: str | Path) -> tuple[Path, Path]:
    p = Path(path_or_dir)
    if not p.exists() and str(path_or_dir) in SHIPPED_PRIORS:  # a shipped prior by name
        p = DEFAULT_DIR / f"{SHIPPED_PRIORS[str(path_or_dir)]}.safetensors"
    if p.is_dir():
        cands = sorted(p.glob("*.safetensors"))
        if (p / f"{DEFAULT_NAME}.safetensors").is_file():
            cands = [p / f"{DEFAULT_NAME}.safetensors"]
        elif (p / "prior.safetensors").is_file():
            cands = [p / "prior.safetensors"]
        if len(cands) != 1:
            raise InputFileError(p, f"expected exactly one *.safetensors prior in the folder, found "
                                    f"{[c.name for c in cands]}")
        p = cands[0]
    elif p.name.endswith(".card.json"):
        p = p.with_name(p.name[: -len(".card.json")] + ".safetensors")
    if not p.is_file():
        raise InputFileError(p, "prior weights file not found")
    card = card_path_for(p)
    if not card.is_file():
        raise InputFileError(card, f"weights card not found next to {p.name}")
    return p, card


def resolve_weights(path_or_dir: str | Path | None) -> tuple[Path, Path]:
    """(weights file, card file) of a prior given by path, folder, shipped name or ``None`` (the default).

    Raises
    ------
    InputFileError
        No such weights file or no card next to it.
    """
    return _resolve(default_weights_path() if path_or_dir is None else path_or_dir)


def read_card(path_or_dir: str | Path) -> dict[str, Any]:
    """The JSON card of a prior (no weights loaded)."""
    _, card = _resolve(path_or_dir)
    try:
        data = json.loads(card.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InputFileError(card, f"not valid JSON: {exc}") from None
    except OSError as exc:
        raise InputFileError(card, f"cannot read: {exc.strerror or exc}") from None
    if not isinstance(data, dict):
        raise InputFileError(card, f"a weights card is a JSON object, got {type(data).__name__}")
    return data


def verified_card(path_or_dir: str | Path | None) -> tuple[Path, dict[str, Any], str]:
    """The card of a prior whose weights it describes: (weights path, card, SHA-256 of the weights).

    Unlike :func:`read_card` the card must be one of ours (``format``), list the weights' SHA-256, and that must
    be the SHA-256 of the weights file next to it; so a card never vouches for weights it does not describe.

    Raises
    ------
    InputFileError
        A card of another format, no ``weights_sha256`` (unknown weights), or a SHA-256 mismatch.
    """
    wpath, cpath = resolve_weights(path_or_dir)
    card = read_card(wpath)
    if card.get("format") != FORMAT:
        raise InputFileError(cpath, f"not a sirf_ddip prior card: format {card.get('format')!r} (expected "
                             f"{FORMAT!r}); these weights are unknown", key="format")
    want = card.get("weights_sha256")
    if not isinstance(want, str) or len(want) != 64:
        raise InputFileError(cpath, f"the card does not record the weights' SHA-256 (got {want!r}): unknown "
                             "weights, refusing to describe them", key="weights_sha256")
    got = sha256_file(wpath)
    if got != want.lower():
        raise InputFileError(wpath, f"SHA-256 {got[:16]}… does not match the card's {want[:16]}… (corrupt or "
                             "replaced weights file, or a card of other weights)", key="weights_sha256")
    return wpath, card, got


def load_prior(path_or_dir: str | Path, device=None, check_hash: bool = True) -> PriorBundle:
    """Load a prior saved by :func:`save_prior` (the network in eval mode, float32, on ``device``).

    Raises
    ------
    InputFileError
        Missing files, a card of another format, a SHA-256 mismatch (corrupt weights) or weights that do not fit
        the card's architecture.
    """
    from safetensors.torch import load_file

    from ...utils.device import resolve_device

    wpath, cpath = _resolve(path_or_dir)
    card = read_card(wpath)
    if card.get("format") != FORMAT:
        raise InputFileError(cpath, f"unknown prior format {card.get('format')!r} (expected {FORMAT!r})", key="format")
    for key in ("architecture", "schedule", "pet_scaling", "weights_sha256"):
        if key not in card:
            raise InputFileError(cpath, "missing key in weights card", key=key)
    if check_hash:
        got = sha256_file(wpath)
        if got != card["weights_sha256"]:
            raise InputFileError(wpath, f"SHA-256 {got[:16]}… does not match the card's "
                                        f"{str(card['weights_sha256'])[:16]}… (corrupt or replaced weights file)",
                                 key="weights_sha256")
    try:
        net = build_network(card["architecture"])
    except ValueError as exc:
        raise InputFileError(cpath, str(exc), key="architecture") from None
    try:
        sd = load_file(str(wpath))
    except Exception as exc:  # noqa: BLE001 - any parse failure (SafetensorError, OSError) is a bad file
        raise InputFileError(wpath, f"cannot read safetensors: {exc}") from None
    sd = {k: (v.float() if v.is_floating_point() else v) for k, v in sd.items()}
    missing, unexpected = net.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise InputFileError(wpath, f"weights do not match the card's architecture: missing {missing[:4]}, "
                                    f"unexpected {unexpected[:4]}")
    dev = resolve_device(device)
    net.to(dev).eval()
    for p in net.parameters():
        p.requires_grad_(False)
    schedule = NoiseSchedule.from_dict(card["schedule"])
    try:
        pet = PETScaler.from_dict(card["pet_scaling"])
        mr = MRScaler.from_dict(card["mr_scaling"]) if card.get("mr_scaling") else None
    except ValueError as exc:
        raise InputFileError(cpath, str(exc), key="pet_scaling/mr_scaling") from None
    if net.uses_mr and mr is None:
        raise InputFileError(cpath, "MR-conditioned network but no MR scaling in the card", key="mr_scaling")
    return PriorBundle(net, schedule, pet, mr, card, wpath)


#: In-plane training size (ny, nx) and voxel size (vy, vx) in mm assumed for a card that does not record its
#: training grid (``training.data.grid``): the shipped priors' grid, ``sim.phantoms.mmr_brain_grid()`` (128 × 128
#: voxels of 2.08626 mm, the Siemens mMR's default transaxial voxel; a 267 mm field).
DEFAULT_TRAINING_SHAPE_YX = (128, 128)
DEFAULT_TRAINING_VOXEL_YX_MM = (2.08626, 2.08626)


def training_grid_yx(card: dict[str, Any], path: str | Path = "<card>"
                     ) -> tuple[tuple[int, int], tuple[float, float], bool]:
    """The in-plane grid a prior was trained on, from its card.

    Reads ``training.data.grid.shape`` (``[nz, ny, nx]``) and ``training.data.grid.voxel_size`` (``[vz, vy, vx]``
    mm), as :func:`sirf_ddip.prior.train` writes them. A card without them (older or hand-written cards) gets
    :data:`DEFAULT_TRAINING_SHAPE_YX` / :data:`DEFAULT_TRAINING_VOXEL_YX_MM`.

    Parameters
    ----------
    card : dict
        The weights card (:func:`read_card` or ``PriorBundle.card``).
    path : path, optional
        Named in errors.

    Returns
    -------
    (shape_yx, voxel_yx_mm, from_card)
        ``from_card`` is False when the defaults were used.

    Raises
    ------
    InputFileError
        A grid entry that is present but not 3 positive numbers (key ``training.data.grid``).
    """
    grid = ((card.get("training") or {}).get("data") or {}).get("grid") if isinstance(card, dict) else None
    if not grid or grid.get("shape") is None or grid.get("voxel_size") is None:
        return DEFAULT_TRAINING_SHAPE_YX, DEFAULT_TRAINING_VOXEL_YX_MM, False
    try:
        shape = [int(v) for v in grid["shape"]]
        vox = [float(v) for v in grid["voxel_size"]]
    except (TypeError, ValueError):
        raise InputFileError(path, f"training grid {grid!r} is not numeric", key="training.data.grid") from None
    if len(shape) != 3 or len(vox) != 3 or min(shape) < 1 or not min(vox) > 0:
        raise InputFileError(path, f"training grid shape {shape} / voxel size {vox} must be 3 positive numbers "
                                   "(z, y, x)", key="training.data.grid")
    return (shape[1], shape[2]), (vox[1], vox[2]), True


def default_weights_path() -> Path:
    return DEFAULT_DIR / f"{DEFAULT_NAME}.safetensors"


def load_default(device=None) -> PriorBundle:
    """Load the shipped default prior ``sirf_ddip/prior/weights/default.safetensors`` (+ ``default.card.json``)."""
    p = default_weights_path()
    if not p.is_file():
        raise InputFileError(p, "the default prior weights are not installed (train them with "
                                "'sirf-ddip pretrain configs/pretrain-default.yaml --out DIR' and copy "
                                "DIR/prior.safetensors + DIR/prior.card.json here as default.*)")
    return load_prior(p, device=device)
