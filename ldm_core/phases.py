"""The training phases of a run as objects, in training order (a registry, as Opacus/DiT do).

Why a type: the site, the coordinator, the protocol and the benchmarks all need to know, per
phase, which network trains, on which tensors, with which per-sample loss, from which share of
the privacy budget and under which checkpoint names. Spelled as string comparisons that knowledge
was spread over many files; here each phase is one `Phase` object, so a new phase (e.g. a
mask-conditioned denoiser) is one new entry in `PHASES` (plus its `PhaseConfig` in RunConfig).

A `Phase` only describes *what* trains. *How* it trains privately (charge the ledger first,
privacy randomness from the site's own source, per-patient grouping, the sigma/clip check) stays
with the caller (client.tasks, ldm_core.training): nothing here reads data on its own or draws
privacy-relevant randomness, every random bit comes from the generator passed in.

ldm_core must not import Flower or the apps (tests/test_layering.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from ldm_core.config import ModelConfig, PhaseConfig, RunConfig
from ldm_core.data import ImageSet
from ldm_core.losses import autoencoder_loss, diffusion_loss, multiplicity_diffusion_loss
from ldm_core.models import (
    any_site,
    embed_index,
    encode,
    make_autoencoder,
    make_denoiser,
    make_train_scheduler,
)

if TYPE_CHECKING:  # the alias only: Opacus need not load for the protocol to know the phases
    from ldm_core.training import LossFn

# Rows per forward pass when scoring a whole split (memory bound, not a privacy parameter).
EVAL_CHUNK = 256

Tensors = tuple[torch.Tensor, ...]
InputsFn = Callable[[ImageSet, "nn.Module | None", float, torch.device, "int | None"], Tensors]
InitFn = Callable[[RunConfig], "dict[str, torch.Tensor] | None"]


@dataclass(frozen=True)
class Phase:
    """One federated training phase: its model, inputs, losses, budget share and names.

    `name` is what goes over the wire, into the ledger and into metrics/state.json; `prefix`
    names its per-round checkpoints (``{prefix}-round-003``); `checkpoint_key` is the module's
    name inside a checkpoint. Those three must never change for an existing phase: run folders
    and site ledgers written earlier are found and resumed by them.
    """

    name: str
    prefix: str
    checkpoint_key: str
    config_field: str
    needs_autoencoder: bool
    factory: Callable[[ModelConfig], nn.Module]
    inputs: InputsFn
    loss: Callable[[RunConfig, PhaseConfig], LossFn]
    eval_loss: Callable[[RunConfig], LossFn]
    share: Callable[[RunConfig], float]
    pretrained: InitFn

    def config(self, cfg: RunConfig) -> PhaseConfig:
        """This phase's training plan in the run configuration."""
        return getattr(cfg, self.config_field)

    def make_model(self, model_cfg: ModelConfig) -> nn.Module:
        """A freshly initialised network (MONAI factory; the weights usually get replaced)."""
        return self.factory(model_cfg)

    def budget_share(self, cfg: RunConfig) -> float:
        """Fraction of the site's training budget this phase is calibrated for."""
        return self.share(cfg)

    def initial_weights(self, cfg: RunConfig) -> dict[str, torch.Tensor] | None:
        """The public prior the coordinator starts from, or None for a random start."""
        return self.pretrained(cfg)

    def train_inputs(self, split: ImageSet, *, autoencoder: nn.Module | None = None,
                     scale_factor: float = 1.0, device: torch.device | None = None,
                     site: int | None = None) -> Tensors:
        """The tensors the phase's loss trains on, built from a site's train split.

        Row i of every tensor belongs to image i of `split`, so the caller's per-patient
        grouping (`split.patients`) still applies to the result. `site` is the site's slot of a
        site-conditional model (the coordinator assigns it; None: none).
        """
        if self.needs_autoencoder and autoencoder is None:
            raise ValueError(f"{self.name} round without autoencoder weights")
        return self.inputs(split, autoencoder, scale_factor, device or torch.device("cpu"), site)

    def train_loss(self, cfg: RunConfig) -> LossFn:
        """The per-sample ([B]) training loss that dp_train clips and noises."""
        return self.loss(cfg, self.config(cfg))

    @torch.no_grad()
    def eval_losses(self, model: nn.Module, tensors: Tensors, cfg: RunConfig, seed: int,
                    device: torch.device) -> torch.Tensor:
        """Per-sample loss of a trained model on `tensors` (the input to a DP mean), on the CPU.

        `seed` is the message seed: this randomness (noise, timesteps) is not privacy-relevant,
        the release of the mean is noised by the caller from the site's privacy source.
        """
        gen = torch.Generator().manual_seed(seed + 3)
        model.eval().to(device)
        fn = self.eval_loss(cfg)
        out = []
        for i in range(0, tensors[0].shape[0], EVAL_CHUNK):
            chunk = tuple(t[i:i + EVAL_CHUNK].to(device) for t in tensors)
            out.append(fn(model, chunk, gen).cpu())
        return torch.cat(out)


# ------------------------------------------------------------------------- autoencoder


def _image_inputs(split: ImageSet, autoencoder: nn.Module | None, scale_factor: float,
                  device: torch.device, site: int | None) -> Tensors:
    return (split.model_input(),)


def _ae_loss(cfg: RunConfig, phase_cfg: PhaseConfig) -> LossFn:
    """L1 + KL with the reparameterisation noise drawn from the step's (non-private) generator."""
    m = cfg.model

    def fn(model: nn.Module, batch: Tensors, gen: torch.Generator) -> torch.Tensor:
        x = batch[0]
        noise = torch.randn((x.shape[0], *m.latent_shape), generator=gen).to(x.device)
        return autoencoder_loss(model, x, kl_weight=cfg.dm.kl_weight, noise=noise)

    return fn


