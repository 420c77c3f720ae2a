import math

import pytest

from ldm_core.config import (
    ConfigError,
    ModelConfig,
    PhaseConfig,
    PrivacyConfig,
    RunConfig,
    build_config,
)


@pytest.mark.parametrize("preset", ["tiny", "quick", "standard"])
def test_presets_build_and_round_trip_json(preset: str) -> None:
    cfg = build_config(preset=preset, image_size=32 if preset == "tiny" else 64,
                       class_names=("a", "b", "c"), epsilon=math.inf)
    back = RunConfig.from_dict(__import__("json").loads(cfg.to_json()))
    assert back == cfg
    assert back.privacy.epsilon == math.inf and not back.privacy.private


@pytest.mark.parametrize(
    "make",
    [
        lambda: ModelConfig(image_size=30),  # not divisible by the downsampling
        lambda: ModelConfig(ae_channels=(15, 32, 32)),  # not divisible by groups
        lambda: ModelConfig(dm_attention=(False,)),
        lambda: ModelConfig(n_classes=1),
        lambda: PhaseConfig(batch_size=0),
        lambda: PhaseConfig(noise_multiplicity=0),
        lambda: PrivacyConfig(epsilon=0),
        lambda: PrivacyConfig(delta=1.0),
        lambda: PrivacyConfig(ae_share=1.0),
        lambda: RunConfig(preset="huge"),
        lambda: build_config(overrides={"diffusion.nope": 1}),
        lambda: build_config(overrides={"nosection.rounds": 1}),
        lambda: build_config(preset="tiny", image_size=16, overrides={"diffusion.lr": -1.0}),
        lambda: build_config(preset="tiny", image_size=16,
                             overrides={"diffusion.average_last": 0}),
        lambda: PhaseConfig(server_momentum=1.0),
        lambda: PhaseConfig(server_momentum=-0.1),
        lambda: PhaseConfig(server_lr=0.0),
        lambda: build_config(overrides={"dm.timestep_logit_std": 0}),
        lambda: build_config(overrides={"dm.timestep_logit_mean": 9}),
    ],
)
def test_bad_configs_raise(make) -> None:
    with pytest.raises(ConfigError):
        make()


def test_overrides_apply() -> None:
    cfg = build_config(preset="tiny", image_size=16,
                       overrides={"diffusion.rounds": 5, "model.dm_channels": [8, 8]})
    assert cfg.diffusion.rounds == 5
    assert cfg.model.dm_channels == (8, 8)


def test_unknown_key_in_saved_config_raises() -> None:
    d = __import__("json").loads(build_config(preset="tiny", image_size=16).to_json())
    d["model"]["bogus"] = 1
    with pytest.raises(ConfigError, match="bogus"):
        RunConfig.from_dict(d)


def test_a_3d_run_gets_the_presets_volume_plan_and_refuses_a_2d_denoiser_prior() -> None:
    from ldm_core.pretrain import load_pretrained, pretrained_path

    cfg = build_config(preset="quick", overrides={"model.spatial_dims": 3})
    assert cfg.model.spatial_dims == 3
    assert (cfg.ae_init, cfg.dm_init) == ("public-phantoms", "random")
    assert cfg.model.ae_channels == (8, 16, 32) and cfg.model.latent_shape == (8, 8, 8, 8)
    assert cfg.autoencoder.physical_batch_size == 16
    assert cfg.privacy.scale_clip == 2.0  # small cohorts: the 2D clip drowns the scale release
    # The shipped 3D prior is a 3D network (the 2D one cannot load into it).
    assert "-3d" in pretrained_path(cfg.model).name
    assert any(v.ndim == 5 for v in load_pretrained(cfg.model).values())
    tiny = build_config(preset="tiny", image_size=16, overrides={"model.spatial_dims": 3})
    assert (tiny.ae_init, tiny.dm_init) == ("random", "random")
    two_d = build_config(preset="quick")
    assert two_d.model.spatial_dims == 2 and two_d.ae_init == "public-generic"
    with pytest.raises(ConfigError, match="dm_init=random"):
        build_config(preset="quick", overrides={"model.spatial_dims": 3,
                                                "dm_init": "public-healthy-phantoms"})


def test_the_quick_autoencoder_prior_is_modality_agnostic_except_on_phantoms() -> None:
    """Real data of any modality starts from the generic prior; the demo's phantoms, paired
    runs and the healthy denoiser prior start from the phantom one; an explicit choice wins."""
    assert build_config(preset="quick").ae_init == "public-generic"
    assert build_config(preset="quick", phantom_data=True).ae_init == "public-phantoms"
    assert build_config(preset="quick", overrides={"model.mask_channels": 1}
                        ).ae_init == "public-phantoms"
    assert build_config(preset="quick", overrides={"dm_init": "public-healthy-phantoms"}
                        ).ae_init == "public-phantoms"
    assert build_config(preset="quick", phantom_data=True,
                        overrides={"ae_init": "public-generic"}).ae_init == "public-generic"
    assert build_config(preset="tiny", phantom_data=True).ae_init == "random"
    for bad in ({"model.mask_channels": 1}, {"model.spatial_dims": 3}):
        with pytest.raises(ConfigError, match="'public-generic' is a 2D image-only"):
            build_config(preset="quick", overrides={**bad, "ae_init": "public-generic"})
    with pytest.raises(ConfigError, match="public-phantoms for the shipped denoiser"):
        build_config(preset="quick", overrides={"ae_init": "public-generic",
                                                "dm_init": "public-healthy-phantoms"})


