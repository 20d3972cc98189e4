"""Does the inversion's face detector (MTCNN, facenet-pytorch) find the miniature world's faces?

    python benchmarks/micro_face_detection.py [--people 16]

The face: auto target of the miniature world (inversion from small, off-centre faces within 0.05 of tight crops)
needs the detector to find its faces. Each held-out person's photo (32 px) is enlarged (bicubic, x4, x8, x16) and
pasted off-centre into a grey canvas three times its side; the script prints how many faces MTCNN finds.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from w2w.facecrop import detect_frames  # noqa: E402
from w2w.micro.world import DEFAULT_DIR, load_world  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--artifacts", default=DEFAULT_DIR)
    p.add_argument("--people", type=int, default=16)
    args = p.parse_args()
    world = load_world(args.artifacts)
    people = list(world.heldout_seeds)[: args.people]
    for up in (4, 8, 16):
        found, probs = 0, []
        for seed in people:
            img = ((world.photos_of(seed, 1, 0) + 1) / 2).clamp(0, 1)
            big = F.interpolate(img, scale_factor=up, mode="bicubic", align_corners=False).clamp(0, 1)
            side = big.shape[-1]
            canvas = torch.full((1, 3, 3 * side, 3 * side), 0.5)
            canvas[..., side // 8: side // 8 + side, side // 2: side // 2 + side] = big
            frame = detect_frames(canvas.permute(0, 2, 3, 1))[0]
            if frame is not None:
                found += 1
                probs.append(round(frame.probability, 3))
        print(f"faces enlarged x{up} ({side} px) in a {3 * side} px canvas: MTCNN finds {found}/{len(people)} "
              f"(probabilities {probs})")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
