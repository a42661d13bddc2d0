"""Run profiles and the frozen settings every notebook prints first.

Taught in notebook 00. One environment variable, ``QLORA_PROFILE``, picks a
profile; ``QLORA_MODEL`` and ``QLORA_DATA_DIR`` override the model and the
data source. Nothing else in the series branches on hardware except the
compute dtype and the optimizer, and both are decided here.

Runs are saved in one place whatever the working folder: ``QLORA_RUNS_DIR``,
else ``runs/`` at the repository root (a source checkout, as ``make`` and the
notebooks use it), else ``qlora-tutorial/runs`` in the user's cache folder
(an installed package, as on Colab). So ``make run`` and a notebook opened in
Jupyter find each other's trained adapters.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from qlora_tutorial.errors import MissingInputError, UserInputError
from qlora_tutorial.sources import BERT_BASE_MODEL, BERT_BASE_REVISION, HUB_DATASET, PACKAGED_MINILM, check_model_name

PROFILE_ENV = "QLORA_PROFILE"
MODEL_ENV = "QLORA_MODEL"
DATA_DIR_ENV = "QLORA_DATA_DIR"
RUNS_DIR_ENV = "QLORA_RUNS_DIR"
CACHE_FOLDER = "qlora-tutorial"


@dataclass(frozen=True)
class Profile:
    """How much model, data and training one run uses.

    ``train_pool_rows`` rows are drawn (stratified) from the official training
    split and then split 80/20 into train and validation; ``None`` takes all.
    ``test_rows`` likewise samples the official test split.
    """

    name: str
    model_name: str
    model_revision: str | None
    train_pool_rows: int | None
    test_rows: int | None
    epochs: float
    batch_size: int
    learning_rate: float
    logging_steps: int
    purpose: str
    validation_fraction: float = 0.2
    max_length: int = 128
    eval_batch_size: int = 64
    warmup_ratio: float = 0.06  # a float below 1 is a share of the steps for warmup_steps
    weight_decay: float = 0.01
    seed: int = 42


IDENTITY_FIELDS = ("name", "model_name", "model_revision", "purpose")
"""The fields that say which profile this is; every other field is a budget a run may change."""


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        model_name=PACKAGED_MINILM,
        model_revision=None,
        train_pool_rows=400,
        test_rows=200,
        epochs=2,
        batch_size=16,
        learning_rate=2e-3,
        logging_steps=5,
        purpose="CI: every notebook in about a minute",
    ),
    "cpu": Profile(
        name="cpu",
        model_name=PACKAGED_MINILM,
        model_revision=None,
        train_pool_rows=4_000,
        test_rows=None,
        epochs=2,
        batch_size=16,
        learning_rate=1e-3,
        logging_steps=20,
        purpose="a laptop with no GPU: the series on 3,200 training texts (times in notebook 00)",
    ),
    "gpu": Profile(
        name="gpu",
        model_name=BERT_BASE_MODEL,
        model_revision=BERT_BASE_REVISION,
        train_pool_rows=None,
        test_rows=None,
        epochs=1,
        batch_size=32,
        learning_rate=2e-4,
        logging_steps=100,
        purpose="Colab or a workstation: the full data on bert-base-uncased",
    ),
}


@dataclass(frozen=True)
class Settings:
    """Everything a run depends on, decided once and printed by each notebook."""

    profile: Profile
    model_name: str
    model_revision: str | None
    data_dir: Path | None
    device: str
    compute_dtype: torch.dtype
    optimizer: str
    runs_dir: Path

    def run_dir(self, name: str) -> Path:
        """Where a run called ``name`` keeps its adapter and results, one folder per profile."""
        return self.runs_dir / self.profile.name / name

    @property
    def data_source(self) -> str:
        """Where the data comes from, in words a reader of any copy can follow (no machine's folder).

        A notebook's printed settings are read in the book too, where a path such
        as ``../shared/data/ag_news`` names a folder the reader does not have.
        """
        if self.data_dir is None:
            return f"the Hugging Face Hub ({HUB_DATASET})"
        return f"a local copy of {HUB_DATASET} (the folder --data-dir or {DATA_DIR_ENV} names)"

    def rows(self) -> list[tuple[str, str]]:
        """The settings as (name, value) pairs, for a small table."""
        pairs = [
            ("profile", f"{self.profile.name} ({self.profile.purpose})"),
            ("model", self.model_name + (f" @ {self.model_revision[:10]}" if self.model_revision else "")),
            ("data", self.data_source),
            ("device", self.device),
            ("compute dtype", str(self.compute_dtype).removeprefix("torch.")),
            ("optimizer", self.optimizer),
            ("runs saved in", display_path(self.runs_dir)),
        ]
        skip = {"name", "model_name", "model_revision", "purpose"}
        pairs += [(f.name, str(getattr(self.profile, f.name))) for f in fields(self.profile) if f.name not in skip]
        return pairs

    def table(self) -> str:
        """The settings as an aligned two-column text table."""
        rows = self.rows()
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)


def source_checkout() -> Path | None:
    """The repository folder when the package is imported from a source checkout (``pip install -e .``), else None."""
    root = Path(__file__).resolve().parents[2]  # src/qlora_tutorial/settings.py -> the repository
    return root if (root / "pyproject.toml").is_file() and (root / "notebooks").is_dir() else None


def default_runs_dir() -> Path:
    """``runs/`` at the repository root, or ``qlora-tutorial/runs`` in the cache folder for an installed package.

    Never relative to the working folder: ``make run`` works in the repository
    root and Jupyter in ``notebooks/``, and both must see the same runs.
    """
    root = source_checkout()
    if root is not None:
        return root / "runs"
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return cache / CACHE_FOLDER / "runs"


def display_path(path: Path) -> str:
    """A path as a learner reads it: relative to the repository in a source checkout, else with ``~`` for home.

    Inside the checkout that reads ``runs``; beside it, ``../shared/data/ag_news``
    (as the README spells it). Notebook outputs then carry no machine's absolute
    paths where they can be avoided.
    """
    root = source_checkout()
    if root is not None:
        return os.path.relpath(path, root)
    if path.is_relative_to(Path.home()):
        return str(Path("~") / path.relative_to(Path.home()))
    return str(path)


def default_profile_name() -> str:
    """``gpu`` where CUDA is available, ``cpu`` elsewhere."""
    return "gpu" if torch.cuda.is_available() else "cpu"


def get_profile(name: str) -> Profile:
    """Look a profile up by name, with a message that lists the valid ones."""
    try:
        return PROFILES[name]
    except KeyError:
        valid = ", ".join(PROFILES)
        raise UserInputError(
            f"Unknown profile {name!r}. Valid profiles: {valid}. "
            f"Set {PROFILE_ENV} to one of them, or unset it to get the default."
        ) from None


NATIVE_BF16_CAPABILITY = (8, 0)
"""The first CUDA compute capability with bf16 arithmetic in hardware (Ampere: A100, A10, L4, RTX 30xx and later)."""


def has_native_bf16() -> bool:
    """Whether the current GPU computes in bf16 natively (compute capability 8.0 or higher).

    Not ``torch.cuda.is_bf16_supported()``: its default, ``including_emulation=True``,
    only checks below 8.0 that a bf16 tensor can be made, which works on a T4 (7.5),
    so it answers True where every bf16 operation would be emulated.
    """
    return tuple(torch.cuda.get_device_capability()) >= NATIVE_BF16_CAPABILITY


def compute_dtype_reason(device: str) -> str:
    """Why ``compute_dtype_for(device)`` picks its dtype, in one line (the doctor prints it)."""
    if device != "cuda":
        return "float32: 4-bit layers compute in float32 on the CPU"
    major, minor = torch.cuda.get_device_capability()
    wanted = ".".join(map(str, NATIVE_BF16_CAPABILITY))
    if has_native_bf16():
        return f"bfloat16: compute capability {major}.{minor} has native bf16 ({wanted} or higher)"
    return (
        f"float16: compute capability {major}.{minor} has no native bf16 (it needs {wanted}; below, bf16 is emulated)"
    )


def compute_dtype_for(device: str, requested: torch.dtype | None = None) -> torch.dtype:
    """The dtype 4-bit layers compute in: bf16 where the GPU has it natively, fp16 on older GPUs, fp32 on CPU.

    Natively means compute capability 8.0 or higher (``has_native_bf16``). A
    request for bf16 on a GPU below that (a T4, compute capability 7.5)
    raises instead of silently running in emulation.
    """
    if device != "cuda":
        if requested not in (None, torch.float32):
            raise UserInputError(
                f"Compute dtype {requested} was requested on the CPU, where 4-bit layers "
                "compute in float32. Leave the compute dtype unset on a CPU."
            )
        return torch.float32
    native_bf16 = has_native_bf16()
    if requested is None:
        return torch.bfloat16 if native_bf16 else torch.float16
    if requested == torch.bfloat16 and not native_bf16:
        name = torch.cuda.get_device_name()
        raise UserInputError(
            f"{name} does not support bfloat16. Use torch.float16 (the default on this GPU) "
            "or move to a GPU with compute capability 8.0 or newer (A100, L4, H100)."
        )
    return requested


def check_device(device: str) -> str:
    """``device`` if this machine has it: ``cpu`` always, ``cuda`` where CUDA is available."""
    if device not in ("cpu", "cuda"):
        raise UserInputError(f"Unknown device {device!r}. Use 'cpu' or 'cuda', or leave it unset to get the default.")
    if device == "cuda" and not torch.cuda.is_available():
        raise UserInputError("device='cuda' was requested, but CUDA is not available here. Use device='cpu'.")
    return device


def resolve_data_dir(data_dir: str | Path | None) -> Path | None:
    """The data folder from the argument, else ``QLORA_DATA_DIR``; ``None`` means the Hub. It must be a folder."""
    raw_dir = data_dir if data_dir is not None else os.environ.get(DATA_DIR_ENV)
    if not raw_dir:
        return None
    resolved = Path(raw_dir).expanduser().resolve()
    if not resolved.exists():
        raise MissingInputError(
            f"The data folder {resolved} does not exist. Point {DATA_DIR_ENV} at a folder "
            "holding train.parquet and test.parquet, or unset it to load AG News from the Hub."
        )
    if not resolved.is_dir():
        raise UserInputError(
            f"The data folder {resolved} is a file, not a folder. Point {DATA_DIR_ENV} at the folder "
            "that holds train.parquet and test.parquet."
        )
    return resolved


def load_settings(
    profile: str | None = None,
    *,
    data_dir: str | Path | None = None,
    model: str | None = None,
    revision: str | None = None,
    device: str | None = None,
) -> Settings:
    """Decide the run's settings from arguments, then the environment, then defaults.

    ``profile`` wins over ``QLORA_PROFILE``, ``data_dir`` over ``QLORA_DATA_DIR``,
    ``model`` over ``QLORA_MODEL``. Another model than the profile's drops the
    profile's pinned revision unless ``revision`` names one. Runs are saved
    under ``QLORA_RUNS_DIR``, else ``default_runs_dir()``. A data folder or a
    model folder that does not exist is reported here, before any work starts.
    ``device`` is ``cuda`` where CUDA is available and ``cpu`` elsewhere; pass
    ``device="cpu"`` to match runs made on CPU processes on a GPU machine
    (notebook 07); the compute dtype and the optimizer follow the device.
    """
    chosen = get_profile(profile or os.environ.get(PROFILE_ENV) or default_profile_name())
    model_override = model or os.environ.get(MODEL_ENV)
    if model_override:
        check_model_name(model_override, "model" if model else MODEL_ENV)
    model_name = model_override or chosen.model_name
    revision = revision or (None if model_override else chosen.model_revision)
    resolved_dir = resolve_data_dir(data_dir)
    device = check_device(device) if device else "cuda" if torch.cuda.is_available() else "cpu"
    return Settings(
        profile=chosen,
        model_name=model_name,
        model_revision=revision,
        data_dir=resolved_dir,
        device=device,
        compute_dtype=compute_dtype_for(device),
        optimizer="paged_adamw_32bit" if device == "cuda" else "adamw_torch",
        runs_dir=Path(os.environ.get(RUNS_DIR_ENV) or default_runs_dir()).expanduser().resolve(),
    )


def with_profile_changes(settings: Settings, **changes: object) -> Settings:
    """A copy of ``settings`` whose profile has some fields changed (e.g. the learning rate)."""
    return replace(settings, profile=replace(settings.profile, **changes))


def profile_option(field: str) -> str:
    """The command-line option of a profile field, as ``python -m qlora_tutorial train`` spells it: ``--test-rows``."""
    return "--" + field.replace("_", "-")


def changed_profile_fields(profile: Profile) -> dict[str, object]:
    """The budget fields of ``profile`` that differ from the named profile's (what ``with_profile_changes`` changed).

    ``comparison.train_command`` passes them on to a run in a new process.
    """
    original = get_profile(profile.name)
    return {
        field.name: getattr(profile, field.name)
        for field in fields(profile)
        if field.name not in IDENTITY_FIELDS and getattr(profile, field.name) != getattr(original, field.name)
    }
