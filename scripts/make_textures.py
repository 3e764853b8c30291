"""Build difftrack/data/textures.npz: the texture bank of the procedural world.

Photographs come from scikit-image's bundled data images (shipped inside the PyPI wheel, no download); procedural
textures are generated with a fixed seed. Every texture is stored as uint8 RGB 256x256.
Run: python scripts/make_textures.py
"""
import numpy as np
import cv2
import skimage.data as data

SIZE = 256
# Photographs kept out of training: they make the held-out evaluation set.
HELDOUT = ["chelsea", "gravel", "clock", "retina"]
TRAIN = ["astronaut", "coffee", "rocket", "coins", "moon", "page", "hubble_deep_field", "immunohistochemistry",
         "brick", "grass", "camera", "stereo_motorcycle"]


def load(name):
    im = getattr(data, name)()
    if isinstance(im, tuple):
        im = im[0]
    im = np.asarray(im)
    if im.ndim == 2:
        im = np.stack([im] * 3, -1)
    im = im[..., :3].astype(np.uint8)
    h, w = im.shape[:2]
    s = min(h, w)  # centre square crop, then resize
    im = im[(h - s) // 2:(h - s) // 2 + s, (w - s) // 2:(w - s) // 2 + s]
    return cv2.resize(im, (SIZE, SIZE), interpolation=cv2.INTER_AREA)


def procedural(rng):
    yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
    out = {}
    f = rng.uniform(6, 12)
    out["proc_stripes"] = (np.sin(2 * np.pi * f * (xx * 0.8 + yy * 0.6)) > 0)[..., None] * np.array([220, 200, 120]) + 30
    out["proc_checker"] = (((xx * 10).astype(int) + (yy * 10).astype(int)) % 2)[..., None] * np.array([180, 180, 200]) + 40
    noise = cv2.GaussianBlur(rng.uniform(0, 1, (SIZE, SIZE, 3)).astype(np.float32), (0, 0), 6)
    noise = (noise - noise.min()) / (noise.max() - noise.min())
    out["proc_blobs"] = noise * 255
    fine = cv2.GaussianBlur(rng.uniform(0, 1, (SIZE, SIZE, 3)).astype(np.float32), (0, 0), 1.5)
    fine = (fine - fine.min()) / (fine.max() - fine.min())
    out["proc_noise"] = fine * 255
    rings = np.sin(2 * np.pi * 9 * np.hypot(xx - 0.5, yy - 0.5))[..., None] * np.array([90, 60, 110]) + 128
    out["proc_rings"] = rings
    return {k: np.clip(v, 0, 255).astype(np.uint8) for k, v in out.items()}


def main():
    rng = np.random.default_rng(0)
    bank = {f"photo_{n}": load(n) for n in TRAIN + HELDOUT}
    bank.update(procedural(rng))
    names = list(bank)
    np.savez_compressed("difftrack/data/textures.npz", images=np.stack([bank[n] for n in names]),
                        names=np.array(names), heldout=np.array([f"photo_{n}" for n in HELDOUT]))
    print(len(names), "textures")


if __name__ == "__main__":
    main()
