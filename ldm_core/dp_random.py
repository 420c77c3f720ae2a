"""Privacy randomness: where Poisson batch membership, DP-SGD noise and every Gaussian release
draw their random bits.

Why a separate source from the `seed` that drives everything else: a DP mechanism whose noise
can be recomputed is no DP mechanism. The coordinator chooses the run's seed (it is in every
message), so noise derived from it would let the coordinator subtract the noise from the weights
and run an exact membership test. Seeds keep driving what is not privacy-relevant (model
initialisation, diffusion timesteps and noise inside a clipped per-sample gradient, evaluation);
this module drives what is.

What the secure mode is, precisely. Opacus' own `secure_mode` needs `torchcsprng`, which has no
build for current torch, so it cannot be used here. Instead every privacy-relevant draw uses a
torch generator (MT19937 on CPU, Philox on CUDA) that is reseeded with 63 fresh bits from the
operating system's CSPRNG (`secrets`, i.e. getrandom/`/dev/urandom`) before every logical step,
every Poisson batch and every release. Nothing in a message can influence these bits. What this
does not protect against: an adversary who can read the site process' memory, or one who could
recover a 63-bit seed from a single step's noisy output (a search over 2**63 candidates per step,
each needing the private gradient). The Gaussian noise itself is drawn the way Opacus' secure mode
draws it (the sum of four normals, halved), which defeats the floating-point attacks on naive
Gaussian sampling (Opacus `_generate_noise`, after Holohan et al. 2021).

A reproducible mode exists for tests and simulation only: seeded by a *site-side* setting, never by
a message, and labelled "not private against anyone who knows the seed" wherever its results go.
"""

from __future__ import annotations

import hashlib
import random
import secrets
from dataclasses import dataclass

import torch

SECURE = "secure"
REPRODUCIBLE = "reproducible"
NOT_PRIVATE_NOTE = ("SEEDED (reproducible mode): NOT private against anyone who knows the seed; "
                    "for tests and research only")


@dataclass
class PrivacyRng:
    """Hands out generators for privacy-relevant draws; build with `secure()` or `reproducible()`.

    Mutable on purpose: in reproducible mode it is a stream, so two draws never repeat.
    """

    mode: str
    _stream: random.Random | None = None

    @classmethod
    def secure(cls) -> PrivacyRng:
        return cls(SECURE, None)

    @classmethod
    def reproducible(cls, seed: int, *salt: object) -> PrivacyRng:
        """Deterministic stream from a site-side seed plus salt (run, phase, round, site...).

        NOT private against anyone who knows `seed`. `fedldm site start` refuses this mode.
        """
        material = "|".join(str(x) for x in (seed, *salt)).encode()
        digest = int.from_bytes(hashlib.sha256(material).digest()[:8], "big")
        return cls(REPRODUCIBLE, random.Random(digest))

    @property
    def is_secure(self) -> bool:
        return self.mode == SECURE

    def next_seed(self) -> int:
        """63 bits: from the OS CSPRNG (secure), or the next value of the seeded stream."""
        if self._stream is None:
            return secrets.randbits(63)
        return self._stream.getrandbits(63)

    def generator(self, device: torch.device | str = "cpu") -> torch.Generator:
        """A fresh generator on `device`, seeded by `next_seed()`."""
        return torch.Generator(device=device).manual_seed(self.next_seed())

    def reseed(self, generator: torch.Generator) -> torch.Generator:
        """Reseed `generator` in place (before each step: no long MT19937 stream to recover)."""
        return generator.manual_seed(self.next_seed())


def privacy_rng_for(reproducible_seed: int | None, *salt: object) -> PrivacyRng:
    """The site's privacy randomness: secure unless the site itself configured a seed."""
    if reproducible_seed is None:
        return PrivacyRng.secure()
    return PrivacyRng.reproducible(reproducible_seed, *salt)