def test_a_voxel_size_is_for_volumes_only_and_must_be_a_size_in_mm() -> None:
    cfg = build_config(preset="quick", overrides={"model.spatial_dims": 3,
                                                  "model.voxel_mm": 1.5})
    assert cfg.model.voxel_mm == 1.5
    assert RunConfig.from_dict(__import__("json").loads(cfg.to_json())) == cfg
    assert build_config(preset="quick", overrides={"model.spatial_dims": 3}).model.voxel_mm \
        is None  # default: each scan's field of view fitted to the grid
    with pytest.raises(ConfigError, match="voxel_mm=1.5 sets the voxel size of volumes"):
        build_config(preset="quick", overrides={"model.voxel_mm": 1.5})
    for bad in (0.0, -1.0, 100.0, True, "1.5"):
        with pytest.raises(ConfigError, match="voxel_mm must be a voxel size in mm"):
            ModelConfig(image_size=16, ae_channels=(8, 8), spatial_dims=3, voxel_mm=bad)


def test_an_autoencoder_that_is_neither_trained_nor_pretrained_is_refused() -> None:
    """Zero autoencoder rounds keep the starting weights: fine for a prior, noise for 'random'."""
    frozen = build_config(preset="quick", overrides={"autoencoder.rounds": 0})
    assert frozen.autoencoder.rounds == 0 and frozen.ae_init == "public-generic"
    with pytest.raises(ConfigError, match="every latent would be noise"):
        build_config(preset="tiny", image_size=16, overrides={"autoencoder.rounds": 0})
    with pytest.raises(ConfigError, match="every latent would be noise"):
        build_config(preset="quick", overrides={"autoencoder.rounds": 0, "ae_init": "random"})


def test_a_phase_override_without_rounds_of_that_phase_is_refused() -> None:
    """`--ae-steps 32` on a quick run (0 autoencoder rounds) used to change nothing silently."""
    with pytest.raises(ConfigError, match=r"autoencoder.local_steps.*0 autoencoder rounds.*"
                                          r"--ae-rounds N"):
        build_config(preset="quick", overrides={"autoencoder.local_steps": 32})
    with pytest.raises(ConfigError, match="autoencoder.lr"):
        build_config(preset="tiny", overrides={"autoencoder.rounds": 0, "autoencoder.lr": 1e-3,
                                               "ae_init": "public-phantoms"})
    trained = build_config(preset="quick", overrides={"autoencoder.local_steps": 32,
                                                      "autoencoder.rounds": 2})
    assert trained.autoencoder.local_steps == 32 and trained.autoencoder.rounds == 2
    assert build_config(preset="quick", overrides={"autoencoder.rounds": 0}).autoencoder.rounds == 0
    assert build_config(preset="quick", overrides={"diffusion.local_steps": 8}
                        ).diffusion.local_steps == 8


@pytest.mark.parametrize(("key", "value", "expected"), [
    ("dm.guidance_scale", "abc", "expected float, got str"),
    ("dm.timestep_logit_mean", "low", "expected float or null, got str"),
    ("diffusion.rounds", 2.5, "expected int, got float"),
    ("diffusion.rounds", True, "expected int, got bool"),
    ("model.dm_channels", 32, "expected list, got int"),
    ("model.dm_channels", "wide", "expected list, got str"),
    ("aggregation.transfer", 16, "expected str, got int"),
])
def test_an_override_of_the_wrong_kind_is_named_not_a_type_error(key, value, expected) -> None:
    """`--set dm.guidance_scale=abc` used to end in a TypeError traceback inside a check."""
    with pytest.raises(ConfigError, match=f"override {key}=.*{expected}"):
        build_config(preset="tiny", image_size=16, overrides={key: value})


def test_overrides_of_the_right_kind_still_apply() -> None:
    cfg = build_config(preset="tiny", image_size=16, overrides={
        "dm.guidance_scale": 3, "dm.timestep_logit_mean": -1, "aggregation.norm_bound": "inf",
        "model.dm_attention": [False, True], "diffusion.train_only": "attn"})
    assert cfg.diffusion.train_only == ("attn",)  # a bare string: one piece of a str tuple
    assert cfg.dm.guidance_scale == 3 and cfg.dm.timestep_logit_mean == -1
    assert cfg.aggregation.norm_bound == math.inf and cfg.model.dm_attention == (False, True)


@pytest.mark.parametrize("generic", [False, True], ids=["phantom-prior", "generic-prior"])
def test_the_quick_2d_scale_clip_is_tight_but_clips_no_demo_latent(generic: bool) -> None:
    """The latent-scale release's noise grows with its clip: the quick 2D plan clips at 4, not
    the default 10 (at epsilon 1's fixed releases clip 10 put 14% of MRI releases at the clamp),
    and no per-image E[z^2] of the shipped 2D priors on demo phantoms reaches it (a clip that
    did would bias the scale)."""
    import torch

    from ldm_core.models import encode, make_autoencoder
    from ldm_core.phantoms import render_demo
    from ldm_core.pretrain import load_pretrained

    cfg = build_config(preset="quick", class_names=("a", "b", "c", "d"))
    assert cfg.privacy.scale_clip == 4.0 < PrivacyConfig().scale_clip
    images, *_ = render_demo(n_patients=48, slices_per_patient=1, image_size=32, seed=3)
    ae = make_autoencoder(cfg.model)
    ae.load_state_dict(load_pretrained(cfg.model, generic=generic))
    ae.eval()
    x = torch.as_tensor(images).float().div(255.0).mul(2.0).sub(1.0).unsqueeze(1)  # as loaded
    z = encode(ae, x, 1.0, torch.device("cpu"))
    m2 = z.pow(2).flatten(1).mean(dim=1)
    assert float(m2.max()) < cfg.privacy.scale_clip / 2
