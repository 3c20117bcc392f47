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


def test_a_model_is_named_in_one_form_and_the_other_only_where_unambiguous(tmp_path, monkeypatch, capsys):
    """'ARCHITECTURE TAG' everywhere; --clip-pretrained TAG is that second word for an architecture, and is
    refused beside a name that has one, a folder or a hub model. Relative paths are found in the app's
    folder from any working directory, in a name of two words too."""
    from doodl.__main__ import parse_args
    from doodl.cli import model_names
    from doodl.guides import check_clip_name
    from doodl.serving import ROOT, locate

    def clip_of(*flags: str) -> str:
        return model_names(parse_args(["--prompt", "x", *flags])).clip

    assert clip_of("--clip", "ViT-L-14 openai") == clip_of(
        "--clip", "ViT-L-14", "--clip-pretrained", "openai"
    )
    for flags in (
        ["--clip", "ViT-L-14 openai"],
        ["--clip", "hf-hub:org/clip"],
        [],
    ):  # [] : the embedded folder
        monkeypatch.chdir(tmp_path)
        try:
            clip_of(*flags, "--clip-pretrained", "openai")
        except ValueError as error:
            assert "drop --clip-pretrained openai" in str(error)
        else:
            raise AssertionError(f"--clip-pretrained taken beside {flags}")
    assert locate("assets/embedded/clip") == str(ROOT / "assets/embedded/clip")
    assert locate("assets/embedded/clip ViT-H-14") == f"{ROOT / 'assets/embedded/clip'} ViT-H-14"
    assert check_clip_name("ViT-L-14", "LAION2B-S32B-B82K") == "ViT-L-14"  # open_clip's own tag lookup
    assert main(["--prompt", "x", "--clip", "ViT-L-14", "--out", str(tmp_path / "x.png")]) == 2
    assert "needs `pretrained` weights" in capsys.readouterr().err