def _ae_eval_loss(cfg: RunConfig) -> LossFn:
    return _ae_loss(cfg, cfg.autoencoder)


def _ae_share(cfg: RunConfig) -> float:
    return cfg.privacy.ae_share


def _ae_pretrained(cfg: RunConfig) -> dict[str, torch.Tensor] | None:
    from ldm_core.pretrain import autoencoder_prior  # weights are read only when asked

    return autoencoder_prior(cfg)


# ------------------------------------------------------------------------- diffusion


def _latent_inputs(split: ImageSet, autoencoder: nn.Module | None, scale_factor: float,
                   device: torch.device, site: int | None) -> Tensors:
    """Unit-scaled latents of the frozen autoencoder, the class labels and the site slot
    (``-1`` when the site has none: it trains the "any site" embedding only)."""
    assert autoencoder is not None  # Phase.train_inputs checked
    slot = -1 if site is None else int(site)
    return (encode(autoencoder, split.model_input(), scale_factor, device), split.labels,
            torch.full_like(split.labels, slot))


def _sites(cfg: RunConfig, s: torch.Tensor) -> torch.Tensor:
    """Slot -1 (none given) is "any site"."""
    return torch.where(s < 0, torch.full_like(s, any_site(cfg.model)), s)


def _dm_loss(cfg: RunConfig, phase_cfg: PhaseConfig) -> LossFn:
    """K-sample denoising loss with classifier-free label dropout (the null label n_classes)
    and, for a site-conditional model, site dropout to "any site"."""
    sched = make_train_scheduler(cfg.model)
    null = cfg.model.n_classes
    logit = (None if cfg.dm.timestep_logit_mean is None
             else (cfg.dm.timestep_logit_mean, cfg.dm.timestep_logit_std))

    def fn(model: nn.Module, batch: Tensors, gen: torch.Generator) -> torch.Tensor:
        z, y, s = batch
        drop = torch.rand(y.shape[0], generator=gen).to(y.device) < cfg.dm.label_dropout
        y = torch.where(drop, torch.full_like(y, null), y)
        s = _sites(cfg, s)
        if cfg.model.site_slots:
            away = torch.rand(y.shape[0], generator=gen).to(y.device) < cfg.dm.site_dropout
            s = torch.where(away, torch.full_like(s, any_site(cfg.model)), s)
        return multiplicity_diffusion_loss(model, sched, z, embed_index(cfg.model, y, s),
                                           k=phase_cfg.noise_multiplicity, generator=gen,
                                           timestep_logit=logit)

    return fn


def _dm_eval_loss(cfg: RunConfig) -> LossFn:
    """One (timestep, noise) draw per sample, true labels and sites: a plain denoising score."""
    m = cfg.model
    sched = make_train_scheduler(m)

    def fn(model: nn.Module, batch: Tensors, gen: torch.Generator) -> torch.Tensor:
        z, y, s = batch
        t = torch.randint(0, m.num_train_timesteps, (z.shape[0],), generator=gen).to(z.device)
        n = torch.randn(z.shape, generator=gen).to(z.device)
        return diffusion_loss(model, sched, z, embed_index(m, y, _sites(cfg, s)), timesteps=t,
                              noise=n)

    return fn


def _dm_share(cfg: RunConfig) -> float:
    return 1 - cfg.privacy.ae_share


def _dm_pretrained(cfg: RunConfig) -> dict[str, torch.Tensor] | None:
    from ldm_core.pretrain import denoiser_prior

    return denoiser_prior(cfg)


# ------------------------------------------------------------------------- registry

AUTOENCODER = Phase(
    name="autoencoder", prefix="ae", checkpoint_key="autoencoder", config_field="autoencoder",
    needs_autoencoder=False, factory=make_autoencoder, inputs=_image_inputs, loss=_ae_loss,
    eval_loss=_ae_eval_loss, share=_ae_share, pretrained=_ae_pretrained)
"""Phase 1: the KL autoencoder on images. Its final weights are the frozen encoder/decoder
of every later phase (`needs_autoencoder`), after the DP latent-scale release."""

DIFFUSION = Phase(
    name="diffusion", prefix="dm", checkpoint_key="denoiser", config_field="diffusion",
    needs_autoencoder=True, factory=make_denoiser, inputs=_latent_inputs, loss=_dm_loss,
    eval_loss=_dm_eval_loss, share=_dm_share,
    pretrained=_dm_pretrained)
"""Phase 2: the class-conditional denoiser on scaled latents of the frozen autoencoder."""

PHASES: dict[str, Phase] = {p.name: p for p in (AUTOENCODER, DIFFUSION)}
"""Every phase by name, in training order."""


def check_models(cfg: RunConfig) -> None:
    """Build every phase's model, load its prior (strictly) and resolve its `train_only` pieces.

    All of it depends on the configuration alone, so a missing or mismatched prior file, or a
    piece that names no parameter, stops a run here, before any site is charged for a round
    that would then fail.
    """
    from ldm_core.training import trainable_names

    for p in PHASES.values():
        model = p.make_model(cfg.model)
        prior = p.initial_weights(cfg)
        if prior is not None:
            model.load_state_dict(prior)
        trainable_names(model, p.config(cfg).train_only)


def get_phase(name: str) -> Phase:
    """The registered phase called `name`; a clear error for anything else (e.g. a bad message)."""
    try:
        return PHASES[name]
    except KeyError:
        raise ValueError(f"unknown phase {name!r}; expected one of {tuple(PHASES)}") from None
