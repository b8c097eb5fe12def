"""The README's pictures: a checkpoint's samples of the three example pose files, one strip per row.

    python tools/strips.py assets/student.safetensors assets/sample_strip.png
    python tools/strips.py out/camgeo/ckpt.safetensors assets/headline_strip.png

Each row is sample.py's strip.png for one pose file (pan_left, orbit, dolly_in, in that order) with sample.py's
defaults; sample.py runs as its own process, as a user would run it.
"""
import argparse
import os
import subprocess
import sys
import tempfile

from PIL import Image

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
POSE_FILES = ("pan_left.json", "orbit.json", "dolly_in.json")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("ckpt")
    parser.add_argument("out", help="the PNG to write")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as folder:
        for name in POSE_FILES:
            out = os.path.join(folder, name)
            subprocess.run([sys.executable, os.path.join(ROOT, "sample.py"),
                            os.path.join(ROOT, "examples", "reference.png"), os.path.join(ROOT, "examples", name),
                            "--ckpt", args.ckpt, "--out", out], check=True)
            rows.append(Image.open(os.path.join(out, "strip.png")).convert("RGB"))
    picture = Image.new("RGB", (max(row.width for row in rows), sum(row.height for row in rows)))
    for i, row in enumerate(rows):
        picture.paste(row, (0, sum(r.height for r in rows[:i])))
    picture.save(args.out)
    print(f"{args.out}: {len(rows)} strips")


if __name__ == "__main__":
    main()
