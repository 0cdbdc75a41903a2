"""Official weight files (the state dict of an ``icon_registration`` / uniGradICON ``regis_net``) load into
gradicon_fast and compute what the official package computes.

The oracle is ``icon_registration`` itself: its standard network with random non-zero weights, saved as
the published files are, loaded with ``gradicon_fast.nn.load_model``; the maps, and the loss terms given
the same noise, are compared with the official ``GradientICONSparse`` (and with ``gradicon_fast.compat.icon``
around the official network). Bad files and shapes give one-line errors.
"""

from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from icon_oracle import (SHAPE_2D, SHAPE_3D, icon, icon_losses, image_pair, official_loss, official_network,
                         official_noise, randomize)

import gradicon_fast.nn as gnn
from gradicon_fast.nn import published
from gradicon_fast import io
from gradicon_fast.compat import icon as compat

pytestmark = pytest.mark.usefixtures("one_thread")  # small problems on shared cores

MAP_TOL = 1e-5  # [0, 1] units


@pytest.fixture(scope="module")
def official(tmp_path_factory):
    """Official 4-step networks (2D and 3D, random weights, eval mode) and their weight files; the 2D
    stage-1 (3-step) network is the 4-step one's ``netPhi``, saved on its own."""
    folder = tmp_path_factory.mktemp("official")
    nets, files = {}, {}
    for dimension in (2, 3):
        torch.manual_seed(dimension)
        nets[dimension, 4] = randomize(official_network(dimension), seed=10 + dimension).eval()
        nets[dimension, 3] = nets[dimension, 4].netPhi
    for key in ((2, 4), (2, 3), (3, 4)):  # 3D files are large (~280 MB): only the one the tests need
        files[key] = folder / f"{key[0]}d_step{key[1]}.trch"
        torch.save(nets[key].state_dict(), files[key])
    return nets, files


# The 3D 3-step network runs the code of the 2D one and the 3D 4-step one: left out to save time.
@pytest.mark.parametrize("dimension, steps", [(2, 4), (2, 3), pytest.param(3, 4, marks=pytest.mark.slow)])
def test_official_weights_give_the_official_maps_and_loss_terms(official, dimension, steps):
    nets, files = official
    net = nets[dimension, steps]
    shape = SHAPE_2D if dimension == 2 else SHAPE_3D
    image_A, image_B = image_pair(shape, batch=1, seed=dimension)
    oracle = official_loss(net, shape)
    with torch.no_grad():
        torch.manual_seed(7)
        expected = oracle(image_A, image_B)

        model = gnn.load_model(files[dimension, steps], shape=shape).eval()
        assert model.config["steps"] == steps and model.input_shape == shape
        results = []  # the maps of the loss's own forward pass (one run of the network for both checks)
        model.regis_net.register_forward_hook(lambda module, inputs, output: results.append(output))
        terms = model(image_A, image_B, noise=official_noise(shape, 7))
        assert (results[0].map("AB") - oracle.phi_AB_vectorfield).abs().max() <= MAP_TOL
        assert (results[0].map("BA") - oracle.phi_BA_vectorfield).abs().max() <= MAP_TOL

        drop_in = compat.GradientICONSparse(net, icon_losses.LNCC(sigma=5), lmbda=1.5)
        drop_in.assign_identity_map((1, 1) + shape)
        torch.manual_seed(7)
        got = drop_in(image_A, image_B)
        assert (drop_in.phi_AB_vectorfield - oracle.phi_AB_vectorfield).abs().max() <= MAP_TOL
        assert (drop_in.phi_BA_vectorfield - oracle.phi_BA_vectorfield).abs().max() <= MAP_TOL

    assert expected.inverse_consistency_loss > 1e-4  # the maps are not the identity: the penalty sees them
    for similarity, penalty, total in ((terms.similarity, terms.regularization, terms.total),
                                       (got.similarity_loss, got.inverse_consistency_loss, got.all_loss)):
        torch.testing.assert_close(similarity, expected.similarity_loss, rtol=1e-5, atol=0)
        # finite differences with δ = 0.001 in float32: rounding of the points shows at ~1e-4
        torch.testing.assert_close(penalty, expected.inverse_consistency_loss, rtol=2e-3, atol=0)
        torch.testing.assert_close(total, expected.all_loss, rtol=1e-4, atol=0)
    torch.testing.assert_close(got.transform_magnitude, expected.transform_magnitude, rtol=1e-4, atol=0)
    assert float(got.flips) == float(expected.flips)


