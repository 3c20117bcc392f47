"""Image size settings: validated against the model (a multiple of the VAE factor, a quarter to twice its
resolution) in the library and the CLI, and honoured in the image produced."""

import pytest
from PIL import Image

from doodl import DoodlSettings, sample
from doodl.__main__ import main

PROMPT = "a red circle"


def test_the_size_range_is_a_quarter_to_twice_the_trained_side(tiny):
    assert tiny.resolution == 64 and tiny.size_range == (16, 128)
    assert tiny.latent_shape(16, 128) == (1, 4, 2, 16)
    assert tiny.latent_shape() == (1, 4, 8, 8)


@pytest.mark.parametrize(
    "height, width, message",
    [
        (60, None, "setting height=60 must be a multiple of 8"),
        (None, 36, "setting width=36 must be a multiple of 8"),
        (8, None, "setting height=8 is out of this model's range, 16 to 128 px"),
        (None, 136, "setting width=136 is out of this model's range, 16 to 128 px"),
    ],
)
def test_bad_sizes_name_the_setting_and_the_range(tiny, height, width, message):
    with pytest.raises(ValueError, match=message):
        tiny.latent_shape(height, width)


@pytest.mark.parametrize("name", ["height", "width"])
def test_settings_refuse_sizes_that_are_not_positive_integers(name):
    for bad in (0, -64, 64.0):
        with pytest.raises(ValueError, match=f"setting {name}={bad!r} is out of range"):
            DoodlSettings(**{name: bad})


def test_a_non_square_sample_has_the_asked_size(tiny):
    assert sample(tiny, PROMPT, DoodlSettings(steps=2, height=32, width=48)).size == (48, 32)


def test_cli_takes_height_and_width(tiny_folder, tmp_path):
    out = tmp_path / "wide.png"
    code = main(
        ["--model", str(tiny_folder), "--prompt", PROMPT, "--loss", "symmetry", "--steps", "2",
         "--iterations", "1", "--height", "32", "--width", "48", "--out", str(out)]
    )  # fmt: skip
    assert code == 0
    assert Image.open(out).size == (48, 32)


def test_cli_refuses_a_bad_size_before_loading_guides(tiny_folder, tmp_path, capsys):
    # The classifier loss without --target would fail while building the loss: the size is checked first.
    base = ["--model", str(tiny_folder), "--prompt", PROMPT, "--loss", "classifier",
            "--out", str(tmp_path / "x.png")]  # fmt: skip
    assert main(base + ["--width", "136"]) == 2
    assert "setting width=136 is out of this model's range" in capsys.readouterr().err
    assert main(base + ["--height", "0"]) == 2
    assert "setting height=0 is out of range" in capsys.readouterr().err
