"""Validated, frozen run configuration.

One `RunConfig` is built once (from CLI flags, Flower run config or a checkpoint's JSON) and then
passed around read-only. It is saved as plain JSON inside every checkpoint, so a run can be
resumed or evaluated later with exactly the settings it was trained with.

Privacy-relevant numbers (epsilon, delta) live in `PrivacyConfig`, but in deployment the site's
own budget always wins: the coordinator's value is only a request (see client/site_config.py).
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from common import jsonio

PRESETS = ("tiny", "quick", "standard")
AE_INITS = ("random", "public-phantoms", "public-generic")
DM_INITS = ("random", "public-healthy-phantoms")
# Besides those names, an init may be the path of a prior file made by `fedldm pretrain-ae/-dm
# --data PUBLIC` (ldm_core.pretrain): a public set of the user's own modality.
PRIOR_SUFFIX = ".safetensors"


def is_prior_file(init: str) -> bool:
    """An ae_init/dm_init that names a prior file rather than a built-in start."""
    return init.endswith(PRIOR_SUFFIX)
OPTIMIZERS = ("adam", "sgd")
AGGREGATION_METHODS = ("auto", "mean", "trimmed-mean", "median")


class ConfigError(ValueError):
    """A configuration value is out of range or unknown; the message names the field."""


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


@dataclass(frozen=True)
class ModelConfig:
    """Shapes of the MONAI autoencoder and denoiser.

    Channel counts must be divisible by the GroupNorm group count (MONAI checks too, but later
    and with a less helpful message). Latent size is image_size / 2**(len(ae_channels) - 1).
    """

    image_size: int = 64
    n_classes: int = 2
    ae_channels: tuple[int, ...] = (16, 32, 32)
    ae_res_blocks: int = 1
    latent_channels: int = 3
    ae_norm_groups: int = 8
    dm_channels: tuple[int, ...] = (32, 64)
    dm_res_blocks: int = 1
    dm_attention: tuple[bool, ...] = (False, False)
    dm_norm_groups: int = 8
    dm_head_channels: int = 16
    num_train_timesteps: int = 1000
    # "v_prediction" keeps the x0 estimate stable at high noise, where epsilon-prediction
    # divides the denoiser's error by sqrt(alpha_bar) ~ 0.07 (the global layout of a sample).
    prediction_type: str = "v_prediction"
    # Site-conditional generation (0 = off): the denoiser also learns one embedding per site
    # slot (the coordinator assigns slots to sites), plus "any site", so a model's behaviour
    # under each site's acquisition style can be probed (`fedldm stress`).
    site_slots: int = 0
    # Paired generation for segmentation (0 = images only, 1 = image + lesion mask): the mask
    # is one more autoencoder channel, so image and mask share one latent and one denoiser and
    # come out aligned (ldm_core.sampling.generate_pairs). The sites' data must carry masks.
    mask_channels: int = 0
    # 2: slices [N,C,H,W]; 3: volumes [N,C,D,H,W] (image_size voxels a side; the data are
    # NIfTI files or DICOM series, ldm_core.volumes). Same networks, federation and evaluation.
    spatial_dims: int = 2
    # Volumes only: the voxel size (mm, isotropic) every scan is resampled to before it is
    # cropped or padded (centred) to image_size voxels a side, so anatomy keeps its physical
    # size across sites and scanners (a lesion of 10 mm spans the same voxels everywhere).
    # None fits each scan's field of view to the grid instead: nothing is cropped, but
    # scans of different extents end up at different scales.
    voxel_mm: float | None = None

    def __post_init__(self) -> None:
        _check(self.spatial_dims in (2, 3), f"spatial_dims must be 2 or 3, got "
               f"{self.spatial_dims!r}")
        if self.voxel_mm is not None:
            _check(self.spatial_dims == 3, f"voxel_mm={self.voxel_mm} sets the voxel size of "
                   "volumes; this run reads 2D images (set model.spatial_dims=3 for volumes, "
                   "or drop model.voxel_mm)")
            _check(isinstance(self.voxel_mm, (int, float)) and not isinstance(
                self.voxel_mm, bool) and 0.05 <= float(self.voxel_mm) <= 50.0,
                f"voxel_mm must be a voxel size in mm in [0.05, 50] (or None to fit each "
                f"scan's field of view), got {self.voxel_mm!r}")
        _check(self.mask_channels in (0, 1), f"mask_channels must be 0 (images only) or 1 "
               f"(image + binary mask), got {self.mask_channels!r}")
        _check(0 <= self.site_slots <= 64, f"site_slots must be in [0, 64], got "
               f"{self.site_slots}")
        _check(self.prediction_type in ("epsilon", "v_prediction"),
               f"prediction_type must be epsilon or v_prediction, got {self.prediction_type!r}")
        _check(self.image_size >= 8, f"image_size must be >= 8, got {self.image_size}")
        _check(self.n_classes >= 2, f"n_classes must be >= 2, got {self.n_classes}")
        down = 2 ** (len(self.ae_channels) - 1)
        _check(
            self.image_size % down == 0,
            f"image_size {self.image_size} must be divisible by {down} "
            f"(the autoencoder downsamples {len(self.ae_channels) - 1} times)",
        )
        for name, chans, groups in (
            ("ae_channels", self.ae_channels, self.ae_norm_groups),
            ("dm_channels", self.dm_channels, self.dm_norm_groups),
        ):
            _check(len(chans) >= 1, f"{name} must not be empty")
            bad = [c for c in chans if c % groups]
            _check(not bad, f"{name} {chans}: each must be divisible by the norm groups {groups}")
        _check(
            len(self.dm_attention) == len(self.dm_channels),
            f"dm_attention {self.dm_attention} needs one flag per dm_channels level "
            f"({len(self.dm_channels)})",
        )
        lat = self.latent_size
        dm_down = 2 ** (len(self.dm_channels) - 1)
        _check(
            lat % dm_down == 0,
            f"latent size {lat} must be divisible by {dm_down} (denoiser levels)",
        )
        _check(self.latent_channels >= 1, "latent_channels must be >= 1")
        _check(self.num_train_timesteps >= 10, "num_train_timesteps must be >= 10")

    @property
    def latent_size(self) -> int:
        return self.image_size // 2 ** (len(self.ae_channels) - 1)

    @property
    def latent_shape(self) -> tuple[int, ...]:
        """One sample's latent: channels, then latent_size along each spatial dimension."""
        return (self.latent_channels, *(self.latent_size,) * self.spatial_dims)

    @property
    def image_channels(self) -> int:
        """Channels the autoencoder reads and writes: the image, then any mask channel."""
        return 1 + self.mask_channels