def test_presets_are_the_published_models_shapes():
    assert published.PRESET_SHAPES == {"unigradicon": (175, 175, 175), "multigradicon": (175, 175, 175),
                                       "lung": (175, 175, 175), "knee": (80, 192, 192), "brain": (130, 155, 130)}


# Each load builds a full-size network and reads a 280 MB file: the default and the two other shapes.
@pytest.mark.parametrize("preset, shape", [(None, (175, 175, 175)), ("knee", (80, 192, 192)),
                                           ("brain", (130, 155, 130))])
def test_presets_give_the_published_shapes_and_objective(official, preset, shape):
    nets, files = official
    model = gnn.load_model(files[3, 4], preset=preset)
    assert model.input_shape == shape
    assert (model.lmbda, model.similarity.name, model.similarity.sigma, model.regularizer, model.stride) == \
        (1.5, "lncc", 5, "gradicon", 2)
    loaded = model.regis_net.state_dict()
    assert all(torch.equal(loaded[k], v) for k, v in nets[3, 4].state_dict().items())


def test_a_whole_loss_module_state_dict_loads_too(official, tmp_path):
    nets, _ = official
    oracle = official_loss(nets[2, 3], SHAPE_2D)
    torch.save(oracle.state_dict(), tmp_path / "loss.trch")  # keys under "regis_net."
    model = gnn.load_model(tmp_path / "loss.trch", shape=SHAPE_2D)
    assert model.config["steps"] == 3
    assert all(torch.equal(model.regis_net.state_dict()[k], v) for k, v in nets[2, 3].state_dict().items())


def test_files_with_the_identity_maps_of_older_versions_load(official, tmp_path):
    """Older icon_registration versions saved every wrapper's identity map with the weights: set aside,
    the network's own gives the default input shape."""
    nets, _ = official
    net = nets[2, 4]
    official_loss(net, (24, 30))  # every wrapper gets its identity map, at the shape "saved"
    state = dict(net.state_dict())
    for name, module in net.named_modules():
        if isinstance(module, icon.RegistrationModule):
            state[f"{name}.identity_map" if name else "identity_map"] = module.identity_map
    assert len(state) > len(net.state_dict()) + 5
    torch.save(state, tmp_path / "old.trch")
    model = gnn.load_model(tmp_path / "old.trch")
    assert model.input_shape == (24, 30) and model.config["steps"] == 4
    assert all(torch.equal(model.regis_net.state_dict()[k], v) for k, v in net.state_dict().items())
    assert gnn.load_model(tmp_path / "old.trch", shape=SHAPE_2D).input_shape == SHAPE_2D


def test_a_gradicon_fast_model_takes_a_shape_but_not_a_preset(tmp_path):
    gnn.save_model(gnn.standard_network((24, 20), width=0.125), tmp_path / "model.pt")
    assert gnn.load_model(tmp_path / "model.pt", shape=(32, 28)).input_shape == (32, 28)
    with pytest.raises(io.InputError, match="presets name the input shapes of official weight files"):
        gnn.load_model(tmp_path / "model.pt", preset="knee")
    with pytest.raises(io.InputError, match="holds a 2D model"):
        gnn.load_model(tmp_path / "model.pt", shape=(32, 28, 30))


def _one_line_error(path, match, **kwargs) -> str:
    with pytest.raises(io.InputError, match=match) as error:
        gnn.load_model(path, **kwargs)
    assert "\n" not in str(error.value)
    return str(error.value)


