"""`python -m doodl`: one optimized image from the command line, clear errors for bad input."""

from PIL import Image

from doodl.__main__ import main


def test_cli_saves_the_best_image_and_the_baseline(tiny_folder, tmp_path, capsys):
    out = tmp_path / "out.png"
    code = main(
        ["--model", str(tiny_folder), "--prompt", "a red circle", "--loss", "symmetry", "--steps", "4",
         "--iterations", "3", "--out", str(out), "--baseline-scale", "5"]
    )  # fmt: skip
    printed = capsys.readouterr().out
    assert code == 0
    assert printed.count("iteration  ") == 3 and "best loss" in printed
    assert Image.open(out).size == (64, 64)
    assert Image.open(tmp_path / "out-one-step.png").size == (64, 64)


def test_cli_reports_bad_input_without_a_traceback(tiny_folder, tmp_path, capsys):
    base = ["--model", str(tiny_folder), "--prompt", "a red circle", "--out", str(tmp_path / "x.png")]
    not_an_image = tmp_path / "notes.txt"
    not_an_image.write_text("hello")
    cases = {
        "unknown loss 'nope'": ["--loss", "nope"],
        "steps=0 is out of range": ["--loss", "symmetry", "--steps", "0"],
        "not a readable image": ["--loss", "symmetry", "--init-image", str(not_an_image)],
        "no reference image": ["--loss", "clip-image"],
        "the target class is empty": ["--loss", "classifier"],
    }
    for message, extra in cases.items():
        assert main(base + extra) == 2
        assert message in capsys.readouterr().err
    assert main(["--model", str(tmp_path), "--prompt", "x"]) == 2
    assert "no model_index.json" in capsys.readouterr().err
