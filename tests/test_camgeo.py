"""The student model (camgeo.py): shapes, adaLN-Zero, the depth and copy heads, CFG dropout, rectified flow,
sampler."""

import pytest
import torch

import camgeo
import conditioning
import data
import geometry
from test_conditioning import intrinsics, random_w2c

CONFIG = camgeo.PRESETS["smoke"]
F, S = CONFIG.num_frames, CONFIG.image_size


def inputs(batch=2, mask=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    video = torch.rand(batch, F, 3, S, S, generator=g)
    mask = torch.ones(batch, F) if mask is None else mask
    camera = conditioning.camera_conditioning(random_w2c(batch, F, seed), intrinsics(batch, F), mask, S, S)
    return video, ["a red room with a blue ball"] * batch, camera


def randomise_zero_layers(model, seed=0):
    """adaLN-Zero makes a fresh model ignore its inputs; give the zeroed layers values so outputs depend on them."""
    g = torch.Generator().manual_seed(seed)
    output_conv = {id(p) for p in model.copy_head.net[-1].parameters()}  # zero-initialised too
    for name, p in model.named_parameters():
        if "adaLN_modulation" in name or id(p) in output_conv:
            p.data = 0.1 * torch.randn(p.shape, generator=g)


def test_forward_returns_clean_video_of_input_shape():
    model = camgeo.CamGeo(CONFIG).eval()
    video, prompts, camera = inputs()
    v = model(video * 2 - 1, torch.rand(2), video[:, 0] * 2 - 1, prompts, camera)
    assert v.shape == video.shape


@pytest.mark.parametrize("name", ["smoke", "cpu"])
def test_preset_model_denoises_a_clip_of_its_own_size(name):
    config = camgeo.PRESETS[name]
    model = camgeo.CamGeo(config).eval()
    size, frames = config.image_size, config.num_frames
    w2c = torch.eye(4).expand(1, frames, 4, 4)
    K = torch.tensor([[size, 0, size / 2], [0, size, size / 2], [0, 0, 1]]).expand(1, 3, 3)
    camera, _, _ = conditioning.camera_inputs(w2c, K, "full", 1.0, height=size, width=size)
    x_t = torch.randn(1, frames, 3, size, size)
    with torch.no_grad():
        x0_hat = model(x_t, torch.tensor([0.5]), x_t[:, 0], ["a room"], camera)
    assert x0_hat.shape == x_t.shape and torch.isfinite(x0_hat).all()


def test_adaln_zero_makes_every_block_identity_at_init():
    model = camgeo.CamGeo(CONFIG)
    x = torch.randn(2, F, (S // CONFIG.patch_size) ** 2, CONFIG.width)
    c = torch.randn(2, CONFIG.width)
    for block in model.blocks:
        assert torch.equal(block(x, c), x)


def test_block_is_not_identity_once_modulation_is_nonzero():
    model = camgeo.CamGeo(CONFIG)
    randomise_zero_layers(model)
    x = torch.randn(2, F, (S // CONFIG.patch_size) ** 2, CONFIG.width)
    assert not torch.allclose(model.blocks[0](x, torch.randn(2, CONFIG.width)), x)


def start_weights():
    """A new CopyHead's softmax weights: COPY_START_LOGIT for the rotation-only warp, 0 for every other choice (the
    other planes, the reference through the depth the model reads, the generated colour)."""
    logits = torch.zeros(conditioning.NUM_PLANES + 2)
    logits[0] = camgeo.COPY_START_LOGIT
    return logits.softmax(0)


def test_new_model_predicts_its_starting_mixture_of_the_copies():
    """Where the depth a new model reads says the reference shows the pixel, it copies the reference marched
    through that depth; elsewhere, the copy head's last convolution starting at zero, it returns the same mixture
    at every pixel: mostly the reference on the plane at infinity (the rotation-only warp), a little of every other
    plane and of the marched reference. Planes are the reference moved along each frame's rays (the interpolated
    pose's where none is given), and the reference itself when the camera is dropped (guidance's unconditional
    branch)."""
    model = camgeo.CamGeo(CONFIG).eval()
    mask = torch.ones(2, F)
    mask[:, 1] = 0
    video, prompts, camera = inputs(mask=mask)
    x_t = torch.randn_like(video)
    x0_hat, inverse_depth = model(x_t, torch.rand(2), video[:, 0], prompts, camera, with_depth=True)
    surface, seen = camgeo.reference_on_surface(video[:, 0], camera, camgeo.depth_test(inverse_depth, camera))
    assert seen.any() and not seen.all()  # not vacuous: both branches are checked below
    weights = start_weights()
    for frame in range(F):
        grids = camera[:, frame, conditioning.GRID_CHANNELS].unflatten(1, (conditioning.NUM_PLANES, 2))
        planes = [torch.nn.functional.grid_sample(video[:, 0], grids[:, k].permute(0, 2, 3, 1),
                                                  padding_mode="border", align_corners=False)
                  for k in range(conditioning.NUM_PLANES)]
        generated = planes[0]  # the warp plus a change that starts at zero
        mixture = sum(w * c for w, c in zip(weights, [*planes, surface[:, frame], generated]))
        expected = torch.where(seen[:, frame, None], surface[:, frame], mixture)
        torch.testing.assert_close(x0_hat[:, frame], expected)
    warp = conditioning.reference_guess(video[:, 0], camera)
    assert not torch.allclose(warp[:, 2], video[:, 0], atol=1e-3)  # not vacuous: the random pose moves it
    dropped = model(x_t, torch.rand(2), video[:, 0], prompts, camera, force_drop=torch.tensor([True, True]))
    torch.testing.assert_close(dropped, video[:, :1].expand_as(video))


def test_samples_do_not_change_when_every_translation_is_scaled():
    """Poses keep their own scale (RealEstate10K's and VGGT's are arbitrary): multiplying every translation of a
    clip by 10 leaves the student's conditioning, and so its samples, unchanged."""
    model = camgeo.CamGeo(CONFIG).eval()
    randomise_zero_layers(model)
    video, prompts, _ = inputs(batch=1)
    w2c = random_w2c(1, F, seed=4)
    scaled = w2c.clone()
    scaled[..., :3, 3] *= 10
    mask = torch.ones(1, F)
    mask[0, 2] = 0
    cameras = [conditioning.camera_conditioning(poses, intrinsics(1, F), mask, S, S) for poses in (w2c, scaled)]
    samples = [camgeo.sample(model, video[:, 0], prompts, camera, num_steps=4, cfg_scale=2.0, seed=0)
               for camera in cameras]
    torch.testing.assert_close(samples[0], samples[1], atol=1e-4, rtol=0)
    moved = camgeo.sample(model, video[:, 0], prompts,
                          conditioning.camera_conditioning(random_w2c(1, F, seed=5), intrinsics(1, F), mask, S, S),
                          num_steps=4, cfg_scale=2.0, seed=0)
    assert (moved - samples[0]).abs().max() > 1e-2  # not vacuous: another path does change them


def test_keyframe_mask_changes_model_output():
    """The same poses, given at every frame or at frame 0 only, give different videos. (Moving poses: under a
    still camera the reference shows every pixel, and the model copies it whatever the mask says.)"""
    model = camgeo.CamGeo(CONFIG).eval()
    randomise_zero_layers(model)
    w2c = random_w2c(1, F, seed=3)
    mask = torch.ones(1, F)
    mask[0, 1:] = 0
    video = torch.rand(1, F, 3, S, S)
    t = torch.tensor([0.5])
    out_given, out_missing = (model(video, t, video[:, 0], ["room"],
                                    conditioning.camera_conditioning(w2c, intrinsics(1, F), keyframes, S, S))
                              for keyframes in (torch.ones(1, F), mask))
    assert not torch.allclose(out_given, out_missing, atol=1e-4)


def test_dropped_camera_hides_the_resampled_reference_too():
    """Guidance's unconditional branch must not see the camera through the resampled reference."""
    model = camgeo.CamGeo(CONFIG).eval()
    randomise_zero_layers(model)
    video, prompts, camera = inputs()
    _, _, other_camera = inputs(seed=9)
    t, drop = torch.tensor([0.5, 0.5]), torch.tensor([True, True])
    a = model(video, t, video[:, 0], prompts, camera, force_drop=drop)
    b = model(video, t, video[:, 0], prompts, other_camera, force_drop=drop)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(model(video, t, video[:, 0], prompts, camera),
                              model(video, t, video[:, 0], prompts, other_camera), atol=1e-4)


def test_text_dropout_replaces_prompt_with_null_embedding():
    embedder = camgeo.TextEmbedder(64, 8, drop_prob=0.0).eval()
    out = embedder(["a red ball", "a blue box"], force_drop=torch.tensor([True, False]))
    assert torch.equal(out[0], embedder.null_embedding)
    assert not torch.allclose(out[1], embedder.null_embedding)


def test_text_dropout_probability_one_drops_every_prompt_in_training():
    embedder = camgeo.TextEmbedder(64, 8, drop_prob=1.0).train()
    out = embedder(["a red ball", "a blue box"])
    assert torch.equal(out, embedder.null_embedding.expand(2, 8))


def test_empty_prompt_is_the_null_embedding():
    embedder = camgeo.TextEmbedder(64, 8, drop_prob=0.0).eval()
    assert torch.equal(embedder([""])[0], embedder.null_embedding)


def test_tokenize_ignores_case_and_punctuation():
    ids_a, _ = camgeo.tokenize(["A Red, ball!"], 1024)
    ids_b, _ = camgeo.tokenize(["a red ball"], 1024)
    assert torch.equal(ids_a, ids_b) and len(ids_a) == 3


def test_tokenize_offsets_mark_where_each_prompt_starts():
    ids, offsets = camgeo.tokenize(["one two", "", "three"], 1024)
    assert offsets.tolist() == [0, 2, 2] and len(ids) == 3


def test_camera_dropout_replaces_camera_tokens_with_null_embedding():
    embedder = camgeo.CameraEmbedder(4, 8, drop_prob=0.0).eval()
    camera = torch.randn(2, F, conditioning.CAMERA_CHANNELS, S, S)
    out = embedder(camera, torch.tensor([True, False]))
    assert torch.equal(out[0], embedder.null_embedding.expand_as(out[0]))
    assert not torch.allclose(out[1], embedder.null_embedding.expand_as(out[1]))


def test_training_losses_noise_the_video_on_the_straight_path_and_score_the_clean_prediction():
    model = camgeo.CamGeo(CONFIG).train()
    randomise_zero_layers(model)
    video, prompts, camera = inputs()
    out = camgeo.training_losses(model, video, prompts, camera, torch.Generator().manual_seed(0))
    # the same draws, made independently: logit-normal t, then Gaussian noise
    generator = torch.Generator().manual_seed(0)
    t = camgeo.sample_time(2, generator).view(-1, 1, 1, 1, 1)
    noise = torch.randn(video.shape, generator=generator)
    x0 = video * 2 - 1
    assert torch.allclose(out["t"], t.flatten()) and torch.allclose(out["x_t"], (1 - t) * x0 + t * noise)
    assert torch.allclose(out["loss"], (out["x0_pred"] * 2 - 1 - x0).pow(2).mean())  # no depth target: no depth term
    assert out["x0_pred"].requires_grad and out["x0_pred"].shape == video.shape
    out["x0_pred"].sum().backward()  # gradients reach the weights through x0_pred
    assert model.final_layer.linear.weight.grad.abs().sum() > 0


def test_exact_clean_prediction_gives_zero_loss_and_the_true_velocity():
    video, prompts, camera = inputs()

    class Oracle(torch.nn.Module):  # a denoiser that knows the answer
        config = CONFIG
        training = False

        def forward(self, x_t, t, reference, prompts, camera, force_drop=None, camera_drop=None, with_depth=False):
            clean = video * 2 - 1
            return (clean, torch.zeros(clean.shape[0], S, S)) if with_depth else clean

    out = camgeo.training_losses(Oracle(), video, prompts, camera, torch.Generator().manual_seed(1))
    t = out["t"].view(-1, 1, 1, 1, 1)
    noise = (out["x_t"] - (1 - t) * (video * 2 - 1)) / t
    assert torch.allclose(out["v_pred"], noise - (video * 2 - 1), atol=1e-4)
    assert out["loss"].item() < 1e-10


def test_logit_normal_times_are_inside_zero_one_and_centred():
    model = camgeo.CamGeo(CONFIG).eval()
    video, prompts, camera = inputs(batch=64)
    t = camgeo.training_losses(model, video, prompts, camera, torch.Generator().manual_seed(0))["t"]
    assert torch.all((t > 0) & (t < 1)) and abs(t.median().item() - 0.5) < 0.1


def test_sampler_is_deterministic_under_a_seed_and_in_range():
    model = camgeo.CamGeo(CONFIG).eval()
    randomise_zero_layers(model)
    video, prompts, camera = inputs()
    a = camgeo.sample(model, video[:, 0], prompts, camera, num_steps=3, cfg_scale=2.0, seed=7)
    b = camgeo.sample(model, video[:, 0], prompts, camera, num_steps=3, cfg_scale=2.0, seed=7)
    c = camgeo.sample(model, video[:, 0], prompts, camera, num_steps=3, cfg_scale=2.0, seed=8)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == video.shape and a.min() >= 0 and a.max() <= 1


def test_guidance_scale_one_equals_conditional_prediction_only():
    model = camgeo.CamGeo(CONFIG).eval()
    randomise_zero_layers(model)
    video, prompts, camera = inputs(batch=1)
    x = torch.randn(1, F, 3, S, S, generator=torch.Generator().manual_seed(3))
    x0_hat = model(x, torch.ones(1), video[:, 0] * 2 - 1, prompts, camera)
    expected = ((x0_hat + 1) / 2).clamp(0, 1)  # one Euler step from t = 1 to 0 lands on x0_hat
    sampled = camgeo.sample(model, video[:, 0], prompts, camera, num_steps=1, cfg_scale=1.0, seed=3)
    assert torch.allclose(sampled, expected, atol=1e-5)


def test_overfitting_one_clip_reduces_the_loss():
    torch.manual_seed(0)
    model = camgeo.CamGeo(CONFIG)
    clip = data.render_clip(0, F, S, S)
    video = clip["video"].expand(4, -1, -1, -1, -1)
    camera = conditioning.camera_conditioning(clip["w2c"].expand(4, -1, -1, -1),
                                              conditioning.intrinsics_vector(clip["K"]).expand(4, F, 4),
                                              torch.ones(4, F), S, S)
    prompts = [clip["prompt"]] * 4

    def fixed_loss():  # same t and noise every time, no dropout
        model.eval()
        with torch.no_grad():
            return camgeo.training_losses(model, video, prompts, camera, torch.Generator().manual_seed(123))["loss"]

    before = fixed_loss()
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(0)
    model.train()
    for _ in range(80):
        loss = camgeo.training_losses(model, video, prompts, camera, generator)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert fixed_loss() < 0.6 * before  # a model that learnt nothing stays near 1.0x


def test_depth_head_is_trained_toward_the_reference_inverse_depth_it_is_given():
    model = camgeo.CamGeo(CONFIG).train()
    video, prompts, camera = inputs()
    target = torch.full((2, S, S), 0.3)
    out = camgeo.training_losses(model, video, prompts, camera, torch.Generator().manual_seed(0), target)
    _, inverse_depth = model(out["x_t"], out["t"], video[:, 0] * 2 - 1, prompts, camera,
                             camera_drop=out["camera_drop"], with_depth=True)
    torch.testing.assert_close(out["loss_depth"], (inverse_depth - target).abs().mean())
    torch.testing.assert_close(out["loss"], out["loss_flow"] + camgeo.DEPTH_LOSS_WEIGHT * out["loss_depth"])
    out["loss_depth"].backward()
    assert model.depth_head.net[0].weight.grad.abs().sum() > 0


def test_depth_test_is_zero_on_the_plane_holding_the_surface_the_reference_sees():
    """A wall facing frame 0 at inverse depth rho (in the poses' unit), a camera slid sideways by one unit: a ray of
    the moved camera meets the wall at inverse distance rho * cos, and the plane at that inverse distance reads the
    wall's own inverse depth in the reference. Centre pixel (cos = 1): the plane at rho agrees, the others do not."""
    c2w = torch.eye(4).repeat(1, 2, 1, 1)
    c2w[0, 1, 0, 3] = 1.0
    size, rho = 33, conditioning.PLANE_INVERSE_DEPTHS[3]
    K = torch.tensor([size / 2, size / 2, size / 2, size / 2]).expand(1, 2, 4)
    camera = conditioning.camera_conditioning(geometry.invert_pose(c2w), K, torch.ones(1, 2), size, size)
    costs = camgeo.depth_test(torch.full((1, size, size), rho), camera).abs()  # (1, 2, D, H, W)
    centre = costs[0, 1, :, size // 2, size // 2]
    assert centre[3] < 1e-5 and (centre[torch.arange(conditioning.NUM_PLANES) != 3] > 0.05).all()


def test_reference_on_surface_marches_to_the_depth_between_two_planes():
    """A wall facing frame 0 at an inverse depth between two planes of the sweep, a camera slid sideways by one unit:
    marching through the wall's depth finds the wall between the planes, and moves the reference exactly as the
    reprojection through the true depth does (geometry.reproject_reference, an independent projection), where
    the nearest plane does not."""
    size, rho = 24, 0.3  # between the planes at 0.25 and 0.35
    c2w = torch.eye(4).repeat(1, 2, 1, 1)
    c2w[0, 1, 0, 3] = 1.0
    K = torch.tensor([size / 2, size / 2, size / 2, size / 2]).expand(1, 2, 4)
    camera = conditioning.camera_conditioning(geometry.invert_pose(c2w), K, torch.ones(1, 2), size, size)
    reference = torch.rand(1, 3, size, size, generator=torch.Generator().manual_seed(0))
    reference = torch.nn.functional.avg_pool2d(reference, 3, stride=1, padding=1, count_include_pad=False)
    wall = camgeo.depth_test(torch.full((1, size, size), rho), camera)
    moved, seen = camgeo.reference_on_surface(reference, camera, wall)
    moved, seen = moved[0, 1], seen[0, 1]
    K_matrix = torch.tensor([[size / 2, 0, size / 2], [0, size / 2, size / 2], [0, 0, 1]])[None]
    truth = geometry.reproject_reference(reference, torch.full((1, size, size), 1 / rho), K_matrix, c2w[:, 1])[0]
    inside = slice(2, size - 2), slice(2, size - 2 - round(size / 2 * rho) - 1)  # rows, columns seen by frame 0
    torch.testing.assert_close(moved[:, inside[0], inside[1]], truth[:, inside[0], inside[1]], atol=1e-4, rtol=0)
    assert seen[inside].all() and not seen[:, -1].any()  # the last column's rays leave the reference's view
    nearest = conditioning.reference_candidates(reference, camera)[0, 1, 3]  # the plane at 0.25
    assert (nearest[:, inside[0], inside[1]] - truth[:, inside[0], inside[1]]).abs().max() > 0.02


def test_reference_on_surface_passes_the_gradient_to_the_depth():
    """The marched point moves with the depth the model reads, so the video loss teaches the depth head too:
    the gradient with respect to that depth equals finite differences (gradcheck, double precision)."""
    size = 8
    c2w = torch.eye(4, dtype=torch.float64).repeat(1, 2, 1, 1)
    c2w[0, 1, :3, 3] = torch.tensor([0.8, 0.1, 0.3], dtype=torch.float64)
    K = torch.tensor([size / 2, size / 2, size / 2, size / 2], dtype=torch.float64).expand(1, 2, 4)
    camera = conditioning.camera_conditioning(geometry.invert_pose(c2w), K, torch.ones(1, 2, dtype=torch.float64),
                                              size, size)
    g = torch.Generator().manual_seed(0)
    reference = torch.rand(1, 3, size, size, generator=g, dtype=torch.float64)
    inverse_depth = (0.2 + 0.3 * torch.rand(1, size, size, generator=g, dtype=torch.float64)).requires_grad_()
    def marched(depth):
        return camgeo.reference_on_surface(reference, camera, camgeo.depth_test(depth, camera))[0]

    assert torch.autograd.gradcheck(marched, (inverse_depth,))
    marched(inverse_depth).sum().backward()
    assert inverse_depth.grad.abs().sum() > 0