@dataclass(frozen=True)
class PhaseConfig:
    """Training plan of one phase (autoencoder or diffusion).

    The plan is fixed by the configuration, never by a site's dataset size: every site Poisson-
    samples each privacy unit (patient) with probability `sample_rate` for `local_steps` logical
    steps per round. So sigma, the steps and the epsilon a site reports are the same for every
    site with the same budget and say nothing about how many records it holds. `batch_size` is
    the public expected logical batch that the noisy gradient sum is divided by (a site with
    n units draws about q*n per step; Adam is insensitive to that scale), and the batch of the
    non-private baseline. `physical_batch_size` bounds memory through Opacus' BatchMemoryManager
    and does not change the privacy analysis. `optimizer` "sgd" exists so tests can read the
    injected noise off the update; "adam" is what trains well.
    """

    rounds: int = 2
    sample_rate: float = 0.125
    local_steps: int = 8
    batch_size: int = 64
    physical_batch_size: int = 256
    lr: float = 1e-3
    max_grad_norm: float = 1.0
    # Diffusion only: timesteps/noises per sample inside one clipped per-sample gradient.
    noise_multiplicity: int = 1
    # Per-step EMA of the weights a site sends back (0 = off). Post-processing of DP-SGD
    # iterates, so free in privacy; it averages out much of the injected noise.
    ema_decay: float = 0.0
    optimizer: str = "adam"
    # Train only the parameters whose names contain one of these pieces (empty = all), e.g.
    # ("class_embedding", "time_emb", "attn") for the denoiser's conditioning path on top of a
    # public prior. Frozen parameters leave a site exactly as they came: nothing about the data.
    train_only: tuple[str, ...] = ()
    # The model a phase releases is the mean of its last `average_last` global models (1 = the
    # last one; capped at `rounds`). Each of them was already sent to the sites, so the mean is
    # post-processing, free in privacy: it smooths the DP noise of the last rounds' updates.
    average_last: int = 1
    # Server momentum across rounds (FedAvgM): the coordinator moves the global model by
    # `server_lr` x a running sum of the rounds' averaged updates, each weighted
    # `server_momentum` per round of age (0 and 1 = plain averaging). Post-processing of the
    # sites' DP updates, free in privacy.
    server_momentum: float = 0.0
    server_lr: float = 1.0

    def __post_init__(self) -> None:
        _check(self.rounds >= 0, f"rounds must be >= 0, got {self.rounds}")
        _check(0 <= self.server_momentum < 1,
               f"server_momentum must be in [0, 1) (0 = plain averaging), got "
               f"{self.server_momentum}")
        _check(0 < self.server_lr <= 10,
               f"server_lr must be in (0, 10] (1 = plain averaging), got {self.server_lr}")
        _check(self.average_last >= 1, f"average_last must be >= 1 (1 = release the last "
               f"round's model), got {self.average_last}")
        if isinstance(self.train_only, str):  # `--set diffusion.train_only=attn`: one piece
            object.__setattr__(self, "train_only", (self.train_only,))
        _check(isinstance(self.train_only, tuple)
               and all(isinstance(p, str) and p for p in self.train_only),
               f"train_only must list non-empty parameter-name pieces, got {self.train_only!r}")
        _check(0 < self.sample_rate <= 1,
               f"sample_rate must be in (0, 1] (Poisson rate per patient), got {self.sample_rate}")
        _check(self.local_steps >= 1, f"local_steps must be >= 1, got {self.local_steps}")
        _check(self.optimizer in OPTIMIZERS,
               f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        _check(self.batch_size >= 1, f"batch_size must be >= 1, got {self.batch_size}")
        _check(self.physical_batch_size >= 1, "physical_batch_size must be >= 1")
        _check(self.lr > 0, f"lr must be > 0, got {self.lr}")
        _check(self.max_grad_norm > 0, f"max_grad_norm must be > 0, got {self.max_grad_norm}")
        _check(self.noise_multiplicity >= 1, "noise_multiplicity must be >= 1")
        _check(0 <= self.ema_decay < 1, f"ema_decay must be in [0, 1), got {self.ema_decay}")


@dataclass(frozen=True)
class PrivacyConfig:
    """The requested (epsilon, delta) and how it is split.

    `ae_share` is the share of the budget planned for phase 1; the rest goes to phase 2 after the
    small fixed release of the latent scale factor (`scale_noise_multiplier`, a Gaussian
    mechanism charged to the ledger like every training step).
    """

    epsilon: float = 8.0
    delta: float = 1e-5
    ae_share: float = 0.3
    scale_noise_multiplier: float = 20.0
    scale_clip: float = 10.0
    # Site audits (opt-in per site): members and non-members scored per site (a public
    # normaliser, not the site's size), samples the site draws itself from the final model, and
    # the noise multiplier of the one Gaussian release that carries all audit aggregates.
    audit_records: int = 256
    audit_samples: int = 256
    audit_noise_multiplier: float = 8.0
    # Site evaluation (opt-in per site, deployments without a coordinator-held reference set):
    # the noise multiplier of the one Gaussian release that carries every site-side utility and
    # recall count, the score histogram's bins, and the DP-SGD plan of the classifier each site
    # trains on its own train split as the TRTR reference (client.site_eval).
    eval_noise_multiplier: float = 4.0
    eval_bins: int = 8
    eval_trtr_noise_multiplier: float = 2.0
    eval_trtr_sample_rate: float = 0.05
    eval_trtr_steps: int = 200
    # Patient-level DP: at most this many of one patient's images enter one step's per-patient
    # gradient (their gradients are summed, then clipped together). Per-sample gradients are
    # usually far above the clip bound, so one image a step gives the same signal per patient as
    # several at a fraction of the compute.
    patient_images_per_step: int = 1
    # Images of one patient kept per round (a random subset when a patient has more).
    max_patient_images: int = 16
    # Extra rounds per phase the noise is planned for, so that a round retried after a crash
    # between its charge and its stored reply still fits the budget (0 = no reserve).
    retry_reserve_rounds: int = 1

    def __post_init__(self) -> None:
        _check(self.epsilon > 0, f"epsilon must be > 0 (use inf for no DP), got {self.epsilon}")
        _check(0 < self.delta < 1, f"delta must be in (0, 1), got {self.delta}")
        _check(0 < self.ae_share < 1, f"ae_share must be in (0, 1), got {self.ae_share}")
        _check(self.scale_noise_multiplier > 0, "scale_noise_multiplier must be > 0")
        _check(self.scale_clip > 0, "scale_clip must be > 0")
        _check(self.audit_records >= 8, f"audit_records must be >= 8, got {self.audit_records}")
        _check(self.audit_samples >= 8, f"audit_samples must be >= 8, got {self.audit_samples}")
        _check(self.audit_noise_multiplier > 0, "audit_noise_multiplier must be > 0")
        _check(self.eval_noise_multiplier > 0, "eval_noise_multiplier must be > 0")
        _check(2 <= self.eval_bins <= 64, f"eval_bins must be in [2, 64], got {self.eval_bins}")
        _check(self.eval_trtr_noise_multiplier > 0, "eval_trtr_noise_multiplier must be > 0")
        _check(0 < self.eval_trtr_sample_rate <= 1, "eval_trtr_sample_rate must be in (0, 1]")
        _check(1 <= self.eval_trtr_steps <= 10_000, "eval_trtr_steps must be in [1, 10000]")
        _check(self.retry_reserve_rounds >= 0, "retry_reserve_rounds must be >= 0")
        _check(1 <= self.patient_images_per_step <= self.max_patient_images,
               "need 1 <= patient_images_per_step <= max_patient_images, got "
               f"{self.patient_images_per_step} and {self.max_patient_images}")

    @property
    def private(self) -> bool:
        return math.isfinite(self.epsilon)


@dataclass(frozen=True)
class DiffusionConfig:
    """Denoiser training and sampling knobs."""

    kl_weight: float = 1e-4
    label_dropout: float = 0.15
    # With model.site_slots: how often a training sample's site is replaced by "any site", so
    # the unconditional-over-sites model (the default for generation) is learnt too.
    site_dropout: float = 0.5
    ddim_steps: int = 50
    guidance_scale: float = 2.0
    # DDIM clips its x0 estimate of the unit-scaled latents to +-clip_latent (0 = off).
    clip_latent: float = 3.0
    # Training timesteps: uniform over [0, T) (None), or logit-normal, t/T = sigmoid(mean + std
    # * N(0, 1)) (losses.sample_timesteps): fewer of a DP run's steps on near-pure noise. Mean
    # -0.85 measured within the draw-to-draw spread (docs/benchmarks.md section 7).
    timestep_logit_mean: float | None = None
    timestep_logit_std: float = 1.0

    def __post_init__(self) -> None:
        _check(self.kl_weight >= 0, "kl_weight must be >= 0")
        _check(self.timestep_logit_mean is None or -6 <= self.timestep_logit_mean <= 6,
               "timestep_logit_mean must be in [-6, 6] (or null: uniform timesteps)")
        _check(0 < self.timestep_logit_std <= 4, "timestep_logit_std must be in (0, 4]")
        _check(0 <= self.label_dropout < 1, "label_dropout must be in [0, 1)")
        _check(0 < self.site_dropout < 1, "site_dropout must be in (0, 1)")
        _check(self.ddim_steps >= 1, "ddim_steps must be >= 1")
        _check(self.guidance_scale >= 0, "guidance_scale must be >= 0")
        _check(self.clip_latent >= 0, "clip_latent must be >= 0 (0 turns clipping off)")


# How the sites' updates travel (common.protocol.encode_update; ldm_core never imports Flower).
TRANSFER_ENCODINGS = ("float32", "float16-delta")


@dataclass(frozen=True)
class AggregationConfig:
    """How the coordinator combines the sites' updates (server.aggregate).

    "mean" is equal-weight FedAvg; "trimmed-mean" drops the `trim_fraction` largest and smallest
    values of every coordinate (at least one each side once there are 3 sites); "median" is the
    coordinate-wise median; "auto" is trimmed-mean with 3 or more usable updates, else mean.
    An update further from the global model (L2) than `norm_bound` times the median distance of
    the other sites' updates is rejected (inf turns that check off).

    `transfer` is how the sites' updates travel: "float32" weights, or "float16-delta" (their
    difference from the global weights, in half precision: half the uplink bytes; see
    common.protocol.encode_update for why a difference and not rounded weights).
    """

    method: str = "auto"
    trim_fraction: float = 0.2
    norm_bound: float = 5.0
    transfer: str = "float32"

    def __post_init__(self) -> None:
        _check(self.method in AGGREGATION_METHODS,
               f"aggregation.method must be one of {AGGREGATION_METHODS}, got {self.method!r}")
        _check(isinstance(self.trim_fraction, (int, float)) and 0 <= self.trim_fraction < 0.5,
               f"aggregation.trim_fraction must be in [0, 0.5), got {self.trim_fraction!r}")
        _check(isinstance(self.norm_bound, (int, float)) and self.norm_bound > 1,
               f"aggregation.norm_bound must be > 1 (inf turns the check off), got "
               f"{self.norm_bound!r}")
        _check(self.transfer in TRANSFER_ENCODINGS,
               f"aggregation.transfer must be one of {TRANSFER_ENCODINGS}, got "
               f"{self.transfer!r}")


@dataclass(frozen=True)
class RunConfig:
    """Everything a run needs; saved as JSON in every checkpoint."""

    preset: str = "quick"
    seed: int = 0
    device: str = "auto"
    model: ModelConfig = field(default_factory=ModelConfig)
    autoencoder: PhaseConfig = field(default_factory=PhaseConfig)
    diffusion: PhaseConfig = field(default_factory=PhaseConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    dm: DiffusionConfig = field(default_factory=DiffusionConfig)
    # Robust aggregation of the sites' updates; absent from configs saved before it existed.
    aggregation: AggregationConfig = field(default_factory=AggregationConfig)
    class_names: tuple[str, ...] = ("class-0", "class-1")
    # "public-phantoms": start phase 1 from the shipped autoencoder pretrained on public
    # procedural phantoms (ldm_core.pretrain); "public-generic": from the shipped
    # modality-agnostic one (phantoms and generic procedural images; 2D image-only models);
    # "random": from scratch; PATH.safetensors: a prior
    # made by `fedldm pretrain-ae --data PUBLIC` (checked against its sidecar when loaded).
    ae_init: str = "random"
    # "public-healthy-phantoms": start phase 2 from the shipped denoiser pretrained, without
    # labels, on healthy public phantoms (anatomy only; ldm_core.pretrain); "random": scratch;
    # PATH.safetensors: made by `fedldm pretrain-dm --data PUBLIC --autoencoder AE` (the run's
    # ae_init must be that same AE file).
    dm_init: str = "random"

    def __post_init__(self) -> None:
        _check(self.ae_init in AE_INITS or is_prior_file(self.ae_init),
               f"ae_init must be one of {AE_INITS} or a {PRIOR_SUFFIX} prior file (fedldm "
               f"pretrain-ae --data PUBLIC), got {self.ae_init!r}")
        _check(self.dm_init in DM_INITS or is_prior_file(self.dm_init),
               f"dm_init must be one of {DM_INITS} or a {PRIOR_SUFFIX} prior file (fedldm "
               f"pretrain-dm --data PUBLIC), got {self.dm_init!r}")
        needs = ("random" if self.dm_init == "random" else
                 "file" if is_prior_file(self.dm_init) else "public-phantoms")
        _check(needs == "random" or needs == "file" and is_prior_file(self.ae_init)
               or self.ae_init == needs,
               f"dm_init {self.dm_init!r} models the latents of the autoencoder it was "
               "pretrained with; set ae_init to that autoencoder (public-phantoms for the "
               "shipped denoiser, the --autoencoder file for a pretrain-dm prior), or set "
               "dm_init to 'random'")
        _check(self.dm_init != "public-healthy-phantoms" or self.model.mask_channels == 0,
               "dm_init 'public-healthy-phantoms' models the image-only autoencoder's latents; "
               "a paired run (model.mask_channels > 0) starts from the paired autoencoder, so "
               "set dm_init to 'random'")
        _check(self.dm_init == "random" or self.model.site_slots == 0,
               f"dm_init {self.dm_init!r} has no site embeddings; site-conditional generation "
               "(model.site_slots > 0) needs dm_init 'random'")
        _check(self.preset in PRESETS, f"preset must be one of {PRESETS}, got {self.preset!r}")
        _check(self.autoencoder.rounds > 0 or self.ae_init != "random",
               "autoencoder.rounds=0 keeps the autoencoder as it starts, and ae_init is "
               "'random': every latent would be noise. Give it rounds (--ae-rounds N) or start "
               "from a prior (ae_init=public-phantoms, or a fedldm pretrain-ae file)")
        _check(self.ae_init != "public-generic" or (self.model.spatial_dims == 2
                                                    and self.model.mask_channels == 0),
               "ae_init 'public-generic' is a 2D image-only autoencoder prior; a paired "
               "(model.mask_channels) or volume (model.spatial_dims=3) run starts from "
               "ae_init 'public-phantoms' (its paired and 3D priors ship) or a prior file")
        _check(self.model.spatial_dims == 2 or self.dm_init == "random",
               f"model.spatial_dims=3: the denoiser priors (dm_init {self.dm_init!r}) are 2D "
               "networks; set dm_init=random (an autoencoder prior made from volumes fits: "
               "the shipped 3D one, or fedldm pretrain-ae --data PUBLIC_VOLUMES)")
        _check(self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
               f"device must be auto, cpu or cuda[:N], got {self.device!r}")
        _check(
            len(self.class_names) == self.model.n_classes,
            f"{len(self.class_names)} class names for n_classes={self.model.n_classes}",
        )

    def to_json(self) -> str:
        return json.dumps(to_dict(self), indent=2, sort_keys=True)

    @staticmethod
    def from_dict(d: Mapping[str, Any]) -> RunConfig:
        return _from_dict(RunConfig, d)


def to_dict(cfg: Any) -> dict[str, Any]:
    """Plain JSON-able dict; inf is kept as the string "inf" (common.jsonio) so the JSON stays
    standard, and tuples become lists."""
    return jsonio.encode(dataclasses.asdict(cfg))


def _from_dict(cls: type, d: Mapping[str, Any]) -> Any:
    known = {f.name: f for f in fields(cls)}
    unknown = set(d) - set(known)
    _check(not unknown, f"unknown {cls.__name__} keys: {sorted(unknown)}")
    kwargs: dict[str, Any] = {}
    for name, value in d.items():
        sub = _SUBCONFIGS.get((cls.__name__, name))
        if sub is not None:
            kwargs[name] = _from_dict(sub, value)
        elif isinstance(value, list):
            kwargs[name] = tuple(value)
        else:
            kwargs[name] = jsonio.decode_float(value)
    return cls(**kwargs)


_SUBCONFIGS: dict[tuple[str, str], type] = {
    ("RunConfig", "model"): ModelConfig,
    ("RunConfig", "autoencoder"): PhaseConfig,
    ("RunConfig", "diffusion"): PhaseConfig,
    ("RunConfig", "privacy"): PrivacyConfig,
    ("RunConfig", "dm"): DiffusionConfig,
    ("RunConfig", "aggregation"): AggregationConfig,
}


PRESET_IMAGE_SIZE = {"tiny": 16, "quick": 32, "standard": 64}


def _volume_parts(preset: str, parts: dict[str, Any]) -> dict[str, Any]:
    """A preset for volumes (`model.spatial_dims=3`): the same networks in 3D, with memory-sized
    physical batches and a plan for cohorts of hundreds of patients (one volume each) instead
    of thousands of slices. The denoiser starts from scratch (its priors are 2D); the quick
    autoencoder from the shipped 3D prior (public phantom volumes), the others from scratch."""
    parts = {**parts, "model": dataclasses.replace(parts["model"], spatial_dims=3)}
    parts.pop("ae_init", None)
    parts.pop("dm_init", None)
    if preset == "quick":
        parts["ae_init"] = "public-phantoms"
        # Sized for 2 CPU cores and the 600-patient demo3d (~140 training volumes a site, 35
        # a step at q = 1/4): Opacus' per-sample gradients of 3D convolutions make a 32^3
        # autoencoder round of 16 DP steps take ~9-11 minutes for 3 sites, so half the 2D
        # widths (and, below, no round by default); the 8^3 latent denoiser is cheap (~0.015 s
        # a volume), so 256 steps.
        parts["model"] = dataclasses.replace(parts["model"], ae_channels=(8, 16, 32))
        # The shipped 3D prior is kept as it is (rounds=0), as in 2D: its one DP round (16
        # steps, 40% of the budget, 11 of the run's 29 minutes) changed the demo sites'
        # holdout reconstructions by -0.7..+0.5 dB PSNR. `--ae-rounds N` runs N rounds of this plan.
        parts["autoencoder"] = PhaseConfig(rounds=0, sample_rate=1 / 4, local_steps=16,
                                           batch_size=36, lr=2e-3, physical_batch_size=16)
        parts["diffusion"] = PhaseConfig(rounds=4, sample_rate=1 / 4, local_steps=64,
                                         batch_size=36, lr=2e-3, physical_batch_size=64,
                                         average_last=3)
        # ~140 patients a site make the latent-scale release noisy: with the 2D clip of 10 the
        # noise (sd 20 x 10 x sqrt 2 per site) exceeds the sum it hides, and a quarter of the
        # releases hit the clamp (scale factor 10, a badly scaled latent space); per-patient
        # E[z^2] of the 3D priors' latents stays below 1.3, so clip 2 loses nothing and puts
        # 90% of the releases within [0.83, 1.41] of an exact 1.03
        # (benchmarks/latent_scale_release.py).
        parts["privacy"] = {"ae_share": 0.4, "scale_clip": 2.0}
    elif preset == "standard":
        for phase in ("autoencoder", "diffusion"):
            parts[phase] = dataclasses.replace(parts[phase], physical_batch_size=16)
    return parts


def _preset_parts(preset: str, image_size: int) -> dict[str, Any]:
    """Network sizes and training plans per preset.

    `quick` is sized for the README's main job: 3 simulated sites on 2 CPU cores in minutes.
    Small denoisers and large logical batches are what make DP-SGD work for generators
    (docs/architecture.md), so even `standard` keeps the denoiser modest.
    """
    if preset == "tiny":
        return {
            "model": ModelConfig(
                image_size=image_size, ae_channels=(8, 8), latent_channels=2, ae_norm_groups=4,
                dm_channels=(8, 16), dm_attention=(False, False), dm_norm_groups=4,
                dm_head_channels=8, num_train_timesteps=100,
            ),
            "autoencoder": PhaseConfig(rounds=1, sample_rate=0.25, local_steps=4, batch_size=8,
                                       lr=2e-3),
            "diffusion": PhaseConfig(rounds=1, sample_rate=0.25, local_steps=4, batch_size=8,
                                     lr=2e-3, noise_multiplicity=2),
            "dm": DiffusionConfig(ddim_steps=5),
        }
    if preset == "quick":
        # 32 px and 8x8x8 latents: what 2 CPU cores can train under DP in minutes. The
        # autoencoder is the public-phantom prior, kept frozen (see "autoencoder" below); it is
        # wider than the denoiser needs because lesions are a few pixels at 32 px: (8,16,32)
        # with 4 latent channels kept a real-trained classifier at AUC 0.77 on its
        # reconstructions, (16,32,64) with 8 channels at 0.84 (originals: 0.91).
        # The denoiser starts from scratch: the shipped healthy-anatomy prior
        # (dm_init="public-healthy-phantoms", with diffusion.lr=5e-4) draws cleaner heads but,
        # within this compute, never learns to use the label (TSTR 0.47 vs 0.57 from scratch at
        # epsilon 8; benchmarks/denoiser_ablation.py, README "Results").
        return {
            "model": ModelConfig(
                image_size=image_size,
                ae_channels=(16, 32, 64),
                latent_channels=8,
                ae_norm_groups=8,
                dm_channels=(16, 32),
                dm_attention=(False, False),
                dm_norm_groups=8,
                num_train_timesteps=1000,
            ),
            # The autoencoder is the shipped public prior, kept as it is (rounds=0): no
            # budget and no time go to it. Its one DP fine-tuning round (6 steps at lr 5e-4,
            # 10% of the budget, 16% of `make demo`'s time) moved no weight by more than 0.003
            # and reconstruction PSNR by -0.4..+0.4 dB at the three demo sites. `--ae-rounds N`
            # runs N rounds of this plan (a prior of another modality, or ae_init=random, needs
            # far more than it: fedldm pretrain-ae on public data of the modality).
            "autoencoder": PhaseConfig(
                rounds=0, sample_rate=1 / 6, local_steps=6, batch_size=512, lr=5e-4,
                max_grad_norm=1.0,
            ),
            # q=1/8 (about 384 of the demo's ~3000 train patients a site per step): small q
            # buys low noise (sigma ~1.7 for 320 steps at epsilon ~7), the lever that matters
            # under DP. 64 steps a round = 8 expected passes over the data. lr 4e-3 and
            # guidance 4 from the one-site ablation (benchmarks/denoiser_ablation.py, epsilon
            # 8): a classifier trained on the samples scored AUC 0.589 (lr 2e-3, guidance 2),
            # 0.659 (guidance 4), 0.719 (lr 4e-3, guidance 4), 0.668 (lr 8e-3); guidance is
            # sampling, free in privacy. A (32, 64) denoiser reached 0.748 at 3x the time.
            # The released denoiser is the mean of rounds 2-5 (average_last=4, free in
            # privacy): on three `make demo` models it moved TSTR AUC from 0.566 / 0.625 / 0.626
            # (last round) to 0.660 / 0.661 / 0.631 (benchmarks/sampling_sweep.py
            # --average-last; a tie on a fourth, 10-round model); round 1, the least trained,
            # helped one model and hurt another. physical_batch_size 512: a demo site's ~375
            # sampled patients in one pass, not 256 + the rest: 4-5% less time a DP step for
            # ~250 MB more memory; smaller passes cost more (benchmarks/dp_step_cost.py
            # --physical, docs/benchmarks.md section 1).
            "diffusion": PhaseConfig(
                rounds=5,
                sample_rate=1 / 8,
                local_steps=64,
                batch_size=384,
                physical_batch_size=512,
                lr=4e-3,
                max_grad_norm=1.0,
                noise_multiplicity=1,
                average_last=4,
            ),
            # Timesteps stay uniform: logit-normal around t ~ 300 (dm.timestep_logit_mean=-0.85)
            # gained a little in the one-site ablation (two draws each) but its one `make demo`
            # draw was the lowest measured (TSTR 0.521; docs/benchmarks.md section 7).
            "dm": DiffusionConfig(ddim_steps=40, guidance_scale=4.0),
            # scale_clip 4 (the dataclass default is 10): the noise of the latent-scale
            # release grows with the clip, and the shipped priors' per-patient E[z^2] stays
            # below 2.2 (demo phantoms 0.63, real brain MRI through the generic prior 2.19), so
            # 4 clips nothing. At epsilon 1 (fixed releases at noise multiplier 100) clip 10 put
            # 14% of MRI releases at the clamp and one frontier run's latents at 0.56 of unit
            # scale (TSTR/TRTR 0.44); clip 4: 2% at the clamp, 90% within [0.91, 2.23] of an
            # exact 1.20 (benchmarks/latent_scale_release.py, docs/benchmarks.md section 9).
            "privacy": {"ae_share": 0.1, "scale_clip": 4.0},
            # The modality-agnostic prior: real images of any modality are not phantoms (it
            # reconstructs real brain MRI 2.8 dB better than the phantom-only prior). The
            # built-in demo, made of phantoms, pins public-phantoms (server.simulate), as do
            # paired runs and the healthy denoiser prior (build_config).
            "ae_init": "public-generic",
        }
    if preset == "standard":
        return {
            "model": ModelConfig(
                image_size=image_size, ae_channels=(32, 64, 64), latent_channels=4,
                ae_norm_groups=16, dm_channels=(64, 128, 128),
                dm_attention=(False, False, True), dm_norm_groups=16, dm_head_channels=32,
            ),
            "autoencoder": PhaseConfig(rounds=10, sample_rate=0.1, local_steps=50,
                                       batch_size=512, lr=2e-3, physical_batch_size=128),
            "diffusion": PhaseConfig(rounds=20, sample_rate=0.2, local_steps=50, batch_size=1024,
                                     lr=1e-3, physical_batch_size=128, noise_multiplicity=8),
            "dm": DiffusionConfig(ddim_steps=100, guidance_scale=2.0),
        }
    raise ConfigError(f"unknown preset {preset!r}; choose one of {PRESETS}")


def _members(hint: Any) -> tuple[Any, ...]:
    """The alternatives of a union hint (`float | None`), or the hint alone."""
    union = typing.get_origin(hint) in (types.UnionType, typing.Union)
    return typing.get_args(hint) if union else (hint,)


def _is_tuple(hint: Any) -> bool:
    return hint is tuple or typing.get_origin(hint) is tuple


def _member_ok(hint: Any, value: Any) -> bool:
    if hint is type(None):
        return value is None
    if _is_tuple(hint):
        # a bare string is one piece of a tuple of strings (`--set diffusion.train_only=attn`)
        one = isinstance(value, str) and typing.get_args(hint)[:1] == (str,)
        return isinstance(value, (tuple, list)) or one
    if hint is bool:
        return isinstance(value, bool)
    if hint is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if hint is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, str)
    return True  # anything else is left to the section's own checks


def _check_override_type(key: str, hint: Any, value: Any) -> None:
    """A `--set` value of the wrong kind is named here, not as a TypeError deep in a check."""
    expected = " or ".join("null" if m is type(None) else "list" if _is_tuple(m)
                           else getattr(m, "__name__", str(m)) for m in _members(hint))
    _check(any(_member_ok(m, value) for m in _members(hint)),
           f"override {key}={json.dumps(jsonio.encode(value))}: expected {expected}, got "
           f"{type(value).__name__} (numbers and lists are written as JSON, e.g. --set "
           f"diffusion.lr=4e-3, --set model.dm_channels=[32,64])")


def _check_unused_plan(parts: dict[str, Any], overrides: Mapping[str, Any], preset: str) -> None:
    """A phase override is refused when the plan runs no round of that phase: the quick presets
    keep the shipped autoencoder frozen, so `--ae-steps 32` alone used to change nothing while
    the user believed the autoencoder was trained longer."""
    for phase, flag in (("autoencoder", "--ae-rounds"), ("diffusion", "--dm-rounds")):
        tuned = sorted(k for k in overrides
                       if k.startswith(f"{phase}.") and k != f"{phase}.rounds")
        _check(not tuned or parts[phase].rounds > 0,
               f"override {', '.join(tuned)}: this {preset} plan runs 0 {phase} rounds, so "
               f"it would change nothing; add {flag} N (or --set {phase}.rounds=N) to train "
               f"that phase, or drop the override")


def build_config(
    *,
    preset: str = "quick",
    image_size: int | None = None,
    class_names: tuple[str, ...] = ("class-0", "class-1"),
    epsilon: float = 8.0,
    delta: float = 1e-5,
    seed: int = 0,
    device: str = "auto",
    overrides: Mapping[str, Any] | None = None,
    phantom_data: bool = False,
) -> RunConfig:
    """Build a RunConfig from a preset plus dotted overrides like {"diffusion.rounds": 3}.

    Overrides are how the CLI and the benchmarks sweep knobs without new code paths.
    `phantom_data`: the run trains on the built-in demo phantoms, so a preset that starts from
    the modality-agnostic autoencoder starts from the phantom prior instead (made from the
    same generator; an explicit ae_init override still wins).
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; choose one of {PRESETS}")
    parts = _preset_parts(preset, image_size or PRESET_IMAGE_SIZE[preset])
    if (overrides or {}).get("model.spatial_dims") == 3:
        parts = _volume_parts(preset, parts)
    parts["model"] = dataclasses.replace(parts["model"], n_classes=len(class_names))
    parts["privacy"] = PrivacyConfig(epsilon=epsilon, delta=delta, **parts.get("privacy", {}))
    parts.setdefault("dm", DiffusionConfig())
    parts.setdefault("aggregation", AggregationConfig())
    inits = {"ae_init": parts.pop("ae_init", "random"), "dm_init": parts.pop("dm_init", "random")}
    overrides = dict(overrides or {})
    if (inits["ae_init"] == "public-generic" and "ae_init" not in overrides
            and (phantom_data or overrides.get("model.mask_channels")
                 or overrides.get("dm_init") == "public-healthy-phantoms")):
        # The paired prior and the healthy denoiser prior belong to the phantom autoencoder.
        inits["ae_init"] = "public-phantoms"
    for key, value in overrides.items():
        if key in inits:
            inits[key] = str(value)
            continue
        section, _, name = key.partition(".")
        _check(section in parts and bool(name), f"override {key!r}: use SECTION.FIELD with "
               f"SECTION in {sorted(parts)}")
        current = parts[section]
        _check(name in {f.name for f in fields(current)},
               f"override {key!r}: {type(current).__name__} has no field {name!r}")
        value = jsonio.decode_float(value)
        _check_override_type(key, typing.get_type_hints(type(current))[name], value)
        if isinstance(getattr(current, name), tuple) and isinstance(value, list):
            value = tuple(value)
        parts[section] = dataclasses.replace(current, **{name: value})
    _check_unused_plan(parts, overrides or {}, preset)
    return RunConfig(preset=preset, seed=seed, device=device, class_names=tuple(class_names),
                     **inits, **parts)