def test_bad_weight_files_give_one_line_errors(official, tmp_path):
    nets, files = official
    state = nets[2, 4].state_dict()

    (tmp_path / "noise.trch").write_bytes(np.random.default_rng(0).bytes(4096))
    _one_line_error(tmp_path / "noise.trch", "is not a readable checkpoint")
    (tmp_path / "truncated.trch").write_bytes(files[2, 4].read_bytes()[:100_000])
    _one_line_error(tmp_path / "truncated.trch", "is not a readable checkpoint")

    torch.save(torch.nn.Conv2d(2, 2, 3).state_dict(), tmp_path / "foreign.trch")
    line = _one_line_error(tmp_path / "foreign.trch", "is not a model: expected a gradicon_fast model")
    assert "official GradICON-family network" in line
    torch.save({k: v for k, v in state.items() if not k.endswith("lastConv.bias")}, tmp_path / "missing.trch")
    _one_line_error(tmp_path / "missing.trch", "is not a model")

    resized = dict(state)
    key = next(k for k in state if k.endswith("downConvs.0.weight"))
    resized[key] = torch.zeros(16, 4, 3, 3)  # a network of 2-channel images: not the published one
    torch.save(resized, tmp_path / "resized.trch")
    _one_line_error(tmp_path / "resized.trch", "do not fit the standard network: size mismatch", shape=SHAPE_2D)

    torch.save({"model": argparse.Namespace(a=1)}, tmp_path / "pickled.trch")  # an object: code to run on load
    _one_line_error(tmp_path / "pickled.trch", "refusing to load it")


def test_shapes_that_cannot_hold_the_weights_give_one_line_errors(official):
    _, files = official
    _one_line_error(files[2, 4], "preset 'knee' .* has 3 axes but the weights are of a 2D network", preset="knee")
    _one_line_error(files[2, 4], "preset 'unigradicon' .* has 3 axes but the weights are of a 2D network")
    _one_line_error(files[3, 4], "model shape 80x96 has 2 axes but the weights are of a 3D network", shape=(80, 96))
    _one_line_error(files[3, 4], "unknown model preset 'liver'", preset="liver")
    _one_line_error(files[3, 4], "not both", preset="knee", shape=(80, 192, 192))


def _cli(capsys, *args) -> tuple[int, str, str]:
    from gradicon_fast import cli

    try:
        status = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse
        status = e.code
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_register_command_takes_official_weights(official, tmp_path, capsys):
    _, files = official
    image_A, image_B = image_pair(SHAPE_2D, batch=1, seed=5)
    geometry = io.Geometry(SHAPE_2D, (1.5, 2.0), (0.0, 0.0), (1.0, 0.0, 0.0, 1.0))
    for name, image in (("fixed", image_B), ("moving", image_A)):
        io.write_image(tmp_path / f"{name}.nrrd", io.Image(image[0, 0].numpy(), geometry))
    pair = ["register", "--fixed", tmp_path / "fixed.nrrd", "--moving", tmp_path / "moving.nrrd", "-q"]

    status, out, err = _cli(capsys, *pair, "--model", files[2, 4], "--model-shape", *SHAPE_2D, "--io-iterations", "0",
                            "--transform-out", tmp_path / "t.nii.gz")
    assert status == 0, err
    assert "network" in out and (tmp_path / "t.nii.gz").is_file()

    for extra, status_expected, phrase in (
            (["--model", files[2, 4], "--model-preset", "knee"], 1, "has 3 axes but the weights are of a 2D network"),
            (["--model", files[2, 4]], 1, "preset 'unigradicon'"),
            (["--model-preset", "knee"], 2, "--model-preset and --model-shape need --model"),
            (["--model", files[2, 4], "--model-preset", "knee", "--model-shape", "8", "8"], 2, "not both")):
        status, _, err = _cli(capsys, *pair, *extra, "--warped-out", tmp_path / "w.nrrd")
        lines = err.strip().splitlines()
        assert status == status_expected and len(lines) == 1 and phrase in lines[0], err
        assert not (tmp_path / "w.nrrd").exists()
