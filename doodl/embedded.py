"""The embedded default models: the small models of the shapes world, shipped in `assets/embedded`.

They are ordinary model folders (diffusers, open_clip, transformers, a LAION-format aesthetic head),
loaded by the same loaders as real models; only their location is special.
"""

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent / "assets" / "embedded"
SD = ROOT / "sd"
CLIP = ROOT / "clip"
CLASSIFIER = ROOT / "classifier"
AESTHETIC_HEAD = ROOT / "aesthetic" / "aesthetic_head.safetensors"
